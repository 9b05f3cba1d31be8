"""A checkpoint commit on PostgreSQL is one statement after the job lock (``_COMMIT``);
everywhere else it is a statement per write. The two must write the same rows. And
every move that writes the ledger locks the job row first.

On one PostgreSQL job, two shards are claimed with the same reservation and then get
the same random sequence of reservations and commits (some by a worker that is not
the owner, some out of order, some costing more than is held), one shard through each
path. After every step both raise or both commit, and the two shards' counters, their
attempt, their checkpoint rows and their ledger rows are the same.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text

from pipeline.jobs.submit import JobRequest, submit
from pipeline.routing.router import route_job
from pipeline.runtime import Runtime
from pipeline.store import claims, db
from pipeline.store.db import session_scope
from schemas.errors import LeaseLost
from schemas.status import AttemptOutcome, ShardStatus
from schemas.tables import Checkpoint, CostLedgerEntry, Shard, ShardAttempt
from tests.support import write_prompts

pytestmark = pytest.mark.postgres

PER_SHARD = 40

commit = st.tuples(
    st.just("commit"),
    st.integers(1, 6),  # rows
    st.sampled_from([0.0, 0.001, 0.01, 0.2]),  # its actual cost: none, under, around, over what is held
    st.integers(0, 500),  # output tokens
    st.sampled_from([0, 0, 0, 0, -1, 1]),  # where it starts against the resume point
    st.booleans(),  # sent by a worker that is not the owner
)
reserve = st.tuples(st.just("reserve"), st.sampled_from([0.0, 0.005, 0.05, 0.3]))
steps = st.lists(st.one_of(commit, commit, reserve), min_size=1, max_size=12)


@pytest.fixture
def pg_runtime(postgres_url: str) -> Runtime:
    db.upgrade(db.engine_for(postgres_url))
    return Runtime.open(database={"url": postgres_url})


def _rows(runtime: Runtime, shard_id: int, start: int, ledger_after: int) -> dict[str, Any]:
    """What a shard's commits wrote, with the shard's own ids and offsets taken out (its
    ledger rows after ``ledger_after``: the router's reservation is the shard's own)."""
    with session_scope(runtime.engine) as session:
        shard = session.get(Shard, shard_id)
        attempt = session.execute(select(ShardAttempt).where(ShardAttempt.shard_id == shard_id)).scalar_one()
        parts = session.execute(
            select(Checkpoint).where(Checkpoint.shard_id == shard_id).order_by(Checkpoint.first_row)
        ).scalars()
        ledger = session.execute(
            select(CostLedgerEntry)
            .where(CostLedgerEntry.shard_id == shard_id, CostLedgerEntry.id > ledger_after)
            .order_by(CostLedgerEntry.id)
        ).scalars()
        assert shard is not None
        return {
            "shard": [
                getattr(shard, c)
                for c in (
                    "rows_done",
                    "rows_failed",
                    "input_tokens",
                    "output_tokens",
                    "cost_usd",
                    "rows_cached",
                    "saved_usd",
                    "attempts",
                    "lease_owner",
                )
            ],
            "leased_for": round((shard.lease_expires_at - shard.updated_at).total_seconds()),  # type: ignore[operator]
            "attempt": attempt.rows_processed,
            "parts": [
                (
                    p.first_row - start,
                    p.row_count,
                    p.rows_failed,
                    p.input_tokens,
                    p.output_tokens,
                    p.cost_usd,
                    p.attempt,
                )
                for p in parts
            ],
            "ledger": sorted(  # one commit's rows come in either order: one transaction's
                (e.kind.value, round(e.amount_usd, 12), e.input_tokens, e.output_tokens, e.attempt, e.backend)
                for e in ledger
            ),
        }


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(steps=steps)
def test_the_one_statement_commit_writes_what_the_statement_by_statement_commit_writes(
    pg_runtime: Runtime, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, steps: list[tuple[Any, ...]]
) -> None:
    runtime = pg_runtime
    path = write_prompts(tmp_path_factory.mktemp("in") / "in.parquet", 2 * PER_SHARD)
    job_id = submit(runtime, JobRequest(str(path), str(tiny_model), rows_per_shard=PER_SHARD, max_tokens=8))
    route_job(runtime, job_id)
    with session_scope(runtime.engine) as session:
        shards = session.execute(
            select(Shard.id, Shard.row_start, Shard.backend).where(Shard.job_id == job_id).order_by(Shard.shard_index)
        ).all()
    held = []
    for shard_id, start, backend in shards:
        with session_scope(runtime.engine) as session:
            claim = claims.claim_shard(session, shard_id, "owner", 60, str(backend))
        assert claim is not None
        held.append((claim, start))
    with session_scope(runtime.engine) as session:
        ledger_after = session.execute(select(func.max(CostLedgerEntry.id))).scalar_one()
    paths = (claims._commit_in_one_statement, claims._commit_statement_by_statement)
    done = [0, 0]

    for step in steps:
        outcomes: list[object] = []
        for (claim, start), write, i in zip(held, paths, (0, 1), strict=True):
            if step[0] == "reserve":
                with session_scope(runtime.engine) as session:
                    outcomes.append(claims.reserve_chunk(session, claim, step[1])[0])
                continue
            _, rows, cost, tokens, skew, intruder = step
            first = start + done[i] + skew
            stats = claims.CheckpointStats(first, rows, rows // 3, 7 * rows, tokens, cost, f"file:///p/{first}", 1, 0.5)
            who = claims.Claim(**{**claim.__dict__, "worker_id": "intruder"}) if intruder else claim
            try:
                with session_scope(runtime.engine) as session:
                    write(session, who, stats, 90)
            except LeaseLost:
                outcomes.append("lost")
            else:
                done[i] += rows
                outcomes.append("committed")
        assert outcomes[0] == outcomes[1], step
        one, each = (_rows(runtime, claim.shard_id, start, ledger_after) for claim, start in held)
        assert one == each, step


def test_ending_a_shard_takes_the_job_lock_before_the_shards_so_it_cannot_deadlock(
    pg_runtime: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    """Every ledger row updates its job's running total (migration 0012's trigger), so a
    move that writes the ledger must lock the job row before its shard's, as everything
    else does: here another transaction holds the job lock and then updates the shard
    while the owner ends it. Shard first would be a deadlock that PostgreSQL breaks by
    failing one of the two."""
    runtime = pg_runtime
    path = write_prompts(tmp_path / "in.parquet", PER_SHARD)
    job_id = submit(runtime, JobRequest(str(path), str(tiny_model), rows_per_shard=PER_SHARD, max_tokens=8))
    route_job(runtime, job_id)
    with session_scope(runtime.engine) as session:
        shard_id, backend = session.execute(select(Shard.id, Shard.backend).where(Shard.job_id == job_id)).one()
        claim = claims.claim_shard(session, shard_id, "owner", 60, str(backend))
        assert claim is not None
        claims.reserve_chunk(session, claim, 0.5)  # what ending the shard gives back: a ledger row
    ended: list[object] = []

    def end() -> None:
        try:
            with session_scope(runtime.engine) as session:
                ended.append(claims.end_shard(session, claim, ShardStatus.DONE, outcome=AttemptOutcome.DONE))
        except Exception as exc:  # noqa: BLE001  (asserted below)
            ended.append(exc)

    with runtime.engine.connect() as other:
        me = other.execute(text("SELECT pg_backend_pid()")).scalar_one()
        other.execute(text("UPDATE jobs SET updated_at = updated_at WHERE id = :id"), {"id": job_id})
        ender = threading.Thread(target=end)
        ender.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until the owner's transaction waits on a lock
            with runtime.engine.connect() as probe:
                waiting = probe.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> :me"),
                    {"me": me},
                ).scalar_one()
            if waiting:
                break
            time.sleep(0.05)
        assert waiting, "the owner's end_shard never waited on a lock"
        other.execute(text("UPDATE shards SET updated_at = updated_at WHERE id = :id"), {"id": shard_id})
        other.commit()
    ender.join(30)
    assert ended == [True]
