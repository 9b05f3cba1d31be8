"""Commands that read: ``status``, ``wait``, ``logs``, ``jobs`` and ``results``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from pipeline import api
from pipeline.cli.app import JobArg, _job, _runtime, app, console, err
from pipeline.cli.render import job_table
from schemas.status import JobStatus


@app.command()
def status(
    job_id: JobArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until the job ends.")] = False,
) -> None:
    """A job's state, per-shard progress and counts."""
    runtime = _runtime(writes=False)
    job_id = _job(runtime, job_id)
    while True:
        report = api.job_status(runtime, job_id)
        if as_json:
            console.print_json(json.dumps(report.to_dict()))
        else:
            console.print(job_table(report))
        if not watch or report.is_final:
            return
        time.sleep(2)
        if not as_json:
            console.clear()


@app.command()
def wait(
    job_id: JobArg,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Give up after this many seconds (exit 3).")
    ] = None,
) -> None:
    """Wait for a job to end; exit 0 if it succeeded, 1 if not, 3 on timeout."""
    runtime = _runtime(writes=False)
    job_id = _job(runtime, job_id)
    try:
        report = api.wait(runtime, job_id, timeout=timeout)
    except TimeoutError as exc:
        err.print(f"error: {escape(str(exc))}")
        raise typer.Exit(3) from None
    console.print(
        f"job {job_id} {report.status}: {report.rows_done - report.rows_failed:,} rows ok, "
        f"{report.rows_failed:,} failed, of {report.rows_total:,}"
    )
    raise typer.Exit(0 if report.status in ("succeeded", "succeeded_with_errors") else 1)


@app.command()
def logs(
    job_id: JobArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """A job's history from SQL: submitted, routed, every attempt and how it ended, finished."""
    runtime = _runtime(writes=False)
    job_id = _job(runtime, job_id)
    events = api.job_events(runtime, job_id)
    if as_json:
        console.print_json(json.dumps(events))
        return
    for event in events:
        console.print(f"{event['at'][:19].replace('T', ' ')}  {event['what']}", highlight=False, markup=False)
    local = runtime.settings.home / "logs" / f"run-{job_id}.log"
    if local.exists():
        console.print(f"(this machine's log of `spotlane run`: {local})", highlight=False, markup=False)


@app.command()
def jobs(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many, newest first.")] = 20,
    state: Annotated[JobStatus | None, typer.Option("--status", help="Only jobs in this state.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List the newest jobs."""
    runtime = _runtime(writes=False)
    rows = api.list_jobs(runtime, limit=limit, status=state.value if state else None)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(box=None)
    table.add_column("job", no_wrap=True, min_width=22)  # ids are never cut: the columns after them give way
    table.add_column("status", overflow="fold")
    table.add_column("rows", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("model", overflow="fold")
    table.add_column("created", no_wrap=True)
    for row in rows:
        table.add_row(
            row["job_id"],
            row["status"],
            str(row["rows"]),
            str(row["rows_failed"]),
            escape(Path(row["model"]).name),
            (row["created_at"] or "")[:16].replace("T", " "),
        )
    if not rows:
        console.print(f"no jobs in {runtime.store_name}", highlight=False, markup=False)
        return
    console.print(table)


@app.command()
def results(
    job_id: JobArg,
    to: Annotated[
        str | None, typer.Option("--to", help="Export the results to one file: .parquet, .csv or .jsonl.")
    ] = None,
    errors: Annotated[
        str | None,
        typer.Option(
            "--errors", help="Export the rows that came back with an error to this file (alone, or with --to)."
        ),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="parquet, csv or jsonl (default: by the file's extension), or openai: OpenAI's batch output "
            "lines in --to and error lines in --errors.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest.")] = False,
    partial: Annotated[
        bool,
        typer.Option(
            "--partial", help="With --to: the rows committed so far, while the job runs (says which are missing)."
        ),
    ] = False,
) -> None:
    """Where a finished job's results are, or export them (a stopped job's finished rows too,
    a running job's rows so far with --partial)."""
    runtime = _runtime(writes=False)
    job_id = _job(runtime, job_id)
    if partial and not (to or errors):
        raise typer.BadParameter("--partial exports: give --to FILE (or --errors FILE)", param_hint="--partial")
    if to or errors:
        for target in (to, errors):
            if target:
                api.check_export_target(target, fmt)
        exported = api.export_results(runtime, job_id, to, errors_to=errors, fmt=fmt, partial=partial)
        if as_json:
            console.print_json(json.dumps(exported._asdict()))
            return
        if to:
            console.print(f"exported {exported.rows} rows to {escape(to)}")
        if errors:
            console.print(f"exported {exported.errors} error rows to {escape(errors)}")
        if partial and exported.missing:
            spans = ", ".join(f"{a}-{b - 1}" for a, b in exported.missing[:10])
            more = f" and {len(exported.missing) - 10} more ranges" if len(exported.missing) > 10 else ""
            left = sum(b - a for a, b in exported.missing)
            console.print(f"{left} rows not committed yet (input rows {spans}{more})")
        return
    info = api.results(runtime, job_id)
    if as_json:
        console.print_json(json.dumps(info.manifest))
        return
    console.print(f"{escape(info.url)}  ({info.tier} tier)")
    for url in info.files:
        console.print(f"  {escape(url)}")
