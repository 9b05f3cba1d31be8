"""Commands that do work: ``run`` (submit and work the job here), ``submit``, ``worker``,
``scheduler`` and ``example``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.markup import escape

from pipeline import api
from pipeline.cli.app import (
    EXAMPLE_ANSWERS,
    EXAMPLE_PROMPTS,
    BudgetOpt,
    ChoicesOpt,
    DeadlineOpt,
    IncrementalOpt,
    InputArg,
    MaxTokensOpt,
    ModelOpt,
    NoCacheOpt,
    RefreshOpt,
    SchemaOpt,
    SchemaRetriesOpt,
    ShardOpt,
    TagOpt,
    Task,
    TaskOpt,
    TempOpt,
    _job,
    _runtime,
    app,
    console,
    err,
    job_spec,
)
from pipeline.cli.render import progress_bar, summary_line
from pipeline.runtime import Runtime
from schemas.errors import SpotlaneError


class Worked:
    """``target`` on a daemon thread of its own, and whether it has ended.

    Waited on through an Event, never ``Thread.join``: before Python 3.13, a signal
    handler that raises (Ctrl-C, our SIGTERM/SIGHUP) while ``join`` waits can leave the
    thread marked as ended while it still runs (the bpo-45274 branch of
    ``Thread._wait_for_tstate_lock`` releases a lock the running thread holds), and every
    later ``join`` returns at once: ``run`` then read the rows kept before the chunk in
    hand had committed.
    """

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(target,), name=name, daemon=True)
        #: What the work raised, for the caller to raise in its own thread (``raise_error``).
        self.error: BaseException | None = None

    def _run(self, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:  # handed to the waiting thread: raised there
            self.error = exc
        finally:
            self._ended.set()

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return not self._ended.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether it has ended, waiting up to ``timeout`` seconds (None: until it does)."""
        return self._ended.wait(timeout)

    def raise_error(self) -> None:
        """Raise here what the work raised, if it did."""
        if self.error is not None:
            raise self.error


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
    input_url: Annotated[
        str | None,
        typer.Argument(
            metavar="INPUT",
            help="Parquet file of prompts, a glob or folder of them, or an OpenAI batch JSONL file "
            "(path or fsspec URL).",
        ),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="Hugging Face model id, local model folder, or a provider's model name; "
            "repeat to accept several (cheapest per shard wins). An OpenAI batch JSONL input's lines name "
            "their own.",
        ),
    ] = None,
    max_tokens: MaxTokensOpt = None,
    temperature: TempOpt = None,
    rows_per_shard: ShardOpt = None,
    budget: BudgetOpt = None,
    deadline: DeadlineOpt = None,
    tag: TagOpt = None,
    task: TaskOpt = Task.generate,
    schema: SchemaOpt = None,
    choices: ChoicesOpt = None,
    schema_retries: SchemaRetriesOpt = 2,
    no_cache: NoCacheOpt = False,
    refresh: RefreshOpt = False,
    incremental: IncrementalOpt = False,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="Also export the results to this file (.parquet, .csv or .jsonl)."),
    ] = None,
    job: Annotated[
        str | None, typer.Option("--job", help="Work an existing job here instead (resumed if it was stopped).")
    ] = None,
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
            api.resume(runtime, job_id)
    else:
        if input_url is None:
            raise typer.BadParameter("give INPUT and --model (or --job JOB to work an existing job)")
        spec = job_spec(
            model,
            max_tokens=max_tokens,
            temperature=temperature,
            rows_per_shard=rows_per_shard,
            budget=budget,
            deadline=deadline,
            tag=tag,
            task=task,
            schema=schema,
            choices=choices,
            schema_retries=schema_retries,
            no_cache=no_cache,
            refresh=refresh,
            incremental=incremental,
        )
        job_id = api.submit(runtime, input_url, announce=False, **spec.options())  # worked here, not sent
    log_path = runtime.settings.home / "logs" / f"run-{job_id}.log"
    err.print(f"job [bold]{job_id}[/bold] {'continued' if job else 'submitted'} (log: {escape(str(log_path))})")
    stop = StopFlag()
    worker = InlineRun(runtime, job_id, stop)
    runner = Worked(worker.run, name="spotlane-run")
    with _log_to(log_path), _interrupts():
        runner.start()
        try:
            report = _follow(runtime, job_id, runner)
        except (KeyboardInterrupt, _Interrupted) as exc:
            signum = exc.signum if isinstance(exc, _Interrupted) else signal.SIGINT
            _stop_run(runtime, job_id, stop, runner, signum)
    runner.raise_error()  # the job as it stands is not its outcome: say what stopped the work
    wall = time.monotonic() - started
    console.print(summary_line(report, wall))
    if report.result_url:
        console.print(f"results: {escape(report.result_url)}")
    if output and report.result_url:
        rows = api.export_results(runtime, job_id, output).rows
        console.print(f"exported {rows} rows to {escape(output)}")
    if report.status in ("failed", "cancelled", "paused"):
        if report.error:
            err.print(f"[red]error:[/red] {escape(report.error)}")
        raise typer.Exit(1)


