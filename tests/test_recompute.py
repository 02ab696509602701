"""The recomputed-accuracy check (tests/recompute.py) tolerates near-ties, boundedly."""

from __future__ import annotations

from recompute import MAX_TIE_DISAGREEMENTS, Recomputed


def _rows(n: int, correct: int, ties: int) -> Recomputed:
    return Recomputed([i < correct for i in range(n)], [i < ties for i in range(n)])


def test_exact_accuracy_without_near_ties() -> None:
    r = _rows(50, 20, 0)
    assert r.matches(20 / 50) and r.matches(float(f"{20 / 50:.7g}"))  # float32-reported
    assert not r.matches(21 / 50) and not r.matches(19 / 50)


def test_near_ties_allow_that_many_rows_up_to_the_bound() -> None:
    one = _rows(50, 20, 1)
    assert one.matches(21 / 50) and one.matches(19 / 50)
    assert not one.matches(22 / 50)
    many = _rows(50, 20, 40)  # 40 near-ties: still at most MAX_TIE_DISAGREEMENTS rows
    assert MAX_TIE_DISAGREEMENTS == 2
    assert many.matches(22 / 50) and many.matches(18 / 50)
    assert not many.matches(23 / 50) and not many.matches(17 / 50)
    assert not many.matches(45 / 50)  # was accepted when the tolerance grew with the ties
