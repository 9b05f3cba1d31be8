"""The state machine under random sequences of moves (hypothesis's stateful testing).

Claims (some for stale backends or attempts), heartbeats, reservations and fenced
commits (some by workers that lost their lease), lease expiries, hand-backs,
reroutes, failures, cancel, resume, budget raises, routing and finalizing are
driven in any order against a real store, through ``pipeline.store.transitions`` and
the real router and finalizer. After every step:

- no input row is committed twice, and each shard's committed rows are contiguous
  from its first row (and are what its ``rows_done`` says);
- reserved + spent never exceeds the budget;
- every job and shard state seen follows a path of the table of moves;
- a finished job's results hold each committed row exactly once, in input order.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select

from pipeline import api
from pipeline.jobs.control import cancel, resume, set_budget
from pipeline.jobs.submit import JobRequest, submit
from pipeline.routing.router import route_job
from pipeline.runtime import Runtime
from pipeline.storage.objects import filesystem, write_parquet
from pipeline.store import claims, transitions
from pipeline.store.db import session_scope
from pipeline.tasks.finalize import finalize_job
from schemas.errors import LeaseLost, StoreError
from schemas.status import JOB_MOVES, SHARD_MOVES, AttemptOutcome, JobStatus, ShardStatus
from schemas.tables import Checkpoint, CostLedgerEntry, Job, Shard
from tests.support import write_prompts
from tests.support.jobs import model_folder, stub_runtime

ROWS, PER_SHARD = 12, 4
#: SPOTLANE_TEST_LONG=1 runs many more sequences (minutes, not seconds).
LONG = os.environ.get("SPOTLANE_TEST_LONG", "") not in ("", "0")
POOLS = [
    {"name": "a", "price_per_hour": 36.0, "tokens_per_second": 100.0},
    {"name": "b", "price_per_hour": 72.0, "tokens_per_second": 100.0},
]


def _reachable(moves: dict[Any, frozenset[Any]], old: Any, new: Any) -> bool:
    """``new`` is ``old`` or lies on a path of the table (one transaction may make two moves)."""
    if old == new or new in moves[old]:
        return True
    return any(new in moves[middle] for middle in moves[old])


def machine(runtime: Runtime, folder: Path, seen: Counter[str]) -> type[RuleBasedStateMachine]:
    """The machine over ``runtime``'s store; ``seen`` counts what the runs got to do."""
    inputs = iter(range(10_000))

    class JobMachine(RuleBasedStateMachine):
        @initialize(budget=st.sampled_from([None, 0.02, 0.05, 0.2]))
        def submit_job(self, budget: float | None) -> None:
            path = write_prompts(folder / f"in-{next(inputs)}.parquet", ROWS)
            self.ids = pq.read_table(path).column("id").to_pylist()
            self.job_id = submit(
                runtime,
                JobRequest(str(path), model_folder(folder), rows_per_shard=PER_SHARD, max_tokens=8, budget_usd=budget),
            )
            self.budget = budget
            self.claims: dict[str, claims.Claim] = {}
            self.next_row: dict[str, int] = {}
            #: Chunks sent but not landed: (first row, rows, cost), by worker.
            self.flying: dict[str, tuple[int, int, float]] = {}
            self.workers = 0
            self.seen = self._states()

        # -- helpers ------------------------------------------------------------------

        def _states(self) -> tuple[JobStatus, dict[int, ShardStatus]]:
            with session_scope(runtime.engine) as session:
                job = session.get(Job, self.job_id)
                assert job is not None
                shards = {
                    shard_id: status
                    for shard_id, status in session.execute(
                        select(Shard.id, Shard.status).where(Shard.job_id == self.job_id)
                    )
                }
            return job.status, shards

        def _shard(self, index: int) -> Shard:
            with session_scope(runtime.engine) as session:
                shard = session.execute(
                    select(Shard).where(Shard.job_id == self.job_id, Shard.shard_index == index)
                ).scalar_one()
                session.expunge(shard)
                return shard

        # -- workers ------------------------------------------------------------------

        @rule(data=st.data(), stale=st.sampled_from(["no", "no", "attempt", "backend"]))
        def claim(self, data: st.DataObject, stale: str) -> None:
            """A worker takes a queued shard's message (or a stale one: an older attempt, another backend)."""
            queued = [i for i in range(ROWS // PER_SHARD) if self._shard(i).status is ShardStatus.QUEUED]
            if not queued:
                route_job(runtime, self.job_id)  # a router got there first
                queued = [i for i in range(ROWS // PER_SHARD) if self._shard(i).status is ShardStatus.QUEUED]
            if not queued:
                return
            shard = self._shard(data.draw(st.sampled_from(queued)))
            backend = shard.backend or "a"
            if stale == "backend":
                backend = "b" if backend == "a" else "a"
            attempt = shard.attempts - 1 if stale == "attempt" else shard.attempts
            self.workers += 1
            worker = f"w:{self.workers}:t"
            with session_scope(runtime.engine) as session:
                claim = claims.claim_shard(session, shard.id, worker, 60, backend, attempt)
            seen["claim tried"] += 1
            if claim is not None:
                assert stale == "no", "a message for another backend or attempt claimed the shard"
                seen["claimed"] += 1
                self.claims[worker] = claim
                self.next_row[worker] = claim.row_start + claim.rows_done

        @precondition(lambda self: self.claims)
        @rule(data=st.data(), rows=st.integers(1, 3), cost=st.floats(0.0, 0.03))
        def commit(self, data: st.DataObject, rows: int, cost: float) -> None:
            """A chunk sent and committed at once."""
            worker = data.draw(st.sampled_from(sorted(self.claims)))
            if worker not in self.flying and self._send(worker, rows, cost):
                self._land(worker)

        @precondition(lambda self: self.claims)
        @rule(data=st.data(), rows=st.integers(1, 3), cost=st.floats(0.0, 0.03))
        def send(self, data: st.DataObject, rows: int, cost: float) -> None:
            """A chunk is reserved and sent; it lands later (``land``), whatever happened meanwhile."""
            worker = data.draw(st.sampled_from(sorted(self.claims)))
            if worker not in self.flying:
                self._send(worker, rows, cost)

        @precondition(lambda self: self.flying)
        @rule(data=st.data())
        def land(self, data: st.DataObject) -> None:
            self._land(data.draw(st.sampled_from(sorted(self.flying))))

        @precondition(lambda self: self.flying)
        @rule(data=st.data(), others_commit=st.integers(0, 2))
        def frozen_worker_wakes(self, data: st.DataObject, others_commit: int) -> None:
            """A worker freezes with a chunk in flight, its lease runs out, another worker takes the
            shard over (and commits a few chunks of another size), then the frozen one wakes."""
            frozen = data.draw(st.sampled_from(sorted(self.flying)))
            claim = self.claims[frozen]
            with session_scope(runtime.engine) as session:
                transitions.expire_lease(session, claim.shard_id, owner_dead=True)
                record = transitions.run_record(session, claim.shard_id)
            self.workers += 1
            taker = f"w:{self.workers}:t"
            with session_scope(runtime.engine) as session:
                new = claims.claim_shard(session, claim.shard_id, taker, 60, record.backend, record.attempt)
            if new is not None:
                self.claims[taker], self.next_row[taker] = new, new.row_start + new.rows_done
                for _ in range(others_commit):
                    if taker in self.claims and self._send(taker, 3, 0.001):
                        self._land(taker)
            assert not self._land(frozen), "a worker that lost its lease committed"

        @precondition(lambda self: self.claims)
        @rule(data=st.data(), cost=st.floats(0.0, 0.01))
        def work_to_the_end(self, data: st.DataObject, cost: float) -> None:
            """A worker that is not interrupted: chunks of two rows until its shard is done."""
            worker = data.draw(st.sampled_from(sorted(self.claims)))
            if worker in self.flying:
                self._land(worker)
            while worker in self.claims and self.next_row[worker] < self.claims[worker].row_end:
                if not self._send(worker, 2, cost) or not self._land(worker):
                    return
            if worker in self.claims:
                with session_scope(runtime.engine) as session:
                    claims.end_shard(session, self.claims.pop(worker), ShardStatus.DONE, outcome=AttemptOutcome.DONE)

        def _send(self, worker: str, rows: int, cost: float) -> bool:
            """Reserve a chunk's worst case before sending it, as a worker does."""
            claim, first = self.claims[worker], self.next_row[worker]
            rows = min(rows, claim.row_end - first)
            if rows <= 0:
                return False
            with session_scope(runtime.engine) as session:
                verdict, _ = claims.reserve_chunk(session, claim, cost)
            if verdict is not claims.ChunkVerdict.GO:
                seen[f"chunk {verdict.value}"] += 1
                if verdict is not claims.ChunkVerdict.NO_BUDGET:
                    del self.claims[worker]
                return False
            self.flying[worker] = (first, rows, cost)
            return True

        def _land(self, worker: str) -> bool:
            """The chunk's answers are back (its cost at most what was reserved): write the part, commit."""
            first, rows, cost = self.flying.pop(worker)
            claim = self.claims[worker]
            url = runtime.storage.part_url(claim.job_id, claim.shard_index, first, claim.attempt)
            write_parquet(
                pa.table({"id": self.ids[first : first + rows], "error": pa.array([None] * rows, pa.string())}), url
            )
            stats = claims.CheckpointStats(first, rows, 0, rows, rows, cost, url)
            try:
                with session_scope(runtime.engine) as session:
                    claims.commit_checkpoint(session, claim, stats, 60)
            except LeaseLost:
                with session_scope(runtime.engine) as session:
                    claims.charge_lost_work(session, claim, stats)
                seen["stale commit refused"] += 1
                del self.claims[worker]
                return False
            seen["committed"] += 1
            self.next_row[worker] = first + rows
            return True

        @precondition(lambda self: self.claims)
        @rule(data=st.data())
        def heartbeat(self, data: st.DataObject) -> None:
            worker = data.draw(st.sampled_from(sorted(self.claims)))
            with session_scope(runtime.engine) as session:
                if not claims.heartbeat(session, self.claims[worker], 60) and worker not in self.flying:
                    del self.claims[worker]  # it stops; a worker with a chunk in flight still lands it

        @precondition(lambda self: self.claims)
        @rule(data=st.data(), how=st.sampled_from(["done", "failed", "handed back", "rerouted", "cancelled stop"]))
        def end(self, data: st.DataObject, how: str) -> None:
            worker = data.draw(st.sampled_from(sorted(self.claims)))
            if worker in self.flying:
                self._land(worker)  # a worker ends its shard after its chunk in flight commits
                if worker not in self.claims:
                    return
            claim = self.claims.pop(worker)
            with session_scope(runtime.engine) as session:
                if how == "done" and self.next_row[worker] == claim.row_end:
                    claims.end_shard(session, claim, ShardStatus.DONE, outcome=AttemptOutcome.DONE)
                elif how == "failed":
                    claims.end_shard(session, claim, ShardStatus.FAILED, outcome=AttemptOutcome.FAILED)
                elif how == "handed back":
                    if claims.end_shard(session, claim, ShardStatus.PREEMPTED, outcome=AttemptOutcome.PREEMPTED):
                        transitions.queue_shard(
                            session,
                            claim.shard_id,
                            expected=(ShardStatus.PREEMPTED,),
                            backend=claim.backend,
                            queue=f"gpu.{claim.backend}",
                        )
                elif how == "rerouted":
                    claims.reroute_shard(session, claim, "the backend broke")
                elif how == "cancelled stop":
                    claims.end_shard(session, claim, ShardStatus.PENDING, outcome=AttemptOutcome.PREEMPTED)

        @precondition(lambda self: ShardStatus.RUNNING in self.seen[1].values())
        @rule(index=st.integers(0, ROWS // PER_SHARD - 1))
        def lease_runs_out(self, index: int) -> None:
            """The holder froze or died (the worker keeps its claim and may wake later)."""
            with session_scope(runtime.engine) as session:
                transitions.expire_lease(session, self._shard(index).id, owner_dead=True)

        # -- the control plane ----------------------------------------------------------

        @precondition(lambda self: not self.seen[0].is_final)
        @rule()
        def route(self) -> None:
            route_job(runtime, self.job_id)

        def _shards_final(self) -> bool:
            return all(status in (ShardStatus.DONE, ShardStatus.FAILED) for status in self.seen[1].values())

        @precondition(lambda self: not self.seen[0].is_final)
        @rule()
        def cancel(self) -> None:
            try:
                cancel(runtime, self.job_id)
            except StoreError:
                pass

        @precondition(lambda self: self.seen[0] in (JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.PAUSED))
        @rule()
        def resume(self) -> None:
            try:
                resume(runtime, self.job_id)
            except StoreError:
                pass

        @precondition(lambda self: self.budget is not None)
        @rule(factor=st.sampled_from([1.5, 3.0]))
        def raise_budget(self, factor: float) -> None:
            if self.budget is not None:
                self.budget *= factor
                set_budget(runtime, self.job_id, self.budget)

        @precondition(
            lambda self: not self.seen[0].is_final and (self._shards_final() or self.seen[0] is JobStatus.FINALIZING)
        )
        @rule()
        def finalize(self) -> None:
            status = finalize_job(runtime, self.job_id)
            seen[f"finalized {status.value if status else 'nothing'}"] += 1
            if status in (JobStatus.SUCCEEDED, JobStatus.SUCCEEDED_WITH_ERRORS, JobStatus.FAILED):
                with session_scope(runtime.engine) as session:
                    done = session.execute(
                        select(func.sum(Shard.rows_done)).where(Shard.job_id == self.job_id)
                    ).scalar_one()
                info = api.results(runtime, self.job_id)
                ids = pa.concat_tables([pq.read_table(filesystem(u)[1]) for u in info.files]).column("id").to_pylist()
                assert len(ids) == len(set(ids)) == done and ids == [i for i in self.ids if i in set(ids)]

        @precondition(lambda self: not self.seen[0].is_final and self.seen[0] is not JobStatus.PAUSED)
        @rule(cost=st.floats(0.0, 0.004))
        def run_undisturbed_to_the_end(self, cost: float) -> None:
            """From wherever the job is: workers take every shard and finish it, then the
            finalizer runs (what the system does once nothing more goes wrong)."""
            for worker in sorted(self.claims):
                if worker in self.flying:
                    self._land(worker)
            self.claims.clear()
            for _ in range(3 * ROWS // PER_SHARD):
                route_job(runtime, self.job_id)
                self.every_move_is_in_the_table()  # each move of this long step is checked as it happens
                queued = [i for i in range(ROWS // PER_SHARD) if self._shard(i).status is ShardStatus.QUEUED]
                if not queued:
                    break
                for index in queued:
                    shard = self._shard(index)
                    self.workers += 1
                    worker = f"w:{self.workers}:t"
                    with session_scope(runtime.engine) as session:
                        claim = claims.claim_shard(session, shard.id, worker, 60, shard.backend or "", shard.attempts)
                    if claim is None:
                        continue
                    self.every_move_is_in_the_table()
                    self.claims[worker], self.next_row[worker] = claim, claim.row_start + claim.rows_done
                    while worker in self.claims and self.next_row[worker] < claim.row_end:
                        if not self._send(worker, 2, cost) or not self._land(worker):
                            break
                    if worker in self.claims:
                        done = self.next_row[worker] == claim.row_end
                        with session_scope(runtime.engine) as session:
                            claims.end_shard(
                                session,
                                self.claims.pop(worker),
                                ShardStatus.DONE if done else ShardStatus.PENDING,
                                outcome=AttemptOutcome.DONE if done else AttemptOutcome.PARKED,
                            )
                        self.every_move_is_in_the_table()
            if self._states()[0] in (JobStatus.RUNNING, JobStatus.PENDING):
                self.seen = self._states()
                self.finalize()

        # -- after every step -----------------------------------------------------------

        @invariant()
        def rows_committed_once_and_contiguous(self) -> None:
            with session_scope(runtime.engine) as session:
                for shard in session.execute(select(Shard).where(Shard.job_id == self.job_id)).scalars():
                    parts = session.execute(
                        select(Checkpoint.first_row, Checkpoint.row_count)
                        .where(Checkpoint.shard_id == shard.id)
                        .order_by(Checkpoint.first_row)
                    ).all()
                    at = shard.row_start
                    for first, count in parts:
                        assert first == at, f"shard {shard.shard_index}: a part at {first}, expected {at}"
                        at += count
                    assert at - shard.row_start == shard.rows_done and at <= shard.row_end

        @invariant()
        def reserved_plus_spent_within_the_budget(self) -> None:
            with session_scope(runtime.engine) as session:
                committed = session.execute(
                    select(func.coalesce(func.sum(CostLedgerEntry.amount_usd), 0.0)).where(
                        CostLedgerEntry.job_id == self.job_id
                    )
                ).scalar_one()
                kept = session.execute(select(Job.committed_usd).where(Job.id == self.job_id)).scalar_one()
            # The running total every budget check reads is the ledger's sum.
            assert kept == pytest.approx(committed, abs=1e-9)
            if self.budget is not None:
                assert committed <= self.budget + 1e-9

        @invariant()
        def every_move_is_in_the_table(self) -> None:
            job, shards = self._states()
            old_job, old_shards = self.seen
            assert _reachable(JOB_MOVES, old_job, job), f"job {old_job.value} -> {job.value}"
            for shard_id, status in shards.items():
                old = old_shards[shard_id]
                assert _reachable(SHARD_MOVES, old, status), f"shard {old.value} -> {status.value}"
            self.seen = (job, shards)

    return JobMachine


@pytest.mark.timeout(3600 if LONG else 300)
def test_random_sequences_of_moves_keep_every_guarantee(store_url: str, tmp_path: Path) -> None:
    runtime, _ = stub_runtime(store_url, gpu_pools=POOLS, worker={"checkpoint_rows": 2})
    seen: Counter[str] = Counter()
    run_state_machine_as_test(
        machine(runtime, tmp_path, seen),
        settings=settings(
            max_examples=LONG and 400 or 40,
            stateful_step_count=40,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            database=None,
        ),
    )
    print(f"\nstate machine on {store_url.split(':')[0]}: {dict(sorted(seen.items()))}")
    # The runs reached the interesting places, not only refusals (the counts are printed above).
    assert seen["committed"] >= 50 and seen["claimed"] >= 10 and seen["finalized succeeded"] >= 1
