"""Reporting: the "## Serving" section of bench/README.md from a results record."""

from __future__ import annotations

SECTION = "## Serving"


def markdown(res: dict) -> str:
    """The section: the table of measures and what to make of them."""
    t, lt, ld = res["throughput"], res["load_time"], res["load_test"]
    m, c = res["model"], res["model"]["config"]

    def rows(measure: str, cmp: dict, target: str = "", digits: int = 3) -> list[str]:
        b, m_ = cmp["best"], cmp["median"]
        return [
            f"| {measure}: median of {len(cmp['base'])} | {m_['base']:.{digits}g} | "
            f"{m_['roma']:.{digits}g} | **{cmp['ratio_median']:.3f}** | {target} |",
            f"| {measure}: best of {len(cmp['base'])} | {b['base']:.{digits}g} | "
            f"{b['roma']:.{digits}g} | {cmp['ratio_best']:.3f} | |",
        ]

    batch = f"{t['batch']['prompts']} prompts x {t['batch']['max_tokens']} tokens"
    load = (f"{ld['requests_per_round']} requests x {ld['rounds']} rounds, concurrency "
            f"{ld['concurrency']}, {ld['max_tokens']} tokens")  # fmt: skip
    lines = [
        SECTION,
        "",
        f"`{res['command']}` on {res['machine']} ({res['date']}, {res['total_seconds']:.0f} s "
        f"in all). Model: random {m['architecture']}, {m['parameters_m']}M parameters, "
        f"{m['dtype']}, hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
        f"{c['num_experts']} experts top-{c['num_experts_per_tok']}; deltas on every router "
        f"(greedy outputs "
        f"change: {t['routing_changed']}). Base and roma alternate round by round; the "
        "ratio in bold is the median of the per-round roma / base ratios (each round's pair "
        "ran back to back, under the same load); best-of-N rows show the fastest round of "
        "each. Raw numbers: "
        "[results/serving.json](results/serving.json).",
        "",
        "| measure | base | roma | ratio | target |",
        "|---|---|---|---|---|",
        *rows(f"throughput, `LLM.generate` ({batch}), tok/s", t["tokens_per_s"], ">= 0.99", 4),
        *rows("throughput, tokens per CPU-s of the engine", t["tokens_per_cpu_s"], "", 4),
        f"| loader's own work (read + check the deltas, merge them), ms: median of "
        f"{len(lt['loader_own_work']['seconds'])} | | "
        f"{1000 * lt['loader_own_work']['median_s']:.1f} | "
        f"{100 * lt['loader_own_work']['fraction_of_base_model_load']:.2f} % of the base "
        "model load | <= 2 % |",
        *rows("model load (`get_model`: build, stream + merge, post-process), s",
              lt["model_load_s"], "<= 1.02"),
        *rows("engine start-up (`LLM(...)`, in-process), s", lt["engine_start_s"]),
        f"| load test, `vllm serve` + openai ({load}): completed / failed | "
        f"{ld['base']['completed']} / {ld['base']['failed']} | "
        f"{ld['roma']['completed']} / {ld['roma']['failed']} | | 0 failed |",
        *rows("load test, output tok/s", ld["output_tokens_per_s"], "", 4),
        "",
        "This machine's 2 cores are shared with other jobs, whose load swings single rounds by "
        "up to 5x (CPU time too: the vCPUs themselves are contended); the paired median "
        "absorbs most of that, best-of-N much less (it compares two single lucky rounds), and "
        "repeated runs of this benchmark moved the paired throughput ratio by about 3 %. "
        "Two figures do not depend on that noise. Steady state: the tests show that the "
        "weights served with `--load-format roma` are exactly those of a checkpoint with the "
        "deltas merged in (same router outputs, same tokens and logprobs), so the kernels run "
        "the same work. Loading: the loader times its own work (reading the delta file, "
        "checking names, shapes and fingerprints, one float32 add per router tensor), which "
        "is the plugin's whole extra cost. Run it: `make bench-serve` (about 10 minutes; "
        "`python -m bench.serving --quick` for a smoke run).",
        "",
    ]  # fmt: skip
    return "\n".join(lines)
