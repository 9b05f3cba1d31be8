"""The ``spotlane`` command line: a thin Typer shell over the Python API.

Conventions: ``--config PATH`` and ``--debug`` go anywhere on the line (or
``$SPOTLANE_CONFIG`` / ``SPOTLANE_DEBUG=1``); a job is named by its id, a unique
prefix of it, or ``latest``; errors print as one line (``error: ...``) with exit
status 2 for bad input or usage and 1 for everything else, and ``--debug`` shows
the traceback instead. A bare ``spotlane`` prints the help.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from enum import Enum
from importlib.metadata import PackageNotFoundError, version as package_version
from pathlib import Path
from types import FrameType
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
from schemas.status import JobStatus

__all__ = ["app", "main"]

app = typer.Typer(
    name="spotlane",
    help="Run large offline LLM jobs: Parquet of prompts in, Parquet of answers out.",
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


def _version() -> str:
    try:
        return package_version("spotlane")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="Settings file (TOML). Default: ./spotlane.toml or $SPOTLANE_CONFIG.")
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (or set SPOTLANE_DEBUG=1).")] = False,
    show_version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    _STATE["config"] = config
    _STATE["debug"] = debug or _STATE["debug"]
    if show_version:
        console.print(f"spotlane {_version()}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        console.print(ctx.get_help())
        raise typer.Exit(0)


def _runtime(*, writes: bool = True) -> Runtime:
    """The runtime; a read-only command does not create a job store that is not there."""
    return Runtime.open(_STATE["config"], create=writes)


def _job(runtime: Runtime, ref: str) -> str:
    return api.resolve_job(runtime, ref)


class Task(str, Enum):
    generate = "generate"
    embed = "embed"


InputArg = Annotated[
    str,
    typer.Argument(metavar="INPUT", help="Parquet file of prompts, or a glob or folder of them (path or fsspec URL)."),
]
JobArg = Annotated[str, typer.Argument(metavar="JOB", help="A job id, a unique prefix of one, or 'latest'.")]
ModelOpt = Annotated[
    list[str],
    typer.Option("--model", "-m", help="Hugging Face model id, local model folder, or a provider's model name; repeat to accept several (cheapest per shard wins)."),
]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", help="Default max new tokens per row.")]
TempOpt = Annotated[float | None, typer.Option("--temperature", help="Default sampling temperature, 0 to 5 (0: greedy).")]
ShardOpt = Annotated[int | None, typer.Option("--rows-per-shard", help="Rows per shard.")]
BudgetOpt = Annotated[float | None, typer.Option("--budget", help="Hard budget in USD: provider-billed spend never exceeds it.")]
DeadlineOpt = Annotated[
    str | None,
    typer.Option("--deadline", help="Finish by: ISO time (2026-11-26T07:00+01:00), HH:MM (next, local) or +DURATION (+90m, +6h)."),
]
TagOpt = Annotated[list[str] | None, typer.Option("--tag", help="key=value, repeatable (routing rules, costs --by tag).")]
TaskOpt = Annotated[Task, typer.Option("--task", help="generate (completions) or embed (sentence embeddings).")]


def _deadline(text: str | None) -> datetime | None:
    if not text:
        return None
    text = text.strip()
    try:
        if text.startswith("+"):
            unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[text[-1]]
            at = datetime.now(UTC) + timedelta(seconds=float(text[1:-1]) * unit)
        elif len(text) <= 5 and ":" in text:
            hour, minute = (int(p) for p in text.split(":"))
            local = datetime.now().astimezone()
            at = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
            at = (at if at > local else at + timedelta(days=1)).astimezone(UTC)
        else:
            parsed = datetime.fromisoformat(text)
            at = (parsed if parsed.tzinfo else parsed.astimezone()).astimezone(UTC)
    except (ValueError, KeyError):
        raise InputError(f"--deadline {text!r} is not a time: use 2026-11-26T07:00, 07:00 or +6h") from None
    if at <= datetime.now(UTC):
        raise InputError(f"--deadline {text!r} is in the past ({at:%Y-%m-%d %H:%M} UTC)")
    return at


def _tags(items: list[str] | None) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--tag {item!r} is not key=value")
        tags[key] = value
    return tags


class _Interrupted(BaseException):
    """SIGTERM or SIGHUP reached ``spotlane run`` (Ctrl-C arrives as KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _interrupts() -> Iterator[None]:
    """SIGTERM (a scheduler, a CI cancel, ``timeout``) and SIGHUP (a closed terminal) stop
    ``run`` the way Ctrl-C does, instead of killing it with its work half-said."""

    def raise_it(signum: int, _frame: FrameType | None) -> None:
        raise _Interrupted(signum)

    saved = {s: signal.signal(s, raise_it) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


@contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """This process's log lines (the shard runner's) go to ``path``, not the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved)
        handler.close()


@app.command()
def run(
    input_url: Annotated[str | None, typer.Argument(
        metavar="INPUT", help="Parquet file of prompts, or a glob or folder of them (path or fsspec URL).")] = None,
    model: Annotated[list[str] | None, typer.Option(
        "--model", "-m", help="Hugging Face model id, local model folder, or a provider's model name; "
                              "repeat to accept several (cheapest per shard wins).")] = None,
    max_tokens: MaxTokensOpt = None,
    temperature: TempOpt = None,
    rows_per_shard: ShardOpt = None,
    budget: BudgetOpt = None,
    deadline: DeadlineOpt = None,
    tag: TagOpt = None,
    task: TaskOpt = Task.generate,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Also export the results to this file (.parquet, .csv or .jsonl).")] = None,
    job: Annotated[str | None, typer.Option("--job", help="Work an existing job here instead (resumed if it was stopped).")] = None,
) -> None:
    """Submit a job and work it in this process, with a progress bar, until it ends.

    Ctrl-C, SIGTERM or SIGHUP stop it cleanly: the chunk in hand is committed, the
    job is cancelled with every finished row kept, and `spotlane resume JOB` (or
    `spotlane run --job JOB`) continues it.
    """
    from workers.drain import StopFlag
    from workers.inline import InlineRun

    if output:
        api.check_export_target(output)
    runtime = _runtime()
    started = time.monotonic()
    if job:
        job_id = _job(runtime, job)
        if api.job_status(runtime, job_id, with_shards=False).status in ("cancelled", "failed", "paused"):
            from pipeline.control import resume

            resume(runtime, job_id)
    else:
        if input_url is None or not model:
            raise typer.BadParameter("give INPUT and --model (or --job JOB to work an existing job)")
        job_id = api.submit(
            runtime, input_url, model, max_tokens=max_tokens, temperature=temperature,
            rows_per_shard=rows_per_shard, budget_usd=budget, deadline=_deadline(deadline), tags=_tags(tag),
            task=task.value,
        )
    log_path = runtime.settings.home / "logs" / f"run-{job_id}.log"
    err.print(f"job [bold]{job_id}[/bold] {'continued' if job else 'submitted'} (log: {escape(str(log_path))})")
    stop = StopFlag()
    worker = InlineRun(runtime, job_id, stop)
    thread = threading.Thread(target=worker.run, name="spotlane-run", daemon=True)
    with _log_to(log_path), _interrupts():
        thread.start()
        try:
            report = _follow(runtime, job_id, thread)
        except (KeyboardInterrupt, _Interrupted) as exc:
            signum = exc.signum if isinstance(exc, _Interrupted) else signal.SIGINT
            _stop_run(runtime, job_id, stop, thread, signum)
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


def _stop_run(runtime: Runtime, job_id: str, stop: Any, thread: threading.Thread, signum: int) -> None:
    """Drain (the chunk in hand commits), cancel the job keeping its rows, say how to go on, exit."""
    from pipeline.control import cancel

    name = signal.Signals(signum).name
    err.print(f"\n{name}: finishing the chunk in hand, then stopping (again to stop at once)")
    stop.set()

    def at_once(_signum: int, _frame: FrameType | None) -> None:
        err.print("stopped at once; the shard in hand goes back to the queue when its lease runs out")
        os._exit(128 + signum)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, at_once)
    thread.join()
    report = api.job_status(runtime, job_id, with_shards=False)
    if not report.is_final:
        try:
            cancel(runtime, job_id, reason=f"interrupted: `spotlane run` got {name}")
        except SpotlaneError:
            pass  # finalizing meanwhile: it ends by itself
        report = api.job_status(runtime, job_id, with_shards=False)
    kept = report.rows_done
    if report.is_final and report.status != "cancelled":
        err.print(f"stopped: job {job_id} had already ended ({report.status})")
    else:
        err.print(f"stopped: {kept:,} of {report.rows_total:,} rows kept; `spotlane resume {job_id}` continues "
                  f"(with `spotlane worker`), or `spotlane run --job {job_id}` here")
    raise typer.Exit(128 + signum)


def _follow(runtime: Runtime, job_id: str, thread: threading.Thread) -> api.JobReport:
    report = api.job_status(runtime, job_id, with_shards=False)
    with progress_bar(err, report.rows_total) as bar:
        task = bar.add_task(job_id[-6:], total=report.rows_total, tokens_s="")
        started = time.monotonic()
        while True:
            report = api.job_status(runtime, job_id, with_shards=False)
            elapsed = max(time.monotonic() - started, 1e-6)
            bar.update(task, completed=report.rows_done, tokens_s=f"{report.output_tokens / elapsed:,.0f} tok/s")
            if report.is_final or not thread.is_alive():
                return report
            time.sleep(0.1)


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
    task: TaskOpt = Task.generate,
) -> None:
    """Validate the input, create the job and enqueue it; print the job id."""
    runtime = _runtime()
    job_id = api.submit(
        runtime, input_url, model, max_tokens=max_tokens, temperature=temperature,
        rows_per_shard=rows_per_shard, budget_usd=budget, deadline=_deadline(deadline), tags=_tags(tag),
        task=task.value,
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
    timeout: Annotated[float | None, typer.Option("--timeout", help="Give up after this many seconds (exit 3).")] = None,
) -> None:
    """Wait for a job to end; exit 0 if it succeeded, 1 if not, 3 on timeout."""
    runtime = _runtime(writes=False)
    job_id = _job(runtime, job_id)
    try:
        report = api.wait(runtime, job_id, timeout=timeout)
    except TimeoutError as exc:
        err.print(f"error: {escape(str(exc))}")
        raise typer.Exit(3) from None
    console.print(f"job {job_id} {report.status}: {report.rows_done - report.rows_failed:,} rows ok, "
                  f"{report.rows_failed:,} failed, of {report.rows_total:,}")
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
        table.add_row(row["job_id"], row["status"], str(row["rows"]), str(row["rows_failed"]),
                      escape(Path(row["model"]).name), (row["created_at"] or "")[:16].replace("T", " "))
    if not rows:
        console.print(f"no jobs in {runtime.store_name}", highlight=False, markup=False)
        return
    console.print(table)


@app.command()
def results(
    job_id: JobArg,
    to: Annotated[str | None, typer.Option("--to", help="Export the results to one file: .parquet, .csv or .jsonl.")] = None,
    errors: Annotated[bool, typer.Option("--errors", help="Only the rows that came back with an error.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest.")] = False,
) -> None:
    """Where a finished job's results are, or export them (a stopped job's finished rows too)."""
    runtime = _runtime(writes=False)
    job_id = _job(runtime, job_id)
    if to:
        api.check_export_target(to)
        rows = api.export_results(runtime, job_id, to, errors_only=errors)
        console.print(f"exported {rows} {'error ' if errors else ''}rows to {escape(to)}")
        return
    info = api.results(runtime, job_id)
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

#: Options every command takes, wherever they are written on the line.
_GLOBAL = {"--config": True, "-c": True, "--debug": False}


def _hoist(argv: list[str]) -> list[str]:
    """Move ``--config PATH`` / ``--config=PATH`` / ``-c PATH`` and ``--debug`` to the front,
    where Typer reads them, wherever the user wrote them."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            rest.extend(argv[i:])
            break
        name = word.split("=", 1)[0]
        if name in _GLOBAL:
            if _GLOBAL[name] and "=" not in word and i + 1 < len(argv):
                front += [word, argv[i + 1]]
                i += 2
                continue
            front.append(word)
        else:
            rest.append(word)
        i += 1
    return front + rest


def main() -> None:
    """Entry point: run the app, turning ``SpotlaneError`` into one line and an exit code."""
    argv = _hoist(sys.argv[1:])
    _STATE["debug"] = "--debug" in argv or os.environ.get("SPOTLANE_DEBUG", "").lower() in ("1", "true", "yes")
    try:
        # Without standalone mode click returns typer.Exit's code instead of exiting.
        code = app(argv, prog_name="spotlane", standalone_mode=False)
    except SpotlaneError as exc:
        if _STATE["debug"]:
            raise
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors: a missing argument, a bad option value
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        sys.exit(0 if exc.__class__.__name__ == "NoArgsIsHelpError" else int(getattr(exc, "exit_code", 2)))
    except Exception as exc:  # the unexpected
        if _STATE["debug"]:
            raise
        err.print(f"[red]error:[/red] {exc.__class__.__name__}: {escape(str(exc))} (run with --debug for the traceback)")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    # Run the imported module's app, the one pipeline.cli_jobs registered its commands on.
    import pipeline.cli as _cli

    _cli.main()
