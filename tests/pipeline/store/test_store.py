"""Job-store contract tests, run on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text, update

from pipeline.jobs.submit import JobRequest, submit
from pipeline.runtime import Runtime
from pipeline.store import claims, db
from pipeline.store.db import session_scope
from pipeline.tasks.reaper import reap
from schemas.base import utcnow
from schemas.errors import LeaseLost
from schemas.status import AttemptOutcome, JobStatus, ShardStatus
from schemas.tables import Checkpoint, Job, Shard, ShardAttempt
from tests.support import race, write_prompts


def _job(runtime: Runtime, tmp_path: Path, tiny_model: Path, rows: int = 10, per_shard: int = 5) -> str:
    path = write_prompts(tmp_path / "in.parquet", rows)
    return submit(runtime, JobRequest(str(path), str(tiny_model), rows_per_shard=per_shard))


def _queue_all(runtime: Runtime, job_id: str) -> list[int]:
    from pipeline.routing.router import route_job

    route_job(runtime, job_id)
    with session_scope(runtime.engine) as session:
        return list(
            session.execute(select(Shard.id).where(Shard.job_id == job_id).order_by(Shard.shard_index)).scalars()
        )


def _stats(claim: claims.Claim, first: int, count: int) -> claims.CheckpointStats:
    return claims.CheckpointStats(first, count, 0, 10, 20, 0.0, f"file:///parts/{first}")


def test_migrations_create_every_table_and_the_progress_view(runtime: Runtime) -> None:
    names = set(inspect(runtime.engine).get_table_names())
    views = set(inspect(runtime.engine).get_view_names())

    assert {"jobs", "shards", "shard_attempts", "checkpoints", "cost_ledger", "alembic_version"} <= names
    assert "job_progress" in views
    assert db.current_revision(runtime.engine) == db.head_revision()


def test_the_head_every_command_checks_is_alembics_own() -> None:
    from alembic.script import ScriptDirectory

    # migrations.HEAD spares each command Alembic's import; a new migration must move it.
    assert db.head_revision() == ScriptDirectory(str(db.MIGRATIONS_DIR)).get_current_head()


def test_an_empty_store_has_no_revision(tmp_path: Path) -> None:
    assert db.current_revision(db.engine_for(f"sqlite:///{tmp_path / 'empty.db'}")) is None


def test_migrations_downgrade_to_nothing_and_back(runtime: Runtime) -> None:
    from alembic import command

    cfg = db._alembic_config(runtime.engine)
    with runtime.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert "jobs" not in inspect(runtime.engine).get_table_names()
    db.upgrade(runtime.engine)
    assert "jobs" in inspect(runtime.engine).get_table_names()


def test_submit_writes_the_job_and_its_shards_as_row_ranges(runtime: Runtime, tmp_path: Path, tiny_model: Path) -> None:
    job_id = _job(runtime, tmp_path, tiny_model, rows=12, per_shard=5)

    with runtime.engine.connect() as conn:
        shards = conn.execute(
            text("select row_start, row_end, status from shards where job_id = :id order by shard_index"),
            {"id": job_id},
        ).all()
        progress = conn.execute(text("select rows_total, shards_total, percent_done from job_progress")).one()
    assert [tuple(s) for s in shards] == [(0, 5, "pending"), (5, 10, "pending"), (10, 12, "pending")]
    assert tuple(progress) == (12, 3, 0.0)


def test_a_job_that_names_no_shard_size_has_at_most_max_shards(
    store_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    """At 1,000 rows a shard, 10M rows were 10,000 shards: routed one at a time, each at
    least one part for the finalizer to read. A shard size the submitter names is kept."""
    if not store_url.startswith("sqlite"):
        db.upgrade(db.engine_for(store_url))
    runtime = Runtime.open(database={"url": store_url}, jobs={"rows_per_shard": 5, "max_shards": 4})
    big, small = write_prompts(tmp_path / "big.parquet", 30), write_prompts(tmp_path / "small.parquet", 12)

    def ranges(job_id: str) -> list[tuple[int, int]]:
        with session_scope(runtime.engine) as session:
            job = session.get(Job, job_id)
            assert job is not None and job.shard_count == len(job.shards)
            return [(s.row_start, s.row_end) for s in sorted(job.shards, key=lambda s: s.shard_index)]

    grown = submit(runtime, JobRequest(str(big), str(tiny_model)))
    assert ranges(grown) == [(0, 8), (8, 16), (16, 24), (24, 30)]  # 30 rows in 4 shards, not 6
    asked = submit(runtime, JobRequest(str(big), str(tiny_model), rows_per_shard=5))
    assert ranges(asked) == [(i, i + 5) for i in range(0, 30, 5)]
    default = submit(runtime, JobRequest(str(small), str(tiny_model)))
    assert ranges(default) == [(0, 5), (5, 10), (10, 12)]  # under max_shards: rows_per_shard


def test_only_one_of_many_concurrent_claims_wins(runtime: Runtime, tmp_path: Path, tiny_model: Path) -> None:
    job_id = _job(runtime, tmp_path, tiny_model)
    shard_id = _queue_all(runtime, job_id)[0]

    def claim(n: int) -> str | None:
        with session_scope(runtime.engine) as session:
            return f"w{n}" if claims.claim_shard(session, shard_id, f"w{n}", 60, "local") else None

    winners = [w for w in race(*(partial(claim, n) for n in range(6))) if w]

    assert len(winners) == 1
    with session_scope(runtime.engine) as session:
        shard = session.get(Shard, shard_id)
        assert shard is not None and shard.lease_owner == winners[0] and shard.attempts == 1
        assert session.get(Job, job_id).status is JobStatus.RUNNING  # type: ignore[union-attr]


def test_a_checkpoint_commits_only_for_the_lease_holder_and_in_order(
    runtime: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    job_id = _job(runtime, tmp_path, tiny_model)
    shard_id = _queue_all(runtime, job_id)[0]
    with session_scope(runtime.engine) as session:
        claim = claims.claim_shard(session, shard_id, "owner", 60, "local")
    assert claim is not None
    intruder = claims.Claim(**{**claim.__dict__, "worker_id": "intruder"})

    with session_scope(runtime.engine) as session:
        claims.commit_checkpoint(session, claim, _stats(claim, 0, 2), 60)
    with pytest.raises(LeaseLost), session_scope(runtime.engine) as session:
        claims.commit_checkpoint(session, intruder, _stats(claim, 2, 2), 60)
    with pytest.raises(LeaseLost), session_scope(runtime.engine) as session:
        claims.commit_checkpoint(session, claim, _stats(claim, 0, 2), 60)  # the same part again
    with pytest.raises(LeaseLost), session_scope(runtime.engine) as session:
        claims.commit_checkpoint(session, claim, _stats(claim, 3, 2), 60)  # a gap

    with session_scope(runtime.engine) as session:
        shard = session.get(Shard, shard_id)
        parts = session.execute(select(Checkpoint.first_row).where(Checkpoint.shard_id == shard_id)).scalars().all()
    assert shard is not None and shard.rows_done == 2 and shard.output_tokens == 20
    assert parts == [0]


def test_the_reaper_requeues_an_expired_lease_and_records_the_attempt_as_lost(
    runtime: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    job_id = _job(runtime, tmp_path, tiny_model)
    shard_id = _queue_all(runtime, job_id)[0]
    with session_scope(runtime.engine) as session:
        claim = claims.claim_shard(session, shard_id, "otherhost:1:abc", 60, "local")
        assert claim is not None
        claims.commit_checkpoint(session, claim, _stats(claim, 0, 3), 60)
    with session_scope(runtime.engine) as session:
        session.execute(
            update(Shard).where(Shard.id == shard_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )

    report = reap(runtime)

    assert report.expired == 1
    with session_scope(runtime.engine) as session:
        shard = session.get(Shard, shard_id)
        attempt = session.execute(select(ShardAttempt).where(ShardAttempt.shard_id == shard_id)).scalar_one()
    assert shard is not None and shard.status is ShardStatus.QUEUED and shard.rows_done == 3
    assert attempt.outcome is AttemptOutcome.LOST
    with session_scope(runtime.engine) as session:  # and the next claim resumes from the checkpoint
        again = claims.claim_shard(session, shard_id, "next", 60, "local")
    assert again is not None and again.rows_done == 3 and again.attempt == 2


def test_a_live_lease_is_left_alone_by_the_reaper(runtime: Runtime, tmp_path: Path, tiny_model: Path) -> None:
    job_id = _job(runtime, tmp_path, tiny_model)
    shard_id = _queue_all(runtime, job_id)[0]
    with session_scope(runtime.engine) as session:
        assert claims.claim_shard(session, shard_id, "otherhost:1:abc", 60, "local")

    assert reap(runtime).expired == 0
    with session_scope(runtime.engine) as session:
        assert session.get(Shard, shard_id).status is ShardStatus.RUNNING  # type: ignore[union-attr]


def test_ending_a_shard_charges_the_ledger(runtime: Runtime, tmp_path: Path, tiny_model: Path) -> None:
    job_id = _job(runtime, tmp_path, tiny_model)
    shard_id = _queue_all(runtime, job_id)[0]
    with session_scope(runtime.engine) as session:
        claim = claims.claim_shard(session, shard_id, "w", 60, "local")
        assert claim is not None
        claims.commit_checkpoint(session, claim, claims.CheckpointStats(0, 5, 1, 50, 70, 0.25, "file:///p"), 60)
    with session_scope(runtime.engine) as session:
        assert claims.end_shard(session, claim, ShardStatus.DONE, outcome=AttemptOutcome.DONE)

    with runtime.engine.connect() as conn:
        charged = conn.execute(
            text("select sum(amount_usd), sum(output_tokens) from cost_ledger where job_id = :id and kind = 'charge'"),
            {"id": job_id},
        ).one()
    assert tuple(charged) == (0.25, 70)


def _queued_messages(runtime: Runtime) -> int:
    return len(list((runtime.settings.broker_folder / "queue").glob("*.msg")))


def test_the_reaper_sends_a_shard_again_when_its_message_was_lost(
    runtime: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    job_id = _job(runtime, tmp_path, tiny_model)
    shard_id = _queue_all(runtime, job_id)[0]
    with session_scope(runtime.engine) as session:
        session.execute(update(Shard).where(Shard.id == shard_id).values(queued_at=utcnow() - timedelta(hours=2)))
    healthy = reap(runtime)
    lost = sorted((runtime.settings.broker_folder / "queue").glob("*gpu.local.msg"))[0]
    lost.unlink()  # the broker loses one message (a worker killed between fetch and claim)
    before = _queued_messages(runtime)

    first, second = reap(runtime), reap(runtime)

    assert healthy.resent == 0  # the broker still had every message: nothing resent
    assert (first.resent, second.resent) == (1, 0)  # once, not on every sweep
    assert _queued_messages(runtime) == before + 1


def test_a_job_whose_routing_message_was_lost_is_routed_by_the_reaper(
    runtime: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    job_id = _job(runtime, tmp_path, tiny_model)
    with session_scope(runtime.engine) as session:
        session.execute(update(Job).where(Job.id == job_id).values(created_at=utcnow() - timedelta(minutes=5)))

    assert reap(runtime).rerouted == 1
    assert reap(runtime).rerouted == 1  # still pending: routing is idempotent, so it is safe to ask again


def test_the_migrations_build_exactly_the_models(runtime: Runtime) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from schemas.base import Base

    with runtime.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)

    assert diff == []


def test_the_job_row_keeps_its_ledgers_sum_whoever_writes_the_ledger(
    runtime: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    """Budget checks read ``jobs.committed_usd``; the database keeps it (migration 0012's
    triggers) on inserts, updates and deletes of ledger rows, ours or anyone's."""
    job_id = _job(runtime, tmp_path, tiny_model)
    shard_id = _queue_all(runtime, job_id)[0]
    with session_scope(runtime.engine) as session:
        claim = claims.claim_shard(session, shard_id, "w", 60, "local")
        assert claim is not None
        claims.reserve_chunk(session, claim, 0.5)
        claims.commit_checkpoint(session, claim, claims.CheckpointStats(0, 5, 1, 50, 70, 0.2, "file:///p"), 60)

    def kept_and_summed() -> tuple[float, float]:
        with runtime.engine.connect() as conn:
            kept = conn.execute(text("select committed_usd from jobs where id = :id"), {"id": job_id}).scalar_one()
            summed = conn.execute(
                text("select coalesce(sum(amount_usd), 0) from cost_ledger where job_id = :id"), {"id": job_id}
            ).scalar_one()
        return float(kept), float(summed)

    kept, summed = kept_and_summed()
    assert kept == pytest.approx(summed) and summed == pytest.approx(0.5)  # 0.5 held, 0.2 of it spent
    with runtime.engine.begin() as conn:
        conn.execute(
            text(
                "insert into cost_ledger (job_id, shard_id, backend, kind, amount_usd, input_tokens, output_tokens, "
                "created_at) values (:id, :shard, 'x', 'charge', 1.25, 0, 0, :now)"
            ),
            {"id": job_id, "shard": shard_id, "now": utcnow()},
        )
        conn.execute(text("update cost_ledger set amount_usd = 0.75 where amount_usd = 1.25"))
        conn.execute(text("delete from cost_ledger where kind = 'release' and job_id = :id"), {"id": job_id})
    kept, summed = kept_and_summed()
    assert kept == pytest.approx(summed) and summed == pytest.approx(1.45)
    with runtime.engine.begin() as conn:  # a job's ledger goes with it, and nothing else breaks
        conn.execute(text("delete from jobs where id = :id"), {"id": job_id})
        assert conn.execute(text("select count(*) from cost_ledger")).scalar_one() == 0