def _stop_run(runtime: Runtime, job_id: str, stop: Any, runner: Worked, signum: int) -> None:
    """Drain (the chunk in hand commits), cancel the job keeping its rows, say how to go on, exit."""
    name = signal.Signals(signum).name
    err.print(f"\n{name}: finishing the chunk in hand, then stopping (again to stop at once)")
    stop.set()

    def at_once(_signum: int, _frame: FrameType | None) -> None:
        err.print("stopped at once; the shard in hand goes back to the queue when its lease runs out")
        os._exit(128 + signum)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, at_once)
    runner.wait()
    report = api.job_status(runtime, job_id, with_shards=False)
    if not report.is_final:
        try:
            api.cancel(runtime, job_id, reason=f"interrupted: `spotlane run` got {name}")
        except SpotlaneError:
            pass  # finalizing meanwhile: it ends by itself
        report = api.job_status(runtime, job_id, with_shards=False)
    kept = report.rows_done
    if report.is_final and report.status != "cancelled":
        err.print(f"stopped: job {job_id} had already ended ({report.status})")
    else:
        err.print(
            f"stopped: {kept:,} of {report.rows_total:,} rows kept; `spotlane resume {job_id}` continues "
            f"(with `spotlane worker`), or `spotlane run --job {job_id}` here"
        )
    if runner.error is not None:
        err.print(f"[red]error:[/red] while stopping: {runner.error.__class__.__name__}: {escape(str(runner.error))}")
    raise typer.Exit(128 + signum)


def _follow(runtime: Runtime, job_id: str, runner: Worked) -> api.JobReport:
    report = api.job_status(runtime, job_id, with_shards=False)
    with progress_bar(err, report.rows_total) as bar:
        task = bar.add_task(job_id[-6:], total=report.rows_total, tokens_s="")
        started = time.monotonic()
        while True:
            read_at = time.monotonic()
            report = api.job_status(runtime, job_id, with_shards=False)
            reading = time.monotonic() - read_at
            elapsed = max(time.monotonic() - started, 1e-6)
            spent = f", ${report.live.spent_usd:.4f} of ~${report.live.projected_usd:.4f}" if report.live else ""
            bar.update(task, completed=report.rows_done, tokens_s=f"{report.output_tokens / elapsed:,.0f} tok/s{spent}")
            if report.is_final:
                return report
            if not runner.running:  # it may have ended the job after the read above: read again
                return api.job_status(runtime, job_id, with_shards=False)
            # A big job's status read takes longer: read it less often. The wait ends as soon
            # as the runner does (the job is final then, or stopped): no tail after the last row.
            runner.wait(max(0.1, 4 * reading))


@app.command()
def submit(
    input_url: InputArg,
    model: ModelOpt = None,
    max_tokens: MaxTokensOpt = None,
    temperature: TempOpt = None,
    rows_per_shard: ShardOpt = None,
    budget: BudgetOpt = None,
    deadline: DeadlineOpt = None,
    tag: TagOpt = None,
    task: TaskOpt = Task.generate,
    schema: SchemaOpt = None,
    choices: ChoicesOpt = None,
    schema_retries: SchemaRetriesOpt = 2,
    no_cache: NoCacheOpt = False,
    refresh: RefreshOpt = False,
    incremental: IncrementalOpt = False,
) -> None:
    """Validate the input, create the job and enqueue it; print the job id."""
    spec = job_spec(
        model,
        max_tokens=max_tokens,
        temperature=temperature,
        rows_per_shard=rows_per_shard,
        budget=budget,
        deadline=deadline,
        tag=tag,
        task=task,
        schema=schema,
        choices=choices,
        schema_retries=schema_retries,
        no_cache=no_cache,
        refresh=refresh,
        incremental=incremental,
    )
    job_id = api.submit(_runtime(), input_url, **spec.options())
    console.print(job_id)


@app.command()
def worker(
    queues: Annotated[
        list[str] | None, typer.Option("--queues", "-Q", help="Queues to consume (repeat). Default: all.")
    ] = None,
    loglevel: Annotated[str, typer.Option("--loglevel", help="Celery log level.")] = "INFO",
    reaper: Annotated[bool, typer.Option("--reaper/--no-reaper", help="Also re-queue work of dead workers.")] = True,
) -> None:
    """Run a worker until stopped (Ctrl-C or SIGTERM drains the shard in hand)."""
    from workers.process import run_worker

    runtime = _runtime()
    flat = [q for item in queues or [] for q in item.split(",") if q]
    raise typer.Exit(run_worker(runtime, flat or None, loglevel=loglevel, reaper=reaper))


@app.command()
def scheduler(
    loglevel: Annotated[str, typer.Option("--loglevel", help="Celery log level.")] = "INFO",
) -> None:
    """Run Celery beat: reaper sweeps, scheduled runs, storage lifecycle (one per deployment)."""
    from workers.process import run_scheduler

    run_scheduler(_runtime(), loglevel=loglevel)


@app.command()
def example(
    folder: Annotated[Path, typer.Argument(help="Where to write prompts.parquet and tiny-model/.")] = Path(
        "spotlane-example"
    ),
) -> None:
    """Write the example prompts file and build a small local model to run it with.

    No weights can be downloaded offline, so the model is built here: a tokenizer
    and a 1M-parameter Llama fitted for a few seconds to the example's prompts and
    reference answers. It is a demo of the machinery, not a language model.
    """
    import pyarrow.parquet as pq

    from workers.demo_model import build_tiny_model

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(EXAMPLE_PROMPTS, folder / "prompts.parquet")
    answers = json.loads(EXAMPLE_ANSWERS.read_text())
    corpus = [f"{row['prompt']} {answers[row['id']]}" for row in pq.read_table(EXAMPLE_PROMPTS).to_pylist()]
    err.print("fitting a tiny model to the example (about 20 seconds on a laptop CPU)...")
    build_tiny_model(folder / "tiny-model", hidden_size=128, corpus=corpus, train_steps=300)
    console.print(f"wrote {folder / 'prompts.parquet'} and {folder / 'tiny-model'}")
    console.print(f"next: spotlane run {folder / 'prompts.parquet'} --model {folder / 'tiny-model'}")
