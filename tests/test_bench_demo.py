"""bench.demo: the near-tie count and the range of correct counts it prints, against an
independent computation on handmade per-sample results."""

from __future__ import annotations

import re

import numpy as np

from bench.demo import near_ties, summary
from tuner.evaluate.results import choose, free_form

THRESHOLD = 0.1


def _report(seed: int = 0, n: int = 300) -> tuple[dict, np.ndarray, np.ndarray]:
    """A ``roma-tune eval --json``-shaped report of ``n`` four-choice questions whose scores
    are close enough that many decisions are near-ties; per-sample entries as eval writes
    them (``SampleScore.to_json``). Returns it with the raw scores and labels."""
    rng = np.random.default_rng(seed)
    scores = {v: rng.normal(scale=0.15, size=(n, 4)) for v in ("base", "tuned")}
    labels = rng.integers(0, 4, size=n)
    samples = [
        {"index": i, "label": int(labels[i])}
        | {v: choose(scores[v][i].tolist(), int(labels[i])).to_json() for v in scores}
        for i in range(n)
    ]
    report = {"tolerance": THRESHOLD, "overall": {"changed_predictions": 7}, "samples": samples}
    return report, scores, labels


def _expected(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, int]:
    """The same counts from the raw scores, with numpy: sort each row, compare to the label."""
    order = np.sort(scores, axis=1)[:, ::-1]
    best, second = order[:, 0], order[:, 1]
    label_score = scores[np.arange(len(labels)), labels]
    correct = label_score >= best  # no exact ties in normal draws
    close = best - second < threshold
    return {
        "n": len(labels),
        "correct": int(correct.sum()),
        "near_ties": int(close.sum()),
        "could_lose": int((correct & close).sum()),
        "could_gain": int((~correct & (best - label_score < threshold)).sum()),
    }


def test_near_ties_match_an_independent_count() -> None:
    report, scores, labels = _report()
    got = near_ties(report, THRESHOLD)
    for variant in ("base", "tuned"):
        want = _expected(scores[variant], labels, THRESHOLD)
        assert got[variant] == want
        # the draw is close enough that every kind of count is exercised
        assert want["near_ties"] > want["could_lose"] > 0 and want["could_gain"] > 0


def test_a_larger_threshold_counts_more_ties() -> None:
    report, scores, labels = _report(seed=1)
    small, large = near_ties(report, 0.01)["base"], near_ties(report, 0.3)["base"]
    assert small == _expected(scores["base"], labels, 0.01)
    assert large == _expected(scores["base"], labels, 0.3)
    assert large["near_ties"] > small["near_ties"]


def test_single_choice_and_free_form_rows_are_never_ties() -> None:
    # one choice: margin inf (written as null); free-form: the margin of its greedy steps
    single = choose([-0.5], 0).to_json()
    assert single.get("margin") is None
    free_close = free_form([3, 4], [3, 4], [0.05, 2.0]).to_json()  # correct, margin 0.05
    free_far = free_form([3, 4], [3, 5], [1.0, 0.5]).to_json()  # wrong, margin 0.5
    report = {
        "samples": [
            {"label": 0, "base": single, "tuned": single},
            {"label": None, "base": free_close, "tuned": free_far},
        ]
    }
    got = near_ties(report, THRESHOLD)
    assert got["base"] == dict(n=2, correct=2, near_ties=1, could_lose=1, could_gain=0)
    assert got["tuned"] == dict(n=2, correct=1, near_ties=0, could_lose=0, could_gain=0)


def test_summary_prints_the_measured_counts_the_ties_and_the_range() -> None:
    report, scores, labels = _report(seed=2, n=400)
    lines = summary(report)
    b = _expected(scores["base"], labels, THRESHOLD)
    t = _expected(scores["tuned"], labels, THRESHOLD)
    assert f"base {b['correct'] / 400:.1%} ({b['correct']}/400)" in lines[0]
    assert f"tuned {t['correct'] / 400:.1%} ({t['correct']}/400); 7 predictions changed" in lines[0]
    tie = re.search(r"< ([\d.]+) nats\): base (\d+), tuned (\d+) of 400", lines[1])
    assert tie and float(tie[1]) == THRESHOLD
    assert (int(tie[2]), int(tie[3])) == (b["near_ties"], t["near_ties"])
    lo, hi = b["correct"] - b["could_lose"], b["correct"] + b["could_gain"]
    assert f"base {lo}-{hi} ({lo / 400:.1%}-{hi / 400:.1%})" in lines[1]
    lo, hi = t["correct"] - t["could_lose"], t["correct"] + t["could_gain"]
    assert f"tuned {lo}-{hi} ({lo / 400:.1%}-{hi / 400:.1%})" in lines[1]
