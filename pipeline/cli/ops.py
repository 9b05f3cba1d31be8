"""``spotlane`` commands for operations: ``storage sweep`` and ``schedules``.

Registered on the app of ``pipeline.cli.app`` when ``pipeline.cli`` imports this module.
"""

from __future__ import annotations

import json
from datetime import date
from typing import Annotated

import typer
from rich.markup import escape

from pipeline import api
from pipeline.cli.app import _STATE, _runtime, app, config_app, console, db_app
from schemas.errors import InputError
from schemas.settings import load_settings

__all__: list[str] = []

storage_app = typer.Typer(help="Object storage tiers and their lifecycle.", no_args_is_help=True)
schedules_app = typer.Typer(
    help="Scheduled runs: the config's schedules, their last and next runs.", invoke_without_command=True
)
app.add_typer(storage_app, name="storage")
app.add_typer(schedules_app, name="schedules")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


@storage_app.command("sweep")
def storage_sweep(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what a sweep would do; change nothing.")] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Also retry actions that failed too often.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Move old results warm -> cold, delete old checkpoints and expired results.

    The scheduler runs this every storage.sweep_interval_seconds; an interrupted
    sweep is completed by the next one. Exit status 1 if an action failed.
    """
    report = api.sweep(_runtime(), dry_run=dry_run, retry_failed=retry_failed)
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
    elif report.locked:
        console.print("another sweep is running; nothing done")
    elif not report.actions and not report.deferred:
        console.print("nothing to do")
    else:
        for a in report.actions:
            where = f"{a.source_url} -> {a.target_url}" if a.target_url else a.source_url
            console.print(
                f"{a.status:<10} {a.action:<17} job {a.job_id}  {a.files} files, {_size(a.bytes)}  {where}",
                highlight=False,
                markup=False,
            )
        if report.deferred:
            console.print(f"{report.deferred} more left for the next sweep (storage.sweep_max_seconds)")
        for a in report.failed:
            console.print(f"[red]failed[/red] {a.action} of job {a.job_id}: {escape(a.error or '')}", highlight=False)
    if report.given_up and not as_json:
        console.print(
            f"{report.given_up} failed action(s) are no longer retried; see "
            "`select * from storage_actions where status = 'failed'`, then --retry-failed",
            markup=False,
        )
    if report.failed:
        raise typer.Exit(1)


def _local(iso: str | None) -> str:
    """``2026-11-26T02:00:00+01:00`` -> ``2026-11-26 02:00`` (the schedule's own zone)."""
    return iso[:16].replace("T", " ") if iso else ""


@schedules_app.callback()
def schedules_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List schedules with their next and last run and the last run's job status."""
    if ctx.invoked_subcommand is not None:
        return
    rows = api.list_schedules(_runtime())
    if as_json:
        console.print_json(json.dumps(rows))
        return
    if not rows:
        console.print("no schedules configured (add [[schedules]] to the config)", markup=False)
        return
    for row in rows:
        console.print(
            f"{row['name']}  {row['cron']} ({row['timezone']})" + ("" if row["enabled"] else "  disabled"),
            highlight=False,
            markup=False,
        )
        if row["enabled"]:
            console.print(f"  next run  {_local(row['next_run'])}", highlight=False, markup=False)
        if row["last_run"] is None:
            console.print("  last run  never", highlight=False, markup=False)
            continue
        job = f"  job {row['last_job_id']} ({row['last_job_status']})" if row["last_job_id"] else ""
        console.print(
            f"  last run  {_local(row['last_run'])}  {row['last_run_status']}{job}", highlight=False, markup=False
        )
        if row["last_message"]:
            console.print(f"            {row['last_message']}", highlight=False, markup=False)


@schedules_app.command("run")
def schedules_run(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    on: Annotated[
        str | None,
        typer.Option("--date", help="The run's date, YYYY-MM-DD, in the schedule's time zone (default: today there)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Trigger one run of schedule NAME by hand (at most once per date, like the scheduler)."""
    day = None
    if on:
        try:
            day = date.fromisoformat(on)
        except ValueError:
            raise InputError(f"--date {on!r} is not a date: use YYYY-MM-DD") from None
    report = api.run_schedule(_runtime(), name, day)
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
    elif not report.new:
        console.print(
            f"schedule {name}, run {report.run_date}: already {report.status}"
            + (f" as job {report.job_id}" if report.job_id else "")
            + "; nothing submitted"
        )
    elif report.status == "submitted":
        console.print(f"schedule {name}, run {report.run_date}: submitted job {report.job_id} ({report.input_url})")
    else:
        console.print(f"schedule {name}, run {report.run_date}: {report.status}: {report.message}")
    if report.new and report.status == "failed":
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply the Alembic migrations to the configured database."""
    console.print(f"job store at migration {api.upgrade_store(_STATE['config'], revision)}")


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings (secrets masked)."""
    console.print_json(json.dumps(load_settings(_STATE["config"]).masked()))
