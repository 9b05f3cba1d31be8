"""``spotlane`` commands about money and job control: plan, budget, costs, cancel, resume, retry-errors.

Registered on the same Typer app as ``pipeline.cli`` (which imports this module).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from pipeline.cli import (
    BudgetOpt,
    DeadlineOpt,
    InputArg,
    MaxTokensOpt,
    ModelOpt,
    ShardOpt,
    TagOpt,
    _deadline,
    _runtime,
    _tags,
    app,
    console,
)

__all__: list[str] = []


@app.command()
def plan(
    input_url: InputArg,
    model: ModelOpt,
    budget: BudgetOpt = None,
    deadline: DeadlineOpt = None,
    max_tokens: MaxTokensOpt = None,
    rows_per_shard: ShardOpt = None,
    tag: TagOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Price a job on every backend and show the assignment, cost and finish time; runs nothing."""
    from pipeline.planning import plan as make_plan

    result = make_plan(_runtime(), input_url, model, budget_usd=budget, deadline=_deadline(deadline),
                       max_tokens=max_tokens, rows_per_shard=rows_per_shard, tags=_tags(tag))
    if as_json:
        console.print_json(json.dumps(result.__dict__, default=str))
        return
    table = Table("backend", "kind", "shards", "rows", "est. cost", "est. finish (UTC)", box=None)
    for name, line in sorted(result.by_backend.items()):
        table.add_row(escape(name), line["kind"], str(line["shards"]), f"{line['rows']:,}", f"${line['cost_usd']:.4f}",
                      f"{line['finish']:%Y-%m-%d %H:%M:%S}")
    console.print(table)
    console.print(f"total: {result.rows:,} rows in {result.shards} shards, est. ${result.cost_usd:.4f}, "
                  f"done about {result.finish:%Y-%m-%d %H:%M} UTC" if result.finish else "nothing can run")
    if result.blocked:
        console.print(f"[yellow]{result.blocked} shard(s) would wait: the budget does not cover them[/yellow]")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")


@app.command()
def budget(
    job_id: Annotated[str, typer.Argument(metavar="JOB")],
    usd: Annotated[float, typer.Argument(metavar="USD", help="The job's new budget in USD.")],
) -> None:
    """Set a job's budget; a job paused for money resumes."""
    from pipeline.planning import set_budget

    status = set_budget(_runtime(), job_id, usd)
    console.print(f"job {job_id}: budget ${usd:.4f}, {status}")


@app.command()
def costs(
    job: Annotated[str | None, typer.Option("--job", help="Only this job.")] = None,
    by: Annotated[str, typer.Option("--by", help="backend, day, job or tag")] = "backend",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Spend from the cost ledger, grouped."""
    from pipeline.planning import costs as report

    lines = report(_runtime(), job_id=job, by=by)
    if as_json:
        console.print_json(json.dumps(lines))
        return
    table = Table(by, "cost", "input tokens", "output tokens", box=None)
    for line in lines:
        table.add_row(escape(str(line[by])), f"${line['cost_usd']:.4f}", f"{line['input_tokens']:,}", f"{line['output_tokens']:,}")
    console.print(table)


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(metavar="JOB")]) -> None:
    """Stop a job: no more routing, running shards stop at their next checkpoint."""
    from pipeline.control import cancel as stop

    result = stop(_runtime(), job_id)
    console.print(f"job {job_id} cancelled; {result.rows_kept:,} of {result.rows_total:,} rows are finished and kept "
                  f"(`spotlane resume {job_id}` continues with the rest)")


@app.command()
def resume(job_id: Annotated[str, typer.Argument(metavar="JOB")]) -> None:
    """Continue a cancelled, failed or paused job, redoing only unfinished rows."""
    from pipeline.control import resume as go

    result = go(_runtime(), job_id)
    console.print(f"job {job_id} resumed: {result.rows_total - result.rows_kept:,} rows to go "
                  f"({result.rows_kept:,} already done)")


@app.command("retry-errors")
def retry_errors(job_id: Annotated[str, typer.Argument(metavar="JOB")]) -> None:
    """Re-run only the rows whose output has an error; a new result version replaces them."""
    from pipeline.retry import retry_errors as retry

    child, rows = retry(_runtime(), job_id)
    console.print(f"retrying {rows} row(s) of job {job_id} as job {child}; when it finishes, "
                  f"`spotlane results {job_id}` points at the new version")
    console.print(child)
