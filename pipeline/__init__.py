"""spotlane's control plane: submit, shard, route, ledger, finalize, reap, CLI.

It never imports torch or transformers; the data plane lives in ``workers``.
"""

from __future__ import annotations

from pipeline.api import (
    JobReport,
    ResultsInfo,
    export_results,
    job_events,
    job_status,
    list_jobs,
    resolve_job,
    results,
    submit,
    wait,
)
from pipeline.runtime import Runtime

__all__ = [
    "JobReport",
    "ResultsInfo",
    "Runtime",
    "export_results",
    "job_events",
    "job_status",
    "list_jobs",
    "resolve_job",
    "results",
    "submit",
    "wait",
]
