"""Figures of `roma-tune eval` and `roma-tune report` (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

COLORS = {"base": "#8c8c8c", "tuned": "#1f77b4"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> None:
    from pathlib import Path

    from roma_vllm.deltas import atomic_write

    plt = _pyplot()
    atomic_write(
        Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    )
    plt.close(fig)


def accuracy_bars(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Grouped bars: accuracy per task (and overall), base vs tuned, from an eval report."""
    plt = _pyplot()
    variants = [v for v in ("base", "tuned") if v in report["overall"]]
    tasks = list(report["per_task"])
    labels = [*tasks, "all"] if len(tasks) > 1 else ["all"]
    entries = [report["per_task"][t] for t in tasks] if len(tasks) > 1 else []
    entries.append(report["overall"])
    x = np.arange(len(labels))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 3.8))
    for j, v in enumerate(variants):
        values = [100 * e[v]["accuracy"] for e in entries]
        bars = ax.bar(
            x + (j - (len(variants) - 1) / 2) * width, values, width, label=v, color=COLORS[v]
        )
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(
        x,
        labels,
        rotation=30 if len(labels) > 6 else 0,
        ha="right" if len(labels) > 6 else "center",
    )
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(
        f"{os.path.basename(str(report['model']).rstrip('/'))}: {report['backend']}, "
        f"{report['scoring']} scoring"
    )
    ax.legend(frameon=False)
    fig.tight_layout()
    _save(fig, path)


def usage_heatmaps(
    usage: dict[str, np.ndarray], tasks: Sequence[str], layer: int, path: str | os.PathLike
) -> None:
    """Per-task mean router probability over experts for one layer; one panel per variant.

    ``usage[variant]`` is ``[tasks, experts]``.
    """
    plt = _pyplot()
    variants = list(usage)
    vmax = max(float(u.max()) for u in usage.values()) or 1.0
    fig, axes = plt.subplots(
        1,
        len(variants),
        figsize=(3.2 + 2.8 * len(variants), 1.2 + 0.35 * len(tasks)),
        squeeze=False,
    )
    im = None
    for ax, v in zip(axes[0], variants, strict=True):
        im = ax.imshow(usage[v], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(f"layer {layer}: {v}")
        ax.set_xlabel("expert")
        ax.set_xticks(range(usage[v].shape[1]))
        ax.set_yticks(range(len(tasks)), tasks if ax is axes[0][0] else [""] * len(tasks))
    fig.colorbar(im, ax=axes[0].tolist(), label="mean router probability")
    _save(fig, path)


def pca_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, top-2 principal axes) of the rows of ``x`` (numpy SVD)."""
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    axes = vt[:2]
    if axes.shape[0] < 2:  # fewer samples or features than 2: pad with a zero axis
        axes = np.vstack([axes, np.zeros((2 - axes.shape[0], x.shape[1]))])
    return mean, axes


def routing_projection(
    vectors: dict[str, np.ndarray], tasks: Sequence[str], path: str | os.PathLike
) -> None:
    """Routing vectors projected on the base vectors' first two principal axes, by task.

    One panel per variant, same axes for all, so movement caused by the deltas is visible.
    """
    plt = _pyplot()
    variants = list(vectors)
    mean, axes = pca_fit(vectors[variants[0]])
    names = sorted(set(tasks))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    fig, panels = plt.subplots(
        1,
        len(variants),
        figsize=(4.2 * len(variants) + 1.5, 4.0),
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    labels = np.array(tasks)
    for ax, v in zip(panels[0], variants, strict=True):
        xy = (vectors[v] - mean) @ axes.T
        for c, name in enumerate(names):
            sel = labels == name
            ax.scatter(xy[sel, 0], xy[sel, 1], s=10, alpha=0.7, color=cmap(c % cmap.N), label=name)
        ax.set_title(f"routing vectors: {v}")
        ax.set_xlabel(f"PC1 (of {variants[0]})")
    panels[0][0].set_ylabel(f"PC2 (of {variants[0]})")
    panels[0][-1].legend(frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    _save(fig, path)
