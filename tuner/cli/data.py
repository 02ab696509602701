"""`roma-tune data`: check a data spec before a long run (see :mod:`tuner.data.preview`)."""

from __future__ import annotations

import typer

from tuner.cli import options as o


def data_command(
    specs: list[str] = typer.Argument(
        ...,
        metavar="SPEC...",
        help="Sources: FILE (.jsonl/.json/.csv), hf:NAME[:CONFIG]:SPLIT (a slice like "
        "test[:100] works), DIR[:SPLIT] (save_to_disk), lm-eval:TASK[:SPLIT][=LOCAL_COPY]; "
        "SOURCE{question=COL,...} maps columns, SOURCE@N keeps N rows. Several make a mixture.",
    ),
    fields: str | None = typer.Option(
        None,
        "--fields",
        help="Column mapping for every source without its own, e.g. "
        "'question=goal,choices=sol1|sol2,answer=label' (choices: one list column or several "
        "columns joined by |; also task, prompt, completion).",
    ),
    answer_base: int | None = typer.Option(
        None, "--answer-base", help="0 or 1: the number an integer answer column counts from."
    ),
    scoring: str | None = typer.Option(
        None,
        "--scoring",
        help="Render as 'letter' or 'loglik' scoring. Default: loglik with lm-eval rows, else "
        "letter (run's default).",
    ),
    template: str | None = o.TEMPLATE,
    rows: int = typer.Option(3, "--rows", help="Rows to show."),
    model: str | None = typer.Option(
        None, "--model", help="A checkpoint whose tokenizer gives token counts (optional)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed drawing the rows a SOURCE@N cap keeps."),
    limit: int | None = o.LIMIT,
    skip_bad_rows: bool = o.SKIP_BAD_ROWS,
    as_json: bool = typer.Option(False, "--json", help="Print everything as one JSON object."),
) -> None:
    """Show what the tuner will see of SPEC: rows and tasks per source, skipped rows, and the
    first rows as JSON, rendered as they are scored (prompt, choices, gold index)."""
    from tuner.cli.errors import exit_on_user_error

    with exit_on_user_error():
        _main(specs, fields, answer_base, scoring, template, rows, model, seed, limit,
              skip_bad_rows, as_json)  # fmt: skip


def _main(
    specs: list[str],
    fields: str | None,
    answer_base: int | None,
    scoring: str | None,
    template: str | None,
    rows: int,
    model: str | None,
    seed: int,
    limit: int | None,
    skip_bad_rows: bool,
    as_json: bool,
) -> None:
    import json

    from tuner.config import read_template
    from tuner.data.preview import preview
    from tuner.data.sources import DataError
    from tuner.data.spec import with_fields

    if answer_base is not None:
        if answer_base not in (0, 1):
            raise DataError(f"--answer-base: must be 0 or 1, got {answer_base}")
        fields = f"{fields},answer-base={answer_base}" if fields else f"answer-base={answer_base}"
    if scoring is not None and scoring not in ("letter", "loglik"):
        raise DataError(f"--scoring: must be letter or loglik, got {scoring!r}")
    spec = ",".join(specs)
    if fields:
        spec = with_fields(spec, fields)
    tokenizer = None
    if model is not None:
        from transformers import AutoTokenizer

        from roma_vllm.checkpoint import resolve_checkpoint

        tokenizer = AutoTokenizer.from_pretrained(str(resolve_checkpoint(model)))
    report = preview(
        spec, scoring=scoring, template=read_template(template), rows=rows,
        skip_bad_rows=skip_bad_rows, limit=limit, seed=seed, tokenizer=tokenizer,
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    skipped = f", {report['skipped']} bad rows skipped" if report["skipped"] else ""
    free = f", {report['free_form_rows']} free-form" if report["free_form_rows"] else ""
    typer.echo(f"{report['rows']} rows in {len(report['tasks'])} task(s){free}{skipped}")
    for s in report["sources"]:
        capped = f" (of {s['available']})" if s["available"] != s["rows"] else ""
        bad = f", {s['skipped']} skipped" if s["skipped"] else ""
        typer.echo(f"  source {s['name']}: {s['rows']} rows{capped}{bad}  [{s['spec']}]")
    for task, n in report["tasks"].items():
        typer.echo(f"  task {task}: {n}")
    typer.echo(f"first {len(report['first_rows'])} rows ({report['scoring']} scoring):")
    for row in report["first_rows"]:
        typer.echo(json.dumps(row, indent=2, ensure_ascii=False))
    if fields:
        typer.echo(f"use with run/eval/report: --data '{spec}'")
