"""Helpers for tests that drive jobs in this process: a runtime on the stub engine,
a model folder to name, shards run by the real runner, broker sends recorded.

The stub engine (``worker.engine = "stub"``) is a real, selectable engine that
answers without a model, so these tests exercise claims, leases, checkpoints,
budgets and finalizing at the speed of the control plane.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from pipeline.routing.router import route_job
from pipeline.runtime import Runtime
from pipeline.store import db, transitions
from pipeline.store.db import session_scope
from pipeline.store.transitions import run_record
from pipeline.tasks.finalize import finalize_job
from schemas.records import TaskRecord
from schemas.status import JobStatus, LedgerKind, ShardStatus
from schemas.tables import CostLedgerEntry, Job, Shard
from workers.runner import ShardRunner

__all__ = [
    "Sent",
    "job_row",
    "model_folder",
    "provider_runtime",
    "run_queued",
    "shards",
    "stub_runtime",
    "worker_process",
]


def model_folder(tmp_path: Path) -> str:
    """A folder that passes as a model at submit (the stub engine never loads it)."""
    folder = tmp_path / "stub-model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "stub"}))
    return str(folder)


class Sent(list[tuple[str, TaskRecord, str]]):
    """The messages a runtime sent, instead of a broker: a test decides which arrive."""

    def of(self, name: str) -> list[TaskRecord]:
        return [record for sent, record, _ in self if sent == name]


def stub_runtime(
    store_url: str, *, worker: dict[str, Any] | None = None, deliver: bool = False, **overrides: Any
) -> tuple[Runtime, Sent]:
    """A migrated runtime on the stub engine whose sends are recorded, and not
    delivered unless ``deliver`` (then they go to the real broker too). A test that sets
    ``checkpoint_rows`` gets parts of that size throughout (they do not grow with the
    lane's speed) unless it sets ``checkpoint_max_rows`` too."""
    if not store_url.startswith("sqlite"):
        db.upgrade(db.engine_for(store_url))
    worker = {"engine": "stub", **(worker or {})}
    if "checkpoint_rows" in worker:
        worker.setdefault("checkpoint_max_rows", worker["checkpoint_rows"])
    runtime = Runtime.open(database={"url": store_url}, worker=worker, **overrides)
    sent = Sent()
    broker = runtime.send

    def record(name: str, record: TaskRecord, queue: str) -> None:
        sent.append((name, record, queue))
        if deliver:
            broker(name, record, queue)

    runtime.send = record  # type: ignore[method-assign]
    return runtime, sent


def provider_runtime(
    store_url: str,
    url: str,
    *,
    usd_per_1m: float,
    worker: dict[str, Any] | None = None,
    batch: dict[str, Any] | None = None,
    **overrides: Any,
) -> Runtime:
    """``stub_runtime`` with no GPU pool and one paid provider ``prov`` at ``url`` (a local
    OpenAI-compatible server), serving model ``m`` at ``usd_per_1m`` in and out, no retries;
    ``batch``: its batch lane ``prov.batch`` (``[api_providers.batch]``)."""
    os.environ["SPOTLANE_TEST_PROVIDER_KEY"] = "sk-test"
    api = {
        "name": "prov",
        "base_url": url,
        "api_key_env": "SPOTLANE_TEST_PROVIDER_KEY",
        "models": {"m": "remote-m"},
        "input_usd_per_1m": usd_per_1m,
        "output_usd_per_1m": usd_per_1m,
        "max_retries": 0,
        **({"batch": batch} if batch is not None else {}),
    }
    runtime, _ = stub_runtime(
        store_url, gpu_pools=[], api_providers=[api], worker={"checkpoint_rows": 10, **(worker or {})}, **overrides
    )
    return runtime


def shards(runtime: Runtime, job_id: str) -> list[Shard]:
    with session_scope(runtime.engine) as session:
        found = list(session.execute(select(Shard).where(Shard.job_id == job_id).order_by(Shard.shard_index)).scalars())
        for shard in found:
            session.expunge(shard)
        return found


def job_row(runtime: Runtime, job_id: str) -> Job:
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def run_queued(runtime: Runtime, job_id: str, *, finalize: bool = True) -> JobStatus | None:
    """Route the job and run each queued shard with the real runner until none is left."""
    route_job(runtime, job_id)
    runner = ShardRunner(runtime)
    for _ in range(100):
        queued = [s for s in shards(runtime, job_id) if s.status is ShardStatus.QUEUED]
        if not queued:
            break
        for shard in queued:
            with session_scope(runtime.engine) as session:
                record = run_record(session, shard.id)
            runner.run(record)
        route_job(runtime, job_id)
    return finalize_job(runtime, job_id) if finalize else None


def worker_process(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """A real ``spotlane worker`` process (its own settings in ``env``), logging to ``log``."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "worker", *args],
        env={**os.environ, **env},
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,  # noqa: SIM115
    )


def ledger_sum(runtime: Runtime, job_id: str, kind: LedgerKind | None = None) -> float:
    with session_scope(runtime.engine) as session:
        query = select(func.coalesce(func.sum(CostLedgerEntry.amount_usd), 0.0)).where(CostLedgerEntry.job_id == job_id)
        if kind is not None:
            query = query.where(CostLedgerEntry.kind == kind)
        return float(session.execute(query).scalar_one())


def drive_to_the_end(runtime: Runtime, job_id: str, budget: float) -> float:
    """Route and run every shard as workers would, checking the budget after each; the highest reserved + spent."""
    highest = 0.0
    runner = ShardRunner(runtime)
    for _ in range(50):
        route_job(runtime, job_id)
        highest = max(highest, ledger_sum(runtime, job_id))
        queued = [s for s in shards(runtime, job_id) if s.status is ShardStatus.QUEUED]
        if not queued:
            return highest
        for shard in queued:
            with session_scope(runtime.engine) as session:
                record = transitions.run_record(session, shard.id)
            runner.run(record)
            highest = max(highest, ledger_sum(runtime, job_id))
            assert ledger_sum(runtime, job_id, LedgerKind.CHARGE) <= budget + 1e-9
    return highest
