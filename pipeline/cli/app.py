"""The Typer app of ``spotlane``, its global options, and the argument types commands share.

Commands live in sibling modules by what they are about (``run``, ``status``,
``control``, ``ops``); ``pipeline.cli`` imports them all, which registers them here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from pipeline import api
from pipeline.runtime import Runtime
from schemas.deadline import parse_deadline
from schemas.errors import InputError
from schemas.jobspec import JobSpec
from schemas.structured import choices_schema

__all__ = ["app", "config_app", "console", "db_app", "err"]

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

EXAMPLE_PROMPTS = Path(__file__).parents[1] / "examples" / "prompts.parquet"
EXAMPLE_ANSWERS = Path(__file__).parents[1] / "examples" / "answers.json"

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
        str | None,
        typer.Option("--config", "-c", help="Settings file (TOML). Default: ./spotlane.toml or $SPOTLANE_CONFIG."),
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
    typer.Argument(
        metavar="INPUT",
        help="Parquet file of prompts, a glob or folder of them, or an OpenAI batch JSONL file (path or fsspec URL).",
    ),
]
JobArg = Annotated[str, typer.Argument(metavar="JOB", help="A job id, a unique prefix of one, or 'latest'.")]
ModelOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model",
        "-m",
        help="Hugging Face model id, local model folder, or a provider's model name; repeat to accept several "
        "(cheapest per shard wins). An OpenAI batch JSONL input's lines name their own.",
    ),
]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", help="Default max new tokens per row.")]
TempOpt = Annotated[
    float | None, typer.Option("--temperature", help="Default sampling temperature, 0 to 5 (0: greedy).")
]
ShardOpt = Annotated[
    int | None,
    typer.Option(
        "--rows-per-shard",
        help="Rows per shard (default: jobs.rows_per_shard, bigger where the job would pass jobs.max_shards).",
    ),
]
BudgetOpt = Annotated[
    float | None, typer.Option("--budget", help="Hard budget in USD: provider-billed spend never exceeds it.")
]
DeadlineOpt = Annotated[
    str | None,
    typer.Option(
        "--deadline", help="Finish by: ISO time (2026-11-26T07:00+01:00), HH:MM (next, local) or +DURATION (+90m, +6h)."
    ),
]
TagOpt = Annotated[
    list[str] | None, typer.Option("--tag", help="key=value, repeatable (routing rules, costs --by tag).")
]
TaskOpt = Annotated[Task, typer.Option("--task", help="generate (completions) or embed (sentence embeddings).")]
SchemaOpt = Annotated[
    Path | None,
    typer.Option(
        "--schema",
        help="JSON Schema file every answer must follow (constrained decoding); an answer that still "
        "fails it is an error row.",
    ),
]
ChoicesOpt = Annotated[
    str | None, typer.Option("--choices", help="a,b,c: answer with exactly one of these labels (classification).")
]
SchemaRetriesOpt = Annotated[
    int,
    typer.Option("--schema-retries", help="API lanes: re-ask an answer that fails the schema up to N times."),
]
NoCacheOpt = Annotated[
    bool, typer.Option("--no-cache", help="Ask every row, even those the answer cache holds; keep nothing.")
]
RefreshOpt = Annotated[
    bool, typer.Option("--refresh", help="Ask every row again and replace what the answer cache holds.")
]
IncrementalOpt = Annotated[
    bool,
    typer.Option("--incremental", help="Ask only rows not answered before (the cache on, whatever the config says)."),
]


def _deadline(text: str | None) -> datetime | None:
    """``--deadline``, in ``schemas.deadline``'s grammar; a time in the past is refused."""
    try:
        at = parse_deadline(text or "")
    except ValueError as exc:
        raise InputError(f"--deadline: {exc}") from None
    if at is not None and at <= datetime.now(UTC):
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


def job_spec(
    model: list[str] | None,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    rows_per_shard: int | None = None,
    budget: float | None = None,
    deadline: str | None = None,
    tag: list[str] | None = None,
    task: Task = Task.generate,
    schema: Path | None = None,
    choices: str | None = None,
    schema_retries: int = 2,
    no_cache: bool = False,
    refresh: bool = False,
    incremental: bool = False,
) -> JobSpec:
    """The job options of a command line, as the one ``JobSpec`` (refused naming the option)."""
    if schema is not None and choices is not None:
        raise InputError("give --schema or --choices, not both")
    response_schema: str | dict[str, Any] | None = None
    if schema is not None:
        try:
            response_schema = schema.read_text()
        except OSError as exc:
            raise InputError(f"--schema {schema}: {exc.strerror or exc}") from None
    elif choices is not None:
        response_schema = choices_schema(choices.split(","))
    return JobSpec(
        response_schema=response_schema,
        schema_retries=schema_retries,
        use_cache=not no_cache,
        refresh_cache=refresh,
        incremental=incremental,
        model=model or [],
        max_tokens=max_tokens,
        temperature=temperature,
        rows_per_shard=rows_per_shard,
        budget_usd=budget,
        deadline=_deadline(deadline),
        tags=_tags(tag),
        task=task.value,
    )
