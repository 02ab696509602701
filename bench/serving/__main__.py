"""``python -m bench.serving``: build the model and deltas, measure, report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import bench.serving as package
from bench.common import machine, machine_summary, write_json, write_readme_section
from bench.serving.measure import bench_load_test, bench_load_time, bench_throughput
from bench.serving.report import markdown
from bench.serving.setup import DTYPE, MODEL_CONFIG, QUICK_CONFIG, RESULTS, build


def main(argv: list[str] | None = None) -> int:
    """Parse the options, build, measure, write the results and the README section."""
    ap = argparse.ArgumentParser(
        prog="python -m bench.serving", description=package.__doc__.split("\n\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="small model, few rounds: smoke test")
    ap.add_argument("--rounds", type=int, default=24, help="throughput rounds per variant")
    ap.add_argument("--load-pairs", type=int, default=8, help="load-time starts per variant")
    ap.add_argument("--requests", type=int, default=48, help="load-test requests per round")
    ap.add_argument("--concurrency", type=int, default=16, help="load-test concurrent requests")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    ap.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    ap.add_argument(
        "--from-json", type=Path, help="only rewrite bench/README.md from this results file"
    )
    args = ap.parse_args(argv)
    if args.from_json:
        write_readme_section(markdown(json.loads(args.from_json.read_text())))
        return 0
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    config = QUICK_CONFIG if args.quick else MODEL_CONFIG
    rounds, pairs, requests = (
        (2, 1, 16) if args.quick else (args.rounds, args.load_pairs, args.requests)
    )
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="roma-bench-") as tmp:
        tmp_path = Path(tmp)
        print("building the benchmark model ...", flush=True)
        model, deltas, n_params = build(tmp_path, config)
        phases: dict[str, float] = {"build": time.perf_counter() - t_start}
        print("1/3 throughput ...", flush=True)
        t0 = time.perf_counter()
        throughput = bench_throughput(str(model), deltas, rounds, 8, 16)
        phases["throughput"] = time.perf_counter() - t0
        print("2/3 load time ...", flush=True)
        t0 = time.perf_counter()
        load_time = bench_load_time(str(model), deltas, pairs)
        phases["load_time"] = time.perf_counter() - t0
        print("3/3 load test ...", flush=True)
        t0 = time.perf_counter()
        load_rounds = 2 if args.quick else 4
        load_test = bench_load_test(
            str(model), deltas, load_rounds, requests, args.concurrency, 32, tmp_path
        )
        phases["load_test"] = time.perf_counter() - t0
    details = machine()
    res = {
        "command": "python -m bench.serving" + (" --quick" if args.quick else ""),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_summary(details, ("vllm",)),
        "machine_details": details,
        "model": {
            "architecture": "OlmoeForCausalLM",
            "dtype": DTYPE,
            "config": config,
            "parameters_m": round(n_params / 1e6, 1),
        },
        "throughput": throughput,
        "load_time": load_time,
        "load_test": load_test,
        "targets": {"throughput_ratio_min": 0.99, "load_overhead_max": 0.02, "failed": 0},
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "phase_seconds": {k: round(v, 1) for k, v in phases.items()},
    }
    write_json(args.out, res)
    table = markdown(res)
    if not args.no_readme:
        write_readme_section(table)
    print("\n" + table)
    print(
        f"throughput ratio {throughput['tokens_per_s']['ratio_median']:.3f} (median of "
        f"{rounds} paired rounds; best-of-N {throughput['tokens_per_s']['ratio_best']:.3f}; "
        f"target >= 0.99); model-load time ratio {load_time['model_load_s']['ratio_median']:.3f}"
        f" (median of {pairs} pairs); loader's own work "
        f"{1000 * load_time['loader_own_work']['median_s']:.1f} ms = "
        f"{100 * load_time['loader_own_work']['fraction_of_base_model_load']:.2f} % of the base "
        "model load (target <= 2 %); load test "
        f"failed: base {load_test['base']['failed']}, roma {load_test['roma']['failed']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
