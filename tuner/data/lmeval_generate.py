"""What ``roma-tune eval`` needs to judge a ``generate_until`` row (GSM8K) as lm-eval does.

A row of an lm-eval ``generate_until`` task carries a :class:`Generation` (``Example.
generation``): the lm-eval task object, the document, and the request lm-eval would send for
it zero-shot (``construct_requests``: the context and the task's ``generation_kwargs``, whose
``until`` are the stop strings and ``max_gen_toks`` the generation budget; lm-eval's models
use 256 tokens when the task gives none). :meth:`Generation.judge` decides whether a
generated text is correct the way lm-eval's evaluator does: the text goes through each of
the task's filter pipelines (``task._filters``, built from its ``filter_list``; GSM8K:
``strict-match`` and ``flexible-extract``), and each filtered answer through the task's
``process_results(doc, [answer])``, which applies its metrics (GSM8K: ``exact_match`` with
its ``regexes_to_ignore`` and ``ignore_case``). The row counts as correct when the task's
first metric is non-zero under its first filter (GSM8K: ``exact_match`` of ``strict-match``);
every filter's answer and metrics are kept for the report.

Training does not use this: for the tuner the row stays free-form (the reference answer as
completion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's models' default when the task's YAML gives none


@dataclass(frozen=True, eq=False)
class Judgement:
    """lm-eval's verdict on one generated text."""

    correct: bool
    filter: str  # the filter pipeline that decides ``correct``
    metric: str  # the metric that decides ``correct``
    extracted: Any  # the deciding filter's answer
    filters: dict[str, dict[str, Any]]  # per filter: {"extracted": ..., metric: value, ...}


@dataclass(frozen=True, eq=False)
class Generation:
    """An lm-eval ``generate_until`` request and what lm-eval needs to score its answer."""

    task: Any  # the lm-eval task object (its filters and process_results)
    doc: Any  # the processed document
    context: str  # the zero-shot context (the row's prompt)
    until: tuple[str, ...]  # the task's stop strings (lm-eval adds the model's EOS text)
    max_gen_toks: int

    def judge(self, text: str) -> Judgement:
        """Apply the task's filters and ``process_results`` to ``text``, as lm-eval does."""
        from lm_eval.api.instance import Instance

        inst = Instance(
            request_type="generate_until",
            doc=self.doc,
            arguments=(self.context, {"until": list(self.until)}),
            idx=0,
            metadata=(getattr(self.task.config, "task", None), 0, 1),
        )
        inst.resps = [text]
        for ensemble in getattr(self.task, "_filters", None) or []:
            ensemble.apply([inst])
        if not inst.filtered_resps:  # no filters: lm-eval takes the first response
            inst.filtered_resps["none"] = text
        filters: dict[str, dict[str, Any]] = {}
        for name, answer in inst.filtered_resps.items():
            metrics = self.task.process_results(self.doc, [answer])
            filters[name] = {"extracted": answer, **metrics}
        first = next(iter(filters))
        metric = next((k for k in filters[first] if k != "extracted"), None)
        if metric is None:
            raise ValueError(f"task {inst.task_name}: process_results gave no metric")
        value = filters[first][metric]
        return Judgement(bool(value), first, metric, filters[first]["extracted"], filters)


def generation_of(task: Any, doc: Any, ctx: str, name: str) -> Generation:
    """The :class:`Generation` of one ``generate_until`` document (the request lm-eval sends)."""
    request = task.construct_requests(doc=doc, ctx=ctx, metadata=(name, 0, 1))
    if isinstance(request, list):
        request = request[0]
    context, kwargs = request.arguments[0], dict(request.arguments[1] or {})
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    budget = kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", DEFAULT_MAX_GEN_TOKS))
    return Generation(task, doc, context, tuple(str(u) for u in until), int(budget))
