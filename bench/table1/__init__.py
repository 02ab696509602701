"""The paper's Table 1 in miniature, seen and unseen tasks (``python -m bench.table1``).

Conditions: base, router tuning, RoMA, both again with dense router gradients
(``--router-grad dense``), C3PO at the last token and at all prompt tokens
(:mod:`bench.c3po`), and the oracle (:mod:`bench.oracle`). :mod:`bench.table1.folds` makes
the units (seen table, unseen folds), :mod:`bench.table1.runs` runs one unit through the
product's commands, :mod:`bench.table1.summary` pools them into tables,
:mod:`bench.table1.report` writes them.
"""

from bench.table1.runs import evaluate, tune

__all__ = ["evaluate", "tune"]
