"""``python -m bench.realsize``: build or reuse the checkpoint, measure everything, report."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench.realsize as package
import bench.realsize.measure as measure
from bench.common import RESULTS, machine, write_json, write_readme_section
from bench.realsize.build import (
    CACHE,
    SMOKE,
    checkpoint_bytes,
    ensure_checkpoint,
    tuned_layers,
    write_deltas,
    write_prompts,
)
from bench.realsize.history import headline, previous_runs
from bench.realsize.measure import engine_rounds, refused_float32, tune
from bench.realsize.report import GOALS, readme_section, summarise

OUT = RESULTS / "realsize.json"


def prompt_tokens(model: Path, data: Path) -> dict[str, Any]:
    """Rows and prompt lengths as the tuner tokenises them (default letter template)."""
    from transformers import AutoTokenizer

    from tuner.data.prompts import encode
    from tuner.data.sources import load_examples

    examples = load_examples(str(data)).examples
    enc = encode(examples, AutoTokenizer.from_pretrained(model), "letter")
    lengths = [len(e.prompt_ids) for e in enc]
    return {"rows": len(enc), "prompt_tokens": f"{min(lengths)}-{max(lengths)}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.realsize", description=package.__doc__.split("\n\n")[0]
    )
    ap.add_argument("--pairs", type=int, default=6, help="base/roma pairs of vLLM engine starts.")
    ap.add_argument("--cache", type=Path, default=CACHE, help="Where the checkpoint is kept.")
    ap.add_argument("--work", type=Path, default=None, help="Scratch folder (default: temp dir).")
    ap.add_argument("--out", type=Path, default=OUT, help="Results JSON.")
    ap.add_argument("--no-readme", action="store_true", help="Do not update bench/README.md.")
    ap.add_argument(
        "--render",
        action="store_true",
        help="Only summarise the results JSON (--out) again and rewrite the README section.",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="A tiny model of the same layout, to check the benchmark itself in minutes "
        "(results to the work folder, README untouched).",
    )
    args = ap.parse_args(argv)
    if args.render:
        res = summarise(json.loads(args.out.read_text()))
        res["headline"] = headline(res)
        write_json(args.out, res)
        write_readme_section(readme_section(res))
        return 0

    started = time.perf_counter()
    info = machine()
    phases: dict[str, float] = {}
    overrides = None
    if args.smoke:
        overrides, measure.HEAVY_FREE_GIB = SMOKE, 2
        args.cache = args.cache.with_name(args.cache.name + "-smoke")
        args.no_readme = True
        args.out = args.cache.parent / "realsize-smoke.json"
    model, build = ensure_checkpoint(args.cache, overrides)
    phases["checkpoint"] = time.perf_counter() - started
    from roma_vllm.checkpoint import checkpoint_shapes

    shapes = checkpoint_shapes(model)
    ckpt = {
        "path": str(model),
        "bytes": checkpoint_bytes(model),
        "parameters": sum(math.prod(s) for s in shapes.values()),
        "shards": len(list(model.glob("*.safetensors"))),
        "build": build,
    }
    with tempfile.TemporaryDirectory(prefix="realsize-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        deltas = write_deltas(model, work / "deltas.safetensors")
        deltas_info = {"bytes": deltas.stat().st_size, "layers": tuned_layers(model)}
        data = write_prompts(work / "prompts.jsonl")
        data_info = prompt_tokens(model, data)
        log = work / "tune.log"

        print("1/4 float32 run (refused before loading) ...", flush=True)
        t0 = time.perf_counter()
        f32 = refused_float32(model, data, work / "run-f32", log)
        phases["float32"] = time.perf_counter() - t0
        print(f"  exit {f32['returncode']}: {f32['lines'][-1] if f32['lines'] else ''}")

        print(f"2/4 vLLM model load, {args.pairs} base/roma pairs ...", flush=True)
        t0 = time.perf_counter()
        rounds = engine_rounds(model, deltas, args.pairs, work)
        phases["vllm"] = time.perf_counter() - t0

        runs = {}
        for i, cached in enumerate((False, True), 3):
            name = "cached" if cached else "plain"
            print(f"{i}/4 roma-tune run, bf16 ({name}) ...", flush=True)
            t0 = time.perf_counter()
            run_dir = work / f"run-{name}"
            shutil.rmtree(run_dir, ignore_errors=True)  # fresh: no stage taken from a cache
            runs[name] = tune(model, data, run_dir, log, cached)
            phases[f"tune_{name}"] = time.perf_counter() - t0
        if args.work is not None:
            print(f"logs kept in {work}")

    res = {
        "command": "python -m bench.realsize" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {**info, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "goals": GOALS,
        "checkpoint": ckpt,
        "deltas": deltas_info,
        "data": data_info,
        "float32": f32,
        "vllm_rounds": rounds,
        "runs": runs,
        "phase_seconds": {k: round(v, 1) for k, v in phases.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    res["history"] = previous_runs(args.out) if not args.smoke else []
    write_json(args.out, res)  # the raw measurements first: --render summarises them again
    res = summarise(res)
    res["headline"] = headline(res)
    write_json(args.out, res)
    if not args.no_readme:
        write_readme_section(readme_section(res))
    v, t = res["vllm"], res["tune"]
    print(
        f"\nvLLM model load roma/base {v['model_load_s']['ratio_median']:.3f} (goal <= 1.02); "
        f"anonymous memory roma - base {v['extra_anon_bytes'] / 1e6:+.2f} MB; "
        f"tune peak RSS / checkpoint {t['peak_rss_over_checkpoint']['plain']:.2f}x (goal <= 1.2); "
        f"epoch / forward {t['wall']['epoch_over_forward_best']:.2f}x (goal <= 1.5), cached "
        f"{t['wall']['cached_epoch_over_forward_best']:.2f}x (goal <= 1.0); "
        f"{res['seconds'] / 60:.0f} min; results {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
