"""``table1.md`` and ``table1_accuracy.png`` from the experiment's record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import ROOT
from bench.table1.summary import ROWS
from roma_vllm.deltas import atomic_write

DETERMINISTIC = ("base", "oracle", "C3PO, last token", "C3PO, all tokens")


def _shown(path: str) -> str:
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_absolute() and p.is_relative_to(ROOT) else path


def _cell(m: float, s: float, row: str) -> str:
    return f"{100 * m:.1f}" if row in DETERMINISTIC else f"{100 * m:.1f} ± {100 * s:.1f}"


def _table(t: dict[str, Any]) -> str:
    tasks = t["tasks"]
    lines = [
        "| condition | " + " | ".join(tasks) + " | average |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for row in ROWS:
        r = t["rows"][row]
        cells = [_cell(*r["per_task"][task], row) for task in tasks]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {_cell(*r['average'], row)} |")
    lines.append("")
    lines.append("Paired by seed (average accuracy, points; 95% t interval over the seeds):")
    lines.append("")
    for d in t["differences"]:
        per = ", ".join(f"{100 * x:+.1f}" for x in d["per_seed"])
        lines.append(
            f"- {d['a']} − {d['b']}: **{100 * d['mean']:+.1f}** "
            f"[{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] (per seed {per})"
        )
    return "\n".join(lines) + "\n"


def _settings(units: list[dict[str, Any]]) -> str:
    lines = []
    for u in units:
        chosen = "; ".join(
            f"{cond}: lr {p['lr']}, lambda {p['lambda']}, epochs {p['epochs']}"
            for cond, p in u["search"]["chosen"].items()
        )
        c3 = u["c3po"]["chosen_lr"]
        held = "all" if u["name"] == "seen" else ", ".join(u["test_tasks"])
        lines.append(
            f"- `{u['name']}` (test: {held}; {u['train_rows']} tuning rows): {chosen}; "
            f"C3PO lr last {c3['last']}, all {c3['all']}"
        )
    return "\n".join(lines)


def _costs(units: list[dict[str, Any]]) -> str:
    lines = []
    for u in units:
        sc = u["c3po"]["scopes"]
        lines.append(
            f"`{u['name']}` last token x{sc['last']['wall_ratio']:.0f} wall / "
            f"x{sc['last']['flop_ratio']:.0f} FLOPs, all tokens x{sc['all']['wall_ratio']:.0f} / "
            f"x{sc['all']['flop_ratio']:.0f}"
        )
    return "; ".join(lines)


def markdown(record: dict[str, Any]) -> str:
    seen = [u for u in record["units"] if u["name"] == "seen"]
    folds = [u for u in record["units"] if u["name"] != "seen"]
    mix = {
        name: {
            sc: sum(u["c3po"]["scopes"][sc]["mix"]["accuracy"] * u["c3po"]["n"] for u in us)
            / sum(u["c3po"]["n"] for u in us)
            for sc in ("last", "all")
        }
        for name, us in (("seen", seen), ("unseen", folds))
    }
    return (
        "# Table 1 in miniature (test split, accuracy %)\n\n"
        f"Model `{_shown(record['model'])}`, data `{_shown(record['data'])}`; seeds "
        f"{record['seeds']} (mean ± std over seeds; base, C3PO and oracle do not depend on the "
        "seed: one value). Every tuned condition is `roma-tune run` (router tuning: `--lambda "
        "0`; dense: `--router-grad dense`) scored once on the test split by `roma-tune eval`; "
        "settings were chosen on the validation split of the tuning families only.\n\n"
        "## Seen tasks: tuned on all eight families\n\n"
        + _table(record["tables"]["seen"])
        + f"\n## Unseen tasks: {len(folds)} folds, each tuned on "
        f"{len(folds[0]['tune_tasks'])} families and scored on the {len(folds[0]['test_tasks'])} "
        "held out\n\n"
        "Each family's accuracy comes from the fold that never saw it (not in tuning, not in "
        "validation, not in C3PO's reference set).\n\n"
        + _table(record["tables"]["unseen"])
        + "\n## Settings and costs\n\n"
        + _settings(record["units"])
        + f"\n\nC3PO: k={record['k']} successful neighbours from the unit's tuning rows "
        f"(tuner embedder, usearch, kernel weights), kernel mix then {record['c3po_steps']} "
        "Adam steps on the neighbours' weighted loss. Kernel mix alone (no steps): seen "
        f"last {100 * mix['seen']['last']:.1f}, all {100 * mix['seen']['all']:.1f}; unseen last "
        f"{100 * mix['unseen']['last']:.1f}, all {100 * mix['unseen']['all']:.1f}. Cost against "
        f"one scoring pass over the same rows: {_costs(record['units'])}.\n\n"
        f"Oracle: {record['oracle']['steps']} Adam steps per sample at lr {record['oracle']['lr']} "
        "with the label (an upper bound for routing alone).\n\n"
        f"Made by `make table1` in {record['minutes']:.0f} min ({record['jobs']} runs at a time).\n"
    )


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 1, figsize=(13, 8), sharey=True)
    for ax, name in zip(axes, ("seen", "unseen"), strict=True):
        t = record["tables"][name]
        labels = [*t["tasks"], "average"]
        x = np.arange(len(labels))
        width = 0.9 / len(ROWS)
        for i, row in enumerate(ROWS):
            r = t["rows"][row]
            means = [r["per_task"][task][0] for task in t["tasks"]] + [r["average"][0]]
            stds = [r["per_task"][task][1] for task in t["tasks"]] + [r["average"][1]]
            ax.bar(x + (i - len(ROWS) / 2 + 0.5) * width, [100 * m for m in means], width,
                   yerr=[100 * s for s in stds], capsize=1.5, label=row)  # fmt: skip
        ax.set_xticks(x, labels, rotation=20, ha="right")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{name} tasks (mean ± std over seeds)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(ROWS), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
