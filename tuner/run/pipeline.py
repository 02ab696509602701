"""`roma-tune run` end to end: data -> embeddings -> snapshot -> neighbours -> training -> export.

Each stage's output is cached under ``RUN_DIR/cache`` in a file named by a hash of
everything it depends on (model fingerprint, data fingerprint, the options that matter),
and reused when that file exists: re-running an unchanged command redoes nothing; changing
``--k`` recomputes only the neighbours and the training. Training checkpoints live in
``RUN_DIR/checkpoints/<hash>``; a finished training is reused, an interrupted one is
continued with ``--resume``. Every file is written atomically.

Under torchrun every rank runs the pipeline (:mod:`tuner.train.distributed`): rank 0 computes
embeddings and neighbours and shares them, the snapshot and validation passes are split
over the ranks, training is data parallel, and only rank 0 writes files, logs and shows
progress.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from roma_vllm import __version__
from roma_vllm.deltas import DELTAS_FILENAME, atomic_write
from tuner.config import ConfigError, TuneConfig
from tuner.data.prompts import Encoded, encode
from tuner.data.sources import Dataset, load_examples
from tuner.export.deltas import CONFIG_FILENAME, LOG_FILENAME, export_deltas, write_json, write_log
from tuner.model.forward import sorted_batches
from tuner.model.frozen_cache import PrefixCache
from tuner.model.load import TunerModel, describe, load_model
from tuner.progress import Bars
from tuner.roma.embed import embed_texts
from tuner.roma.neighbours import Neighbours, find_neighbours
from tuner.roma.snapshot import Snapshot, take_snapshot
from tuner.train.distributed import (
    SINGLE,
    barrier,
    broadcast,
    init,
    launched_world_size,
    reduce_disjoint,
    shutdown,
)
from tuner.train.loop import EpochRecord, latest_checkpoint, train


class NoSuccessError(RuntimeError):
    """The base model answers no training sample correctly: RoMA has no neighbours to use."""


@dataclass
class RunResult:
    run_dir: Path
    deltas: Path
    accuracy_before: float
    accuracy_after: float
    val_before: float | None
    val_after: float | None
    history: list[EpochRecord]
    reused: list[str] = field(default_factory=list)  # stages taken from the cache


def _key(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


class Pipeline:
    """One run; the stages are methods so tests and benchmarks can call them alone."""

    def __init__(
        self,
        cfg: TuneConfig,
        bars: Bars | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.cache_dir = self.run_dir / "cache"
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

    def _cached(self, stage: str, path: Path) -> bool:
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
        cfg = self.cfg
        if cfg.device_map and launched_world_size() > 1:
            raise ConfigError(
                f"--device-map: spreads one model over every GPU of a single process and "
                f"cannot be combined with torchrun ({launched_world_size()} processes); use "
                "--device-map in one process, or torchrun with one GPU per process"
            )
        self.dist = init(cfg.device)
        device = self.dist.device if self.dist.enabled else cfg.device
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data: Dataset = load_examples(
            cfg.data, skip_bad_rows=cfg.skip_bad_rows, limit=cfg.limit
        )
        skipped = f", {self.data.skipped} bad rows skipped" if self.data.skipped else ""
        self.echo(f"data: {len(self.data)} examples in {len(self.data.tasks)} task(s){skipped}")
        self.val: Dataset | None = None
        if cfg.val:
            self.val = load_examples(cfg.val, skip_bad_rows=cfg.skip_bad_rows)
            self.echo(f"validation: {len(self.val)} examples")
        self.tm: TunerModel = load_model(
            cfg.model, cfg.layers, cfg.dtype, device, cfg.trust_remote_code, cfg.device_map
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
        enc = _key(
            self.tm.fingerprint,
            self.data.fingerprint,
            cfg.hash("scoring", "template", "chat_template"),
        )
        self.keys = {
            "embeddings": _key(self.data.fingerprint, cfg.embedder),
            "prefix": _key(enc, self.tm.layers[0], self.tm.dtype),
            "snapshot": _key(enc, self.tm.layers, self.tm.dtype, cfg.routing_vector),
        }
        self.keys["neighbours"] = _key(
            self.keys["snapshot"], self.keys["embeddings"], cfg.hash("k", "eps", "sigma")
        )
        self.keys["train"] = _key(self.keys["snapshot"], self.keys["embeddings"], cfg.hash())
        if not self.dist.is_main:
            return
        write_json(
            self.run_dir / CONFIG_FILENAME,
            {
                "config": cfg.to_dict(),
                "roma_vllm_version": __version__,
                "model": info,
                "data": self._data_info(),
                "cache_keys": self.keys,
            },
        )
        self.log({"event": "start", "config": cfg.to_dict(), "model": info})

    def model_info(self) -> dict[str, Any]:
        """:func:`tuner.model.load.describe` plus the number of data-parallel processes."""
        return {**describe(self.tm), "world_size": self.dist.world_size}

    def _data_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "path": self.data.path,
            "fingerprint": self.data.fingerprint,
            "examples": len(self.data),
            "skipped": self.data.skipped,
            "tasks": self.data.tasks,
        }
        if self.val is not None:
            info["val"] = {
                "path": self.val.path,
                "fingerprint": self.val.fingerprint,
                "examples": len(self.val),
            }
        return info

    def embeddings(self) -> np.ndarray:
        """Task embeddings of the training prompts (rank 0 computes, every rank gets them)."""
        emb = self._embeddings() if self.dist.is_main else None
        return broadcast(emb, self.dist)

    def _embeddings(self) -> np.ndarray:
        path = self.cache_dir / f"embeddings-{self.keys['embeddings']}.npy"
        if self._cached("embeddings", path):
            return np.load(path)
        t0 = time.perf_counter()
        texts = [e.prompt for e in self.data.examples]
        with self.bars.task("embeddings", len(texts)) as advance:
            emb = embed_texts(texts, self.cfg.embedder, progress=advance)
        _save_npy(path, emb)
        self._timed("embeddings", t0)
        return emb

    def prefix(self) -> PrefixCache | None:
        """The ``--cache-frozen-layers`` states: rank 0 builds them in RUN_DIR, the others read."""
        if not self.cfg.cache_frozen_layers:
            return None
        path = self.cache_dir / f"prefix-{self.keys['prefix']}.bin"
        cache = self._prefix(path) if self.dist.is_main else None
        barrier(self.dist)
        if cache is None:
            cache = PrefixCache.open(path)
            if cache is None:
                raise FileNotFoundError(
                    f"--cache-frozen-layers: rank {self.dist.rank} cannot read {path}, written by "
                    "rank 0; with several machines --out must be on a filesystem they share"
                )
        return cache

    def _prefix(self, path: Path) -> PrefixCache:
        cache = PrefixCache.open(path)
        if cache is not None:
            self._cached("prefix", path)
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
        d, bs = self.dist, self.cfg.batch_size
        if not d.enabled:
            with self.bars.task(name, len(encoded)) as advance:
                return take_snapshot(self.tm, encoded, bs, prefix, advance, self.cfg.routing_vector)
        # This rank's share: every world_size-th of the length-sorted batches. Listed in
        # global sorted order they sort (and so batch) exactly as they do in one process,
        # so every sample's result is bit for bit the single-process one.
        mine = [i for b in sorted_batches(encoded, bs)[d.rank :: d.world_size] for i in b]
        view = prefix.remapped(mine) if prefix is not None else None
        with self.bars.task(name, len(mine)) as advance:
            part = take_snapshot(
                self.tm, [encoded[i] for i in mine], bs, view, advance, self.cfg.routing_vector
            )
        n, where = len(encoded), torch.tensor(mine, dtype=torch.long)
        full = {
            "correct": torch.zeros(n, dtype=torch.bool),
            "prediction": torch.zeros(n, dtype=torch.long),  # + 1: zero means "not mine"
            "loss": torch.zeros(n),
            "routing": torch.zeros(n, part.routing.shape[1]),
        }
        full["correct"][where] = part.correct
        full["prediction"][where] = part.prediction + 1
        full["loss"][where] = part.loss
        full["routing"][where] = part.routing
        full = reduce_disjoint(full, d)
        return Snapshot(full["correct"], full["prediction"] - 1, full["loss"], full["routing"])

    def snapshot(self, prefix: PrefixCache | None) -> Snapshot:
        path = self.cache_dir / f"snapshot-{self.keys['snapshot']}.safetensors"
        snap = None
        if self.dist.is_main and self._cached("snapshot", path):
            snap = Snapshot.from_tensors(load_file(str(path)))
        snap = broadcast(snap, self.dist)
        if snap is None:
            t0 = time.perf_counter()
            snap = self.measure(self.encoded, "routing snapshot", prefix)
            tensors = {k: v.contiguous() for k, v in snap.tensors().items()}
            if self.dist.is_main:
                atomic_write(path, lambda tmp: save_file(tensors, tmp))
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

        def build(snap: Snapshot) -> Neighbours:
            return broadcast(self._find(emb, snap) if self.dist.is_main else None, self.dist)

        return build

    def neighbours(self, emb: np.ndarray, snap: Snapshot) -> Neighbours:
        nb = self._neighbours(emb, snap) if self.dist.is_main else None
        nb = broadcast(nb, self.dist)
        if nb.empty:
            self.echo(
                f"neighbours: {nb.empty} samples have no successful neighbour (manifold term 0)"
            )
        return nb

    def _neighbours(self, emb: np.ndarray, snap: Snapshot) -> Neighbours:
        path = self.cache_dir / f"neighbours-{self.keys['neighbours']}.npz"
        if self._cached("neighbours", path):
            with np.load(path) as z:
                nb = Neighbours(z["index"], z["weight"], z["distance"])
        else:
            t0 = time.perf_counter()
            nb = self._find(emb, snap)
            _save_npz(path, nb.arrays())
            self._timed("neighbours", t0)
        return nb

    # ------------------------------------------------------------------ all
    def run(self, on_epoch_end: Callable[[int], None] | None = None) -> RunResult:
        try:
            return self._run(on_epoch_end)
        finally:
            shutdown(self.dist)

    def _run(self, on_epoch_end: Callable[[int], None] | None) -> RunResult:
        cfg = self.cfg
        self.load()
        emb = self.embeddings()
        prefix = self.prefix()
        snap = self.snapshot(prefix)
        neighbours = self.neighbours(emb, snap)
        val_before = (
            self.measure(self.val_encoded, "validation").accuracy if self.val_encoded else None
        )

        ckpt_dir = self.run_dir / "checkpoints" / self.keys["train"]
        complete = False
        if self.dist.is_main:  # rank 0 owns the checkpoints; train() shares what it loads
            latest = latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
            complete = latest is not None and latest.stem == f"epoch-{cfg.epochs - 1}"
            if latest is not None and not (cfg.resume or complete):
                self.echo(
                    "found an unfinished training of this configuration; starting over "
                    "(use --resume to continue it)"
                )
                shutil.rmtree(ckpt_dir)
            elif cfg.resume and latest is None:
                self.echo(
                    "--resume: no checkpoint of this configuration yet; starting from scratch"
                )
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        complete = broadcast(complete, self.dist)
        if complete:
            self.reused.append("training")
        validate = (
            (lambda: self.measure(self.val_encoded, "validation").accuracy)
            if self.val_encoded
            else None
        )
        t0 = time.perf_counter()
        result = train(
            self.tm,
            self.encoded,
            cfg,
            snap,
            self.neighbours_for(emb),
            lambda: self.measure(self.encoded, "train accuracy", prefix),
            ckpt_dir,
            resume=cfg.resume or complete,
            neighbours=neighbours,
            prefix=prefix,
            validate=validate,
            bars=self.bars,
            log=self.log,
            on_epoch_end=on_epoch_end,
            dist=self.dist,
        )
        if not complete:
            self._timed("training", t0)
        final = result.final
        assert final is not None
        val_after = result.history[-1].val_accuracy if result.history else None
        training = {
            "method": "roma" if cfg.lam > 0 else "router-tuning",
            "config": cfg.to_dict(),
            "data": self._data_info(),
            "base_fingerprint": self.tm.fingerprint,
            "model": self.model_info(),
            "epochs": [asdict(r) for r in result.history],
            "train_accuracy_before": snap.accuracy,
            "train_accuracy_after": final.accuracy,
            "val_accuracy_before": val_before,
            "val_accuracy_after": val_after,
            "successful_before": int(snap.correct.sum()),
            "versions": _versions(),
            "timings": self.timings,
        }
        deltas = self.run_dir / DELTAS_FILENAME
        if self.dist.is_main:
            deltas = export_deltas(self.tm, self.run_dir, training)
        barrier(self.dist)  # every rank returns once the outputs exist
        self.log(
            {
                "event": "done",
                "deltas": str(deltas),
                "train_accuracy_before": snap.accuracy,
                "train_accuracy_after": final.accuracy,
                "val_accuracy_before": val_before,
                "val_accuracy_after": val_after,
                "reused": self.reused,
            }
        )
        return RunResult(
            self.run_dir,
            deltas,
            snap.accuracy,
            final.accuracy,
            val_before,
            val_after,
            result.history,
            list(self.reused),
        )


def _versions() -> dict[str, str]:
    import transformers

    return {
        "roma_vllm": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def run(
    cfg: TuneConfig,
    bars: Bars | None = None,
    echo: Callable[[str], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> RunResult:
    """Run every stage of ``cfg``; see :class:`Pipeline`."""
    return Pipeline(cfg, bars, echo).run(on_epoch_end)
