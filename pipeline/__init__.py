"""spotlane's control plane: submit, shard, route, ledger, finalize, reap, CLI.

The public Python API is ``pipeline.api``; its names are importable from here too
(``from pipeline import Runtime, submit, wait``), loaded on first use so that
importing one submodule does not load them all. The control plane never imports
torch, transformers or ``workers`` (the CLI aside, which starts workers).

Subpackages: ``jobs`` (the job-facing operations), ``routing`` (pricing and the
router), ``store`` (SQL: every state move, the ledger, leases), ``storage``
(object storage, inputs, the lifecycle), ``tasks`` (what the control queue runs:
the Celery app, finalizing, the reaper, the scheduler), ``serve`` (the OpenAI Files
and Batches API, tenant keys), ``cli``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.api import (
        EXPORT_FORMATS,
        CostLine,
        Exported,
        JobEvent,
        JobReport,
        JobSpec,
        JobSummary,
        KeyInfo,
        Plan,
        PlanLine,
        ResultsInfo,
        RunReport,
        Runtime,
        ScheduleStatus,
        Stopped,
        SweepReport,
        cancel,
        check_export_target,
        costs,
        create_key,
        export_results,
        job_events,
        job_status,
        list_jobs,
        list_keys,
        list_schedules,
        live_workers,
        plan,
        resolve_job,
        results,
        resume,
        retry_errors,
        revoke_key,
        run_schedule,
        set_budget,
        submit,
        sweep,
        upgrade_store,
        wait,
    )

__all__ = [
    "EXPORT_FORMATS",
    "CostLine",
    "Exported",
    "JobEvent",
    "JobReport",
    "JobSpec",
    "JobSummary",
    "KeyInfo",
    "Plan",
    "PlanLine",
    "ResultsInfo",
    "RunReport",
    "Runtime",
    "ScheduleStatus",
    "Stopped",
    "SweepReport",
    "cancel",
    "check_export_target",
    "costs",
    "create_key",
    "export_results",
    "job_events",
    "job_status",
    "list_jobs",
    "list_keys",
    "list_schedules",
    "live_workers",
    "plan",
    "resolve_job",
    "results",
    "resume",
    "retry_errors",
    "revoke_key",
    "run_schedule",
    "set_budget",
    "submit",
    "sweep",
    "upgrade_store",
    "wait",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
