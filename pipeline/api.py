"""The Python API: every operation the CLI offers, for notebooks and orchestrators.

    from pipeline import Runtime, submit, wait
    rt = Runtime.open()
    job_id = submit(rt, "prompts.parquet", model="./tiny-model")
    print(wait(rt, job_id).status)

This module only gathers what the subpackages implement (``pipeline.jobs`` for
the job-facing operations, ``pipeline.storage`` for the lifecycle sweep,
``pipeline.tasks`` for schedules, ``pipeline.store`` for the job store,
``pipeline.serve`` for the keys of ``spotlane serve``); the CLI
calls nothing else. ``workers.run`` works a job in this process.
"""

from __future__ import annotations

from typing import Any

from pipeline.jobs import submit as _submit
from pipeline.jobs.control import Stopped, cancel, resume, set_budget
from pipeline.jobs.costs import CostLine, costs
from pipeline.jobs.export import EXPORT_FORMATS, Exported, check_export_target, export_results
from pipeline.jobs.plan import Plan, PlanLine, plan
from pipeline.jobs.queries import (
    JobEvent,
    JobReport,
    JobSummary,
    ResultsInfo,
    job_events,
    job_status,
    list_jobs,
    resolve_job,
    results,
    wait,
)
from pipeline.jobs.retry import retry_errors
from pipeline.runtime import Runtime
from pipeline.serve.keys import KeyInfo, create_key, list_keys, revoke_key
from pipeline.storage.lifecycle import SweepReport, sweep
from pipeline.store import db, presence
from pipeline.tasks.scheduler import RunReport, ScheduleStatus, list_schedules, run_schedule
from schemas.jobspec import JobSpec
from schemas.settings import load_settings as _load_settings

__all__ = [
    # Jobs
    "JobSpec",
    "submit",
    "plan",
    "Plan",
    "PlanLine",
    "cancel",
    "resume",
    "set_budget",
    "Stopped",
    "retry_errors",
    # Reading
    "job_status",
    "JobReport",
    "list_jobs",
    "JobSummary",
    "JobEvent",
    "resolve_job",
    "job_events",
    "wait",
    "costs",
    "CostLine",
    # Results
    "results",
    "ResultsInfo",
    "export_results",
    "Exported",
    "check_export_target",
    "EXPORT_FORMATS",
    # Operations
    "sweep",
    "SweepReport",
    "list_schedules",
    "ScheduleStatus",
    "run_schedule",
    "RunReport",
    "live_workers",
    # spotlane serve's tenants
    "create_key",
    "list_keys",
    "revoke_key",
    "KeyInfo",
    "upgrade_store",
    "Runtime",
]


def submit(runtime: Runtime, input_url: str, model: str | list[str], *, announce: bool = True, **options: Any) -> str:
    """Validate ``input_url``, create the job and enqueue it; return the job id.

    ``options`` are ``schemas.jobspec.JobSpec``'s fields: task, max_tokens,
    temperature, rows_per_shard, budget_usd, deadline (a UTC datetime), tags.
    ``announce=False``: send no message to the workers (the caller works the job).
    """
    return _submit.submit(runtime, _submit.JobRequest(input_url, model, **options), announce=announce)


def live_workers(runtime: Runtime, queue: str | None = None) -> int:
    """How many live workers consume ``queue`` (default: the control queue) now."""
    settings = runtime.settings
    return presence.consumers(runtime.engine, queue or settings.control_queue, settings.worker.reap_interval_seconds)


def upgrade_store(config: str | None = None, revision: str = "head") -> str | None:
    """Apply the job store's migrations up to ``revision``; return the store's revision after."""
    settings = _load_settings(config)
    engine = db.engine_for(settings.database.url)
    db.upgrade(engine, revision)
    return db.current_revision(engine)
