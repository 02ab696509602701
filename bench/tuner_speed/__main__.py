"""``python -m bench.tuner_speed``: build, check, measure every variant, report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import bench.tuner_speed as package
from bench.common import machine, write_json, write_readme_section
from bench.tuner_speed.measure import prepare, run_variants, worker
from bench.tuner_speed.report import readme_section, summarise
from bench.tuner_speed.setup import RESULTS, VARIANTS, Setup


def main(argv: list[str] | None = None) -> int:
    """Build, check, run every (repetition, variant) in a subprocess, report."""
    ap = argparse.ArgumentParser(
        prog="python -m bench.tuner_speed", description=package.__doc__.split("\n\n")[0]
    )
    ap.add_argument("--reps", type=int, default=3, help="Repetitions of each variant.")
    ap.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temp dir).")
    ap.add_argument("--out", type=Path, default=RESULTS, help="Results JSON.")
    ap.add_argument("--no-readme", action="store_true", help="Do not update bench/README.md.")
    ap.add_argument(
        "--render",
        action="store_true",
        help="Only rewrite the README section from the results JSON (--out).",
    )
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    for name, value in asdict(Setup()).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = ap.parse_args(argv)
    s = Setup(**{k: getattr(args, k) for k in asdict(Setup())})

    if args.worker:
        print(json.dumps(worker(args.worker, args.work, s)))
        return 0
    if args.render:
        write_readme_section(readme_section(json.loads(args.out.read_text())))
        return 0

    import torch

    torch.set_num_threads(s.threads)
    started = time.perf_counter()
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"building the model and data in {work} ...", flush=True)
        data = prepare(s, work)
        print(f"objective check (naive vs ours, one batch): {data['objective_check']}", flush=True)
        print(f"set-up took {time.perf_counter() - started:.0f} s", flush=True)
        runs = run_variants(s, work, args.reps)
        if runs is None:
            return 1
    res = {
        "command": "python -m bench.tuner_speed "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "setup": asdict(s),
        "reps": args.reps,
        "data": data,
        "machine": {**info, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "runs": runs,
        "summary": summarise(runs, s),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(args.out, res)
    if not args.no_readme:
        write_readme_section(readme_section(res))
    r = res["summary"]["ratios"]
    print(f"\nours / naive speed:            {r['speed_ours_over_naive']:.2f}x (target >= 2x)")
    print(f"cached / naive speed:          {r['speed_cached_over_naive']:.2f}x (target >= 3x)")
    print(
        f"working memory ours / naive:   {r['working_memory_ours_over_naive']:.2f}x "
        "(target <= 0.5x)"
    )
    print(f"peak RSS ours / naive:         {r['peak_rss_ours_over_naive']:.2f}x")
    print(f"results: {args.out} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
