"""The stages of `roma-tune run` before training, in order: load -> embeddings ->
frozen-layer cache -> routing snapshot -> neighbours (:mod:`tuner.run.pipeline` runs them,
then the training and the export).

Each stage reads its cached output when its inputs are unchanged (:mod:`tuner.run.stage_cache`);
the run directory's lock, checkpoints and leftovers follow :mod:`tuner.run.workdir`; under
torchrun the ranks share the work as :mod:`tuner.run.ranks` says. Only rank 0 writes files,
logs and shows progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from roma_vllm.deltas import DELTAS_FILENAME
from roma_vllm.errors import RomaError
from tuner.config import ConfigError, TuneConfig
from tuner.data.prompts import Encoded, encode
from tuner.data.sources import Dataset, load_examples
from tuner.data.truncate import truncate_prompts
from tuner.export.deltas import CONFIG_FILENAME, LOG_FILENAME, write_json, write_log
from tuner.model.frozen_cache import PrefixCache
from tuner.model.load import TunerModel, load_model
from tuner.progress import Bars
from tuner.roma.embed import embed_texts
from tuner.roma.neighbours import Neighbours, find_neighbours
from tuner.roma.snapshot import Snapshot
from tuner.run import record
from tuner.run.ranks import on_main, split_snapshot
from tuner.run.stage_cache import StageCache, stage_keys
from tuner.run.workdir import (
    CheckpointPlan,
    RunDirError,
    RunLock,
    plan_checkpoints,
    remove_partial_files,
)
from tuner.train.distributed import (
    SINGLE,
    barrier,
    broadcast,
    init,
    launched_world_size,
)


class NoSuccessError(RomaError, RuntimeError):
    """The base model answers no training sample correctly: RoMA has no neighbours to use."""


class Stages:
    """The stages of one run, as methods so tests and benchmarks can call them alone;
    :class:`tuner.run.pipeline.Pipeline` runs them in order."""

    def __init__(
        self,
        cfg: TuneConfig,
        bars: Bars | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.lock = RunLock(self.run_dir)
        self._bars = bars or Bars(enabled=False)
        self._echo = echo or (lambda msg: None)
        self.dist = SINGLE
        self.events: list[dict[str, Any]] = []
        self.reused: list[str] = []
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def bars(self) -> Bars:
        """Progress bars: rank 0's only."""
        return self._bars if self.dist.is_main else Bars(enabled=False)

    def echo(self, msg: str) -> None:
        if self.dist.is_main:
            self._echo(msg)

    def log(self, event: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        self.events.append({"time": round(time.time(), 3), **event})
        write_log(self.run_dir / LOG_FILENAME, self.events)

    def _cached(self, stage: str) -> bool:
        path = self.cache.path(stage)
        if path.exists():
            self.reused.append(stage)
            self.log({"event": "stage", "stage": stage, "cached": True, "file": path.name})
            return True
        return False

    def _timed(self, stage: str, start: float) -> None:
        self.timings[stage] = round(time.perf_counter() - start, 3)
        self.log(
            {"event": "stage", "stage": stage, "cached": False, "seconds": self.timings[stage]}
        )

    # ------------------------------------------------------------------ stages
    def load(self) -> None:
        """Take the run directory, read the data, load the model, plan the checkpoints."""
        cfg = self.cfg
        if cfg.device_map and launched_world_size() > 1:
            raise ConfigError(
                f"--device-map: spreads one model over every GPU of a single process and "
                f"cannot be combined with torchrun ({launched_world_size()} processes); use "
                "--device-map in one process, or torchrun with one GPU per process"
            )
        self.dist = init(cfg.device)
        device = self.dist.device if self.dist.enabled else cfg.device
        on_main(self._take_run_dir, self.dist)
        self.data: Dataset = load_examples(
            cfg.data, skip_bad_rows=cfg.skip_bad_rows, limit=cfg.limit, seed=cfg.seed
        )
        skipped = f", {self.data.skipped} bad rows skipped" if self.data.skipped else ""
        self.echo(f"data: {len(self.data)} examples in {len(self.data.tasks)} task(s){skipped}")
        if len(self.data.sources) > 1:
            self.echo(
                "sources: " + ", ".join(f"{s['name']} {s['rows']}" for s in self.data.sources)
            )
        self.val: Dataset | None = None
        if cfg.val:
            self.val = load_examples(cfg.val, skip_bad_rows=cfg.skip_bad_rows, seed=cfg.seed)
            self.echo(f"validation: {len(self.val)} examples")
        self.tm: TunerModel = load_model(
            cfg.model,
            cfg.layers,
            cfg.dtype,
            device,
            cfg.trust_remote_code,
            cfg.device_map,
            echo=self.echo,
        )
        info = self.model_info()
        self.echo(
            f"model: {self.tm.architecture}, tuning routers of layers {self.tm.layers} "
            f"({info['trainable_parameters']:,} parameters); {info['dtype']} on "
            f"{', '.join(info['devices'])}"
            + (f", {self.dist.world_size} processes" if self.dist.enabled else "")
        )
        tok = self.tm.tokenizer
        self.encoded: list[Encoded] = encode(
            self.data.examples, tok, cfg.scoring, cfg.template, cfg.chat_template
        )
        self.val_encoded = (
            encode(self.val.examples, tok, cfg.scoring, cfg.template, cfg.chat_template)
            if self.val
            else None
        )
        self.truncated = self._truncate()
        self.keys = stage_keys(
            cfg, self.tm.fingerprint, self.data.fingerprint, self.tm.layers, self.tm.dtype
        )
        self.cache = StageCache(self.run_dir, self.keys)
        # Before anything is written: refuse here rather than after hours of stages.
        self.checkpoints: CheckpointPlan = on_main(self._plan_checkpoints, self.dist)
        if not self.dist.is_main:
            return
        data = self._data_info()
        write_json(self.run_dir / CONFIG_FILENAME, record.run_config(cfg, info, data, self.keys))
        self.log({"event": "start", "config": cfg.to_dict(), "model": info})

    def _take_run_dir(self) -> None:
        """Rank 0: lock the run directory and clear what a killed run left half-written."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"--out {self.run_dir}: cannot create it ({e.strerror})") from None
        self.lock.acquire()
        names = (DELTAS_FILENAME, CONFIG_FILENAME, LOG_FILENAME)
        removed = remove_partial_files(self.run_dir, names)
        if removed:
            self.echo(
                f"removed {len(removed)} partial file(s) an interrupted run left in "
                f"{self.run_dir}: " + ", ".join(str(p.relative_to(self.run_dir)) for p in removed)
            )

    def _plan_checkpoints(self) -> CheckpointPlan:
        cfg = self.cfg
        plan = plan_checkpoints(
            self.run_dir, self.keys["train"], cfg.epochs, cfg.resume, cfg.overwrite
        )
        for note in plan.notes:
            self.echo(note)
        return plan

    def _truncate(self) -> int:
        """``--max-length``: cut prompts from the left; the number of training rows cut."""
        if self.cfg.max_length is None:
            return 0
        n, bos = self.cfg.max_length, self.tm.tokenizer.bos_token_id
        self.encoded, cut = truncate_prompts(self.encoded, n, bos)
        val_cut = 0
        if self.val_encoded is not None:
            self.val_encoded, val_cut = truncate_prompts(self.val_encoded, n, bos)
        self.echo(f"--max-length {n}: prompts cut from the left: {cut} training, {val_cut} val")
        return cut

    def model_info(self) -> dict[str, Any]:
        return record.model_info(self.tm, self.dist.world_size)

    def _data_info(self) -> dict[str, Any]:
        info = record.data_info(self.data, self.val)
        if self.cfg.max_length is not None:
            info["truncated_rows"] = self.truncated
        return info

    def embeddings(self) -> np.ndarray:
        """Task embeddings of the training prompts (rank 0 computes, every rank gets them)."""
        return on_main(self._embeddings, self.dist)

    def _embeddings(self) -> np.ndarray:
        if self._cached("embeddings"):
            return self.cache.load_embeddings()
        t0 = time.perf_counter()
        texts = [e.prompt for e in self.data.examples]
        with self.bars.task("embeddings", len(texts)) as advance:
            emb = embed_texts(texts, self.cfg.embedder, progress=advance)
        self.cache.save_embeddings(emb)
        self._timed("embeddings", t0)
        return emb

    def prefix(self) -> PrefixCache | None:
        """The ``--cache-frozen-layers`` states: rank 0 builds them in RUN_DIR, the others read."""
        if not self.cfg.cache_frozen_layers:
            return None
        path = self.cache.path("prefix")
        cache = self._prefix(path) if self.dist.is_main else None
        barrier(self.dist)
        if cache is None:
            cache = PrefixCache.open(path)
            if cache is None:
                raise RunDirError(
                    f"--cache-frozen-layers: rank {self.dist.rank} cannot read {path}, written by "
                    "rank 0; with several machines --out must be on a filesystem they share"
                )
        return cache

    def _prefix(self, path: Path) -> PrefixCache:
        cache = PrefixCache.open(path)
        if cache is not None:
            self._cached("prefix")
            return cache
        t0 = time.perf_counter()
        with self.bars.task("prefix cache", len(self.encoded)) as advance:
            cache = PrefixCache.build(
                self.tm,
                self.encoded,
                self.cfg.batch_size,
                path,
                self.tm.tokenizer.pad_token_id,
                advance,
            )
        self._timed("prefix", t0)
        return cache

    def measure(
        self, encoded: list[Encoded], name: str, prefix: PrefixCache | None = None
    ) -> Snapshot:
        """A no-grad pass over ``encoded`` with the current routers (split over the ranks
        under torchrun; every rank gets the whole snapshot)."""
        cfg = self.cfg
        return split_snapshot(
            self.tm,
            encoded,
            cfg.micro_batch_size or cfg.batch_size,
            prefix,
            cfg.routing_vector,
            self.dist,
            self.bars,
            name,
        )

    def snapshot(self, prefix: PrefixCache | None) -> Snapshot:
        snap = None
        if self.dist.is_main and self._cached("snapshot"):
            snap = self.cache.load_snapshot()
        snap = broadcast(snap, self.dist)
        if snap is None:
            t0 = time.perf_counter()
            snap = self.measure(self.encoded, "routing snapshot", prefix)
            if self.dist.is_main:
                self.cache.save_snapshot(snap)
            self._timed("snapshot", t0)
        n_ok = int(snap.correct.sum())
        self.echo(
            f"snapshot: train accuracy {snap.accuracy:.4f} ({n_ok}/{len(snap.correct)} successful)"
        )
        if n_ok == 0 and self.cfg.lam > 0:
            raise NoSuccessError(
                f"{self.cfg.data}: the model answers none of the {len(snap.correct)} training "
                "samples correctly, so no sample has successful neighbours to align with; use "
                "more (or easier) data, a different --template or --scoring, or --lambda 0 "
                "for plain router tuning"
            )
        return snap

    def _find(self, emb: np.ndarray, snap: Snapshot) -> Neighbours:
        cfg = self.cfg
        return find_neighbours(emb, snap.correct.numpy(), k=cfg.k, sigma=cfg.sigma, eps=cfg.eps)

    def neighbours_for(self, emb: np.ndarray) -> Callable[[Snapshot], Neighbours]:
        """N(i) and W from a snapshot (rank 0 searches, every rank gets the result)."""
        return lambda snap: on_main(lambda: self._find(emb, snap), self.dist)

    def neighbours(self, emb: np.ndarray, snap: Snapshot) -> Neighbours:
        nb = on_main(lambda: self._neighbours(emb, snap), self.dist)
        if nb.empty:
            self.echo(
                f"neighbours: {nb.empty} samples have no successful neighbour (manifold term 0)"
            )
        return nb

    def _neighbours(self, emb: np.ndarray, snap: Snapshot) -> Neighbours:
        if self._cached("neighbours"):
            return self.cache.load_neighbours()
        t0 = time.perf_counter()
        nb = self._find(emb, snap)
        self.cache.save_neighbours(nb)
        self._timed("neighbours", t0)
        return nb
