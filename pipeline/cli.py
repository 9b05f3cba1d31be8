"""The ``spotlane`` command line: a thin Typer shell over ``pipeline.api``.

Errors print as one line (``error: ...``) with exit status 2 for bad input and 1
for everything else; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline import api, db
from pipeline.render import job_table, progress_bar, summary_line
from pipeline.runtime import Runtime
from schemas.errors import InputError, SpotlaneError
from schemas.settings import load_settings

__all__ = ["app", "main"]

app = typer.Typer(
    name="spotlane",
    help="Run large offline LLM jobs: Parquet of prompts in, Parquet of answers out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The job store (SQL).", no_args_is_help=True)
config_app = typer.Typer(help="Settings.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

EXAMPLE_PROMPTS = Path(__file__).parent / "examples" / "prompts.parquet"
EXAMPLE_ANSWERS = Path(__file__).parent / "examples" / "answers.json"

_STATE: dict[str, Any] = {"config": None, "debug": False}


@app.callback()
def _root(
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="Settings file (TOML). Default: ./spotlane.toml or $SPOTLANE_CONFIG.")
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    _STATE["config"] = config
    _STATE["debug"] = debug


def _runtime() -> Runtime:
    return Runtime.open(_STATE["config"])


InputArg = Annotated[
    str,
    typer.Argument(metavar="INPUT", help="Parquet file of prompts, or a glob or folder of them (path or fsspec URL)."),
]
ModelOpt = Annotated[
    list[str],
    typer.Option("--model", "-m", help="Hugging Face model id, local model folder, or a provider's model name; repeat to accept several (cheapest per shard wins)."),
]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", help="Default max new tokens per row.")]
TempOpt = Annotated[float | None, typer.Option("--temperature", help="Default sampling temperature (0: greedy).")]
ShardOpt = Annotated[int | None, typer.Option("--rows-per-shard", help="Rows per shard.")]
BudgetOpt = Annotated[float | None, typer.Option("--budget", help="Hard budget in USD.")]
DeadlineOpt = Annotated[
    str | None,
    typer.Option("--deadline", help="Finish by: ISO time (2026-11-26T07:00+01:00), HH:MM (next, local) or +DURATION (+90m, +6h)."),
]
TagOpt = Annotated[list[str] | None, typer.Option("--tag", help="key=value, repeatable (routing rules, costs --by tag).")]
TaskOpt = Annotated[str, typer.Option("--task", help="generate (completions) or embed (sentence embeddings).")]


def _deadline(text: str | None) -> datetime | None:
    if not text:
        return None
    text = text.strip()
    try:
        if text.startswith("+"):
            unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[text[-1]]
            return datetime.now(UTC) + timedelta(seconds=float(text[1:-1]) * unit)
        if len(text) <= 5 and ":" in text:
            hour, minute = (int(p) for p in text.split(":"))
            local = datetime.now().astimezone()
            at = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
            return (at if at > local else at + timedelta(days=1)).astimezone(UTC)
        parsed = datetime.fromisoformat(text)
        return (parsed if parsed.tzinfo else parsed.astimezone()).astimezone(UTC)
    except (ValueError, KeyError):
        raise InputError(f"--deadline {text!r} is not a time: use 2026-11-26T07:00, 07:00 or +6h") from None


def _tags(items: list[str] | None) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--tag {item!r} is not key=value")
        tags[key] = value
    return tags


@app.command()
def run(
    input_url: InputArg,
    model: ModelOpt,
    max_tokens: MaxTokensOpt = None,
    temperature: TempOpt = None,
    rows_per_shard: ShardOpt = None,
    budget: BudgetOpt = None,
    deadline: DeadlineOpt = None,
    tag: TagOpt = None,
    task: TaskOpt = "generate",
    output: Annotated[str | None, typer.Option("--output", "-o", help="Also export the results as one Parquet file here.")] = None,
) -> None:
    """Submit a job, work it with an embedded worker, and wait for it to finish."""
    from pipeline.worker_process import spawn_worker, stop_worker

    runtime = _runtime()
    started = time.monotonic()
    job_id = api.submit(
        runtime, input_url, model, max_tokens=max_tokens, temperature=temperature,
        rows_per_shard=rows_per_shard, budget_usd=budget, deadline=_deadline(deadline), tags=_tags(tag),
        task=task,
    )
    err.print(f"job [bold]{job_id}[/bold] submitted")
    log_path = runtime.settings.home / "logs" / f"worker-{job_id}.log"
    worker = spawn_worker(_STATE["config"], log_path)
    try:
        report = _follow(runtime, job_id, worker, log_path)
    finally:
        stop_worker(worker)
    wall = time.monotonic() - started
    console.print(summary_line(report, wall))
    if report.result_url:
        console.print(f"results: {escape(report.result_url)}")
    if output and report.result_url:
        rows = api.export_results(runtime, job_id, output)
        console.print(f"exported {rows} rows to {escape(output)}")
    if report.status in ("failed", "cancelled", "paused"):
        if report.error:
            err.print(f"[red]error:[/red] {escape(report.error)}")
        raise typer.Exit(1)


def _follow(runtime: Runtime, job_id: str, worker: Any, log_path: Path) -> api.JobReport:
    report = api.job_status(runtime, job_id, with_shards=False)
    with progress_bar(err, report.rows_total) as bar:
        task = bar.add_task(job_id, total=report.rows_total, tokens_s="")
        started = time.monotonic()
        while True:
            report = api.job_status(runtime, job_id, with_shards=False)
            elapsed = max(time.monotonic() - started, 1e-6)
            bar.update(task, completed=report.rows_done, tokens_s=f"{report.output_tokens / elapsed:,.0f} tok/s")
            if report.is_final or report.status == "paused":
                return report
            if worker.poll() is not None:
                raise SpotlaneError(
                    f"the embedded worker exited (status {worker.returncode}) before job "
                    f"{job_id} finished; see {log_path}"
                )
            time.sleep(0.25)


@app.command()
def submit(
    input_url: InputArg,
    model: ModelOpt,
    max_tokens: MaxTokensOpt = None,
    temperature: TempOpt = None,
    rows_per_shard: ShardOpt = None,
    budget: BudgetOpt = None,
    deadline: DeadlineOpt = None,
    tag: TagOpt = None,
    task: TaskOpt = "generate",
) -> None:
    """Validate the input, create the job and enqueue it; print the job id."""
    runtime = _runtime()
    job_id = api.submit(
        runtime, input_url, model, max_tokens=max_tokens, temperature=temperature,
        rows_per_shard=rows_per_shard, budget_usd=budget, deadline=_deadline(deadline), tags=_tags(tag),
        task=task,
    )
    console.print(job_id)


@app.command()
def worker(
    queues: Annotated[list[str] | None, typer.Option("--queues", "-Q", help="Queues to consume (repeat). Default: all.")] = None,
    loglevel: Annotated[str, typer.Option("--loglevel", help="Celery log level.")] = "INFO",
    reaper: Annotated[bool, typer.Option("--reaper/--no-reaper", help="Also re-queue work of dead workers.")] = True,
) -> None:
    """Run a worker until stopped (Ctrl-C or SIGTERM drains the shard in hand)."""
    from pipeline.worker_process import run_worker

    runtime = _runtime()
    flat = [q for item in queues or [] for q in item.split(",") if q]
    raise typer.Exit(run_worker(runtime, flat or None, loglevel=loglevel, reaper=reaper))


@app.command()
def scheduler(
    loglevel: Annotated[str, typer.Option("--loglevel", help="Celery log level.")] = "INFO",
) -> None:
    """Run Celery beat: reaper sweeps, scheduled runs, storage lifecycle (one per deployment)."""
    from pipeline.worker_process import run_scheduler

    run_scheduler(_runtime(), loglevel=loglevel)


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(metavar="JOB")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until the job ends.")] = False,
) -> None:
    """A job's state, per-shard progress and counts."""
    runtime = _runtime()
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
def jobs(
    limit: Annotated[int, typer.Option("--limit", "-n")] = 20,
    state: Annotated[str | None, typer.Option("--status", help="Only jobs in this state.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List the newest jobs."""
    rows = api.list_jobs(_runtime(), limit=limit, status=state)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("job", "status", "rows", "failed", "model", "created", box=None)
    for row in rows:
        table.add_row(row["job_id"], row["status"], str(row["rows"]), str(row["rows_failed"]),
                      escape(Path(row["model"]).name), (row["created_at"] or "")[:19])
    console.print(table)


@app.command()
def results(
    job_id: Annotated[str, typer.Argument(metavar="JOB")],
    to: Annotated[str | None, typer.Option("--to", help="Export the results as one Parquet file here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest.")] = False,
) -> None:
    """Where a finished job's results are (or export them to one file)."""
    runtime = _runtime()
    info = api.results(runtime, job_id)
    if to:
        rows = api.export_results(runtime, job_id, to)
        console.print(f"exported {rows} rows to {escape(to)}")
        return
    if as_json:
        console.print_json(json.dumps(info.manifest))
        return
    console.print(f"{escape(info.url)}  ({info.tier} tier)")
    for url in info.files:
        console.print(f"  {escape(url)}")


@app.command()
def example(
    folder: Annotated[Path, typer.Argument(help="Where to write prompts.parquet and tiny-model/.")] = Path("spotlane-example"),
) -> None:
    """Write the example prompts file and build a small local model to run it with.

    No weights can be downloaded offline, so the model is built here: a tokenizer
    and a 1M-parameter Llama fitted for a few seconds to the example's prompts and
    reference answers. It is a demo of the machinery, not a language model.
    """
    import pyarrow.parquet as pq

    from workers.tiny import build_tiny_model

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(EXAMPLE_PROMPTS, folder / "prompts.parquet")
    answers = json.loads(EXAMPLE_ANSWERS.read_text())
    corpus = [f"{row['prompt']} {answers[row['id']]}" for row in pq.read_table(EXAMPLE_PROMPTS).to_pylist()]
    err.print("fitting a tiny model to the example (about 20 seconds on a laptop CPU)...")
    build_tiny_model(folder / "tiny-model", hidden_size=128, corpus=corpus, train_steps=300)
    console.print(f"wrote {folder / 'prompts.parquet'} and {folder / 'tiny-model'}")
    console.print(f"next: spotlane run {folder / 'prompts.parquet'} --model {folder / 'tiny-model'}")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply the Alembic migrations to the configured database."""
    settings = load_settings(_STATE["config"])
    engine = db.engine_for(settings.database.url)
    db.upgrade(engine, revision)
    console.print(f"job store at migration {db.current_revision(engine)}")


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings (secrets masked)."""
    console.print_json(json.dumps(load_settings(_STATE["config"]).masked()))


# Commands about money and job control live in their own module; importing it registers them.
import pipeline.cli_jobs  # noqa: E402,F401
import pipeline.cli_ops  # noqa: E402,F401


def main() -> None:
    """Entry point: run the app, turning ``SpotlaneError`` into one line and an exit code."""
    try:
        # Without standalone mode click returns typer.Exit's code instead of exiting.
        code = app(standalone_mode=False)
    except SpotlaneError as exc:
        if _STATE["debug"]:
            raise
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors and the unexpected
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if _STATE["debug"]:
            raise
        err.print(f"[red]error:[/red] {exc.__class__.__name__}: {escape(str(exc))} (run with --debug for the traceback)")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    # Run the imported module's app, the one pipeline.cli_jobs registered its commands on.
    import pipeline.cli as _cli

    _cli.main()
