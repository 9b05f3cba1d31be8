"""``spotlane`` commands about money and job control: plan, budget, costs, cancel, resume, retry-errors.

Registered on the app of ``pipeline.cli.app`` when ``pipeline.cli`` imports this module.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from pipeline import api
from pipeline.cli.app import (
    BudgetOpt,
    ChoicesOpt,
    DeadlineOpt,
    InputArg,
    JobArg,
    MaxTokensOpt,
    ModelOpt,
    SchemaOpt,
    ShardOpt,
    TagOpt,
    _job,
    _runtime,
    app,
    console,
    err,
    job_spec,
)
from pipeline.runtime import Runtime

__all__: list[str] = []


class By(str, Enum):
    backend = "backend"
    day = "day"
    job = "job"
    tag = "tag"


def _say_if_nobody_works(runtime: Runtime, job_id: str) -> None:
    """Commands that only enqueue work: say when no worker consumes the queues it goes to."""
    settings = runtime.settings
    if api.live_workers(runtime, settings.control_queue) == 0:
        err.print(
            f"note: no worker consumes the {settings.control_queue!r} queue now; start one with "
            f"`spotlane worker`, or work this job here with `spotlane run --job {job_id}`",
            highlight=False,
        )


@app.command()
def plan(
    input_url: InputArg,
    model: ModelOpt = None,
    budget: BudgetOpt = None,
    deadline: DeadlineOpt = None,
    max_tokens: MaxTokensOpt = None,
    rows_per_shard: ShardOpt = None,
    tag: TagOpt = None,
    schema: SchemaOpt = None,
    choices: ChoicesOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Price a job on every backend and show the assignment, cost and finish time; runs nothing."""
    spec = job_spec(
        model,
        max_tokens=max_tokens,
        rows_per_shard=rows_per_shard,
        budget=budget,
        deadline=deadline,
        tag=tag,
        schema=schema,
        choices=choices,
    )
    result = api.plan(_runtime(), input_url, spec)
    if as_json:
        console.print_json(json.dumps(result.__dict__, default=str))
        return
    table = Table("backend", "kind", "shards", "rows", "est. cost", "est. finish (UTC)", box=None)
    for name, line in sorted(result.by_backend.items()):
        table.add_row(
            escape(name),
            line["kind"],
            str(line["shards"]),
            f"{line['rows']:,}",
            f"${line['cost_usd']:.4f}",
            f"{line['finish']:%Y-%m-%d %H:%M:%S}",
        )
    console.print(table)
    console.print(
        f"total: {result.rows:,} rows in {result.shards} shards, est. ${result.cost_usd:.4f} "
        f"(worst case ${result.worst_case_usd:.4f}), done about {result.finish:%Y-%m-%d %H:%M} UTC"
        if result.finish
        else "nothing can run"
    )
    if result.rows_answered:
        console.print(
            f"{result.rows - result.rows_answered:,} unique requests to send; {result.rows_answered:,} rows are "
            "answered by the answer cache or repeat an earlier row (free, left out of the estimate)"
        )
    if result.blocked:
        console.print(f"[yellow]{result.blocked} shard(s) would wait: the budget does not cover them[/yellow]")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")


@app.command()
def budget(
    job_id: JobArg,
    usd: Annotated[float, typer.Argument(metavar="USD", help="The job's new budget in USD.")],
) -> None:
    """Set a job's budget; a job paused for money resumes."""
    runtime = _runtime()
    job_id = _job(runtime, job_id)
    status = api.set_budget(runtime, job_id, usd)
    console.print(f"job {job_id}: budget ${usd:.4f}, {status}")
    if status == "running":
        _say_if_nobody_works(runtime, job_id)


@app.command()
def costs(
    job: Annotated[str | None, typer.Option("--job", help="Only this job (an id, a prefix or 'latest').")] = None,
    by: Annotated[By, typer.Option("--by", help="Group by backend, day, job or tag.")] = By.backend,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Spend from the cost ledger, grouped."""
    runtime = _runtime(writes=False)
    lines = api.costs(runtime, job_id=_job(runtime, job) if job else None, by=by.value)
    if as_json:
        console.print_json(json.dumps(lines))
        return
    table = Table(by.value, "cost", "input tokens", "output tokens", box=None)
    for line in lines:
        table.add_row(
            escape(str(line[by.value])),
            f"${line['cost_usd']:.4f}",
            f"{line['input_tokens']:,}",
            f"{line['output_tokens']:,}",
        )
    console.print(table)
    for line in lines:
        if line.get(by.value) == "cache" and "saved_usd" in line:
            console.print(f"the answer cache answered {line['rows']:,} rows: ${line['saved_usd']:.4f} saved")


@app.command()
def cancel(job_id: JobArg) -> None:
    """Stop a job: no more routing, running shards stop at their next checkpoint."""
    runtime = _runtime()
    job_id = _job(runtime, job_id)
    result = api.cancel(runtime, job_id)
    console.print(
        f"job {job_id} cancelled; {result.rows_kept:,} of {result.rows_total:,} rows are finished and kept "
        f"so far (a running shard still commits the chunk in hand); `spotlane resume {job_id}` continues "
        "with the rest"
    )


@app.command()
def resume(job_id: JobArg) -> None:
    """Continue a cancelled, failed or paused job, redoing only unfinished rows."""
    runtime = _runtime()
    job_id = _job(runtime, job_id)
    result = api.resume(runtime, job_id)
    console.print(
        f"job {job_id} resumed: {result.rows_total - result.rows_kept:,} rows to go ({result.rows_kept:,} already done)"
    )
    _say_if_nobody_works(runtime, job_id)


@app.command("retry-errors")
def retry_errors(job_id: JobArg) -> None:
    """Re-run only the rows whose output has an error; a new result version replaces them."""
    runtime = _runtime()
    job_id = _job(runtime, job_id)
    child, rows = api.retry_errors(runtime, job_id)
    console.print(
        f"retrying {rows} row(s) of job {job_id} as job {child}; when it finishes, "
        f"`spotlane results {job_id}` points at the new version"
    )
    console.print(child)
    _say_if_nobody_works(runtime, child)
