"""spotlane's data plane: shard runner, inference engines, micro-batching.

torch and transformers are imported lazily, when an engine is first loaded.

``run`` works a job in this process (a laptop, a notebook), like ``spotlane run``:

    from pipeline import Runtime
    from workers import run

    report = run(Runtime.open(), "prompts.parquet", model="./tiny-model", max_tokens=64)
    print(report.status, report.result_url)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.api import JobReport
    from pipeline.runtime import Runtime

__all__ = ["run"]


def run(
    runtime: Runtime,
    input_url: str | None = None,
    model: str | list[str] | None = None,
    *,
    job_id: str | None = None,
    **request: Any,
) -> JobReport:
    """Submit a job (or take ``job_id``), work it in this process until it ends, and return its report.

    ``request`` takes ``pipeline.api.submit``'s keywords (max_tokens, budget_usd, ...).
    """
    from pipeline import api
    from workers.inline import InlineRun

    if job_id is None:
        if input_url is None or model is None:
            raise TypeError("run() needs input_url and model, or job_id")
        job_id = api.submit(runtime, input_url, model, **request)
    InlineRun(runtime, job_id).run()
    return api.job_status(runtime, job_id)
