"""``spotlane`` commands for operations: ``storage sweep``, ``schedules``, ``serve`` and ``keys``.

Registered on the app of ``pipeline.cli.app`` when ``pipeline.cli`` imports this module.
"""

from __future__ import annotations

import json
from datetime import date
from typing import Annotated

import typer
from rich.markup import escape

from pipeline import api
from pipeline.cli.app import _STATE, _runtime, _tags, app, config_app, console, db_app
from schemas.errors import InputError
from schemas.settings import load_settings

__all__: list[str] = []

storage_app = typer.Typer(help="Object storage tiers and their lifecycle.", no_args_is_help=True)
schedules_app = typer.Typer(
    help="Scheduled runs: the config's schedules, their last and next runs.", invoke_without_command=True
)
keys_app = typer.Typer(help="Keys of `spotlane serve`: one per tenant, with a budget and tags.", no_args_is_help=True)
app.add_typer(storage_app, name="storage")
app.add_typer(schedules_app, name="schedules")
app.add_typer(keys_app, name="keys")


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


@app.command()
def serve(
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on (serve.host: loopback).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (serve.port: 8000).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Processes (serve.workers: 1).")] = None,
) -> None:
    """Serve OpenAI's Files and Batches API: point an OpenAI client's base_url at http://HOST:PORT/v1.

    Every request needs a key from `spotlane keys create`. Stateless: run as many
    replicas as you like behind a load balancer, over the same job store and storage.
    """
    import uvicorn

    settings = _runtime().settings
    if _STATE["config"]:
        import os

        os.environ["SPOTLANE_CONFIG"] = str(_STATE["config"])  # for the worker processes uvicorn starts
    uvicorn.run(
        "pipeline.serve.app:create_app",
        factory=True,
        host=host or settings.serve.host,
        port=port or settings.serve.port,
        workers=workers or settings.serve.workers,
        log_level="info",
        server_header=False,
    )


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="A name for the key: a team, a service.")],
    budget: Annotated[
        float | None, typer.Option("--budget", help="USD all of the key's batches together may spend.")
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="key=value added to the key's jobs (costs --by tag).")
    ] = None,
    admin: Annotated[bool, typer.Option("--admin", help="The key sees every tenant's files and batches.")] = False,
) -> None:
    """Create a key and print it; only its hash is kept, so it is shown this once."""
    info, secret = api.create_key(_runtime(), name, budget_usd=budget, tags=_tags(tag), admin=admin)
    err = typer.echo
    err(f"created key {info.name} ({info.id}); it is shown once, store it now:", err=True)
    typer.echo(secret)


@keys_app.command("list")
def keys_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Keys, their budgets and what their batches hold and spent (never the keys themselves)."""
    keys = api.list_keys(_runtime(writes=False))
    if as_json:
        console.print_json(
            json.dumps(
                [
                    {
                        "id": k.id,
                        "name": k.name,
                        "prefix": k.prefix,
                        "budget_usd": k.budget_usd,
                        "committed_usd": k.committed_usd,
                        "tags": k.tags,
                        "admin": k.admin,
                        "created_at": k.created_at.isoformat(),
                        "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
                    }
                    for k in keys
                ]
            )
        )
        return
    if not keys:
        console.print("no keys; create one with `spotlane keys create NAME`")
        return
    for k in keys:
        budget = "no budget" if k.budget_usd is None else f"${k.committed_usd:.4f} of ${k.budget_usd:.2f}"
        state = "revoked" if k.revoked_at else ("admin" if k.admin else "live")
        tags = " ".join(f"{a}={b}" for a, b in k.tags.items())
        console.print(f"{escape(k.name)}  {k.prefix}…  {state}  {budget}  {escape(tags)}", highlight=False)


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name (or id).")]) -> None:
    """Revoke a key: its requests are refused from now on; its batches run on."""
    info = api.revoke_key(_runtime(), name)
    console.print(f"revoked {escape(info.name)} ({info.id})")
