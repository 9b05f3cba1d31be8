"""Routing on real stores: cheapest first, deadlines overflow to APIs, budgets are hard caps."""

from __future__ import annotations

import threading
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from sqlalchemy import select, text

from pipeline.jobs.control import set_budget
from pipeline.jobs.costs import costs
from pipeline.jobs.plan import plan
from pipeline.jobs.submit import JobRequest, submit
from pipeline.routing import observations as learning
from pipeline.routing.pricing import PREFILL_WEIGHT, Quote
from pipeline.routing.router import choose, route_job
from pipeline.runtime import Runtime
from pipeline.store import claims, db
from pipeline.store.db import session_scope
from schemas.backends import PROMPT_ROLE, input_token_bound
from schemas.base import utcnow
from schemas.jobspec import JobSpec
from schemas.status import AttemptOutcome, JobStatus, ShardStatus
from schemas.tables import Job, Shard
from tests.support import race, write_prompts

POOLS = [{"name": "slow", "price_per_hour": 3.6, "tokens_per_second": 10, "max_workers": 1}]
PROVIDERS = [
    {
        "name": "api",
        "base_url": "http://127.0.0.1:9/v1",
        "models": {"tiny": "remote-tiny"},
        "input_usd_per_1m": 1.0,
        "output_usd_per_1m": 200.0,
        "max_concurrency": 16,
        "latency_seconds": 2.0,
    },
    {
        "name": "pricey",
        "base_url": "http://127.0.0.1:9/v1",
        "models": {"tiny": "remote-tiny"},
        "input_usd_per_1m": 5.0,
        "output_usd_per_1m": 900.0,
    },
]


def _runtime(store_url: str, **overrides: Any) -> Runtime:
    if not store_url.startswith("sqlite"):
        db.upgrade(db.engine_for(store_url))
    return Runtime.open(database={"url": store_url}, gpu_pools=POOLS, api_providers=PROVIDERS, **overrides)


def _job(runtime: Runtime, tmp_path: Path, **request: Any) -> str:
    path = write_prompts(tmp_path / "in.parquet", 200)
    return submit(runtime, JobRequest(str(path), "tiny", rows_per_shard=10, max_tokens=100, **request))


def _shards(runtime: Runtime, job_id: str) -> list[Shard]:
    with session_scope(runtime.engine) as session:
        return list(session.execute(select(Shard).where(Shard.job_id == job_id).order_by(Shard.shard_index)).scalars())


def _q(backend: str, cost: float, seconds: float, capacity: int = 1) -> Quote:
    return Quote(
        backend, "gpu", f"gpu.{backend}", "m", cost, seconds, capacity, 10, 10, reserve_usd=cost, row_reserve_usd=cost
    )


def test_choose_takes_the_cheapest_quote_within_budget() -> None:
    now = utcnow()
    quotes = [_q("a", 3.0, 10), _q("b", 1.0, 100), _q("c", 2.0, 1)]

    assert (
        choose(quotes, committed_usd=0, budget_usd=None, backlog_seconds={}, now=now, deadline=None).quote.backend
        == "b"
    )  # type: ignore[union-attr]
    assert choose(quotes, committed_usd=9.5, budget_usd=10, backlog_seconds={}, now=now, deadline=None).quote is None
    tight = choose(
        quotes, committed_usd=0, budget_usd=None, backlog_seconds={}, now=now, deadline=now + timedelta(seconds=50)
    )
    assert tight.quote is not None and tight.quote.backend == "c"
    busy = choose(
        quotes,
        committed_usd=0,
        budget_usd=None,
        backlog_seconds={"c": 100},
        now=now,
        deadline=now + timedelta(seconds=50),
    )
    assert busy.quote is not None and busy.quote.backend == "a"
    late = choose(quotes, committed_usd=0, budget_usd=None, backlog_seconds={}, now=now, deadline=now)
    assert late.quote is not None and late.quote.backend == "c" and "deadline" in (late.note or "")


def _worst_on_slow(path: Path, rows: range) -> float:
    """The worst case of rows on the "slow" pool: every max_tokens, and a prompt of as
    many tokens as it has UTF-8 bytes (its role's too) plus the chat template's (prefill at 0.1)."""
    prompts = pq.read_table(path).column("prompt").to_pylist()
    text = sum(len(prompts[i].encode()) + len(PROMPT_ROLE) for i in rows)
    tokens = 100 * len(rows) + PREFILL_WEIGHT * input_token_bound(text, len(rows), len(rows))
    return tokens / 10 / 3600 * 3.6


def test_shards_go_to_the_cheapest_backend_and_their_worst_case_is_reserved(store_url: str, tmp_path: Path) -> None:
    runtime = _runtime(store_url)
    job_id = _job(runtime, tmp_path)

    assert route_job(runtime, job_id) == 20

    shards = _shards(runtime, job_id)
    assert {s.backend for s in shards} == {"slow"}
    assert all(s.status is ShardStatus.QUEUED and s.queue == "gpu.slow" and s.model == "tiny" for s in shards)
    assert shards[0].est_output_tokens == 1000 and shards[0].est_cost_usd == pytest.approx(0.1, rel=0.05)
    with runtime.engine.connect() as conn:
        reserved = conn.execute(text("select sum(amount_usd) from cost_ledger where kind = 'reserve'")).scalar_one()
    worst = sum(_worst_on_slow(tmp_path / "in.parquet", range(s.row_start, s.row_end)) for s in shards)
    assert reserved == pytest.approx(worst) and reserved > sum(s.est_cost_usd for s in shards)


def test_a_deadline_the_gpu_pool_cannot_meet_overflows_to_the_cheapest_api(store_url: str, tmp_path: Path) -> None:
    runtime = _runtime(store_url)
    job_id = _job(runtime, tmp_path, deadline=utcnow() + timedelta(minutes=10))

    route_job(runtime, job_id)

    backends = [s.backend for s in _shards(runtime, job_id)]
    assert backends.count("slow") == 5  # ~100 s each on one worker: five fit in ten minutes
    assert backends.count("api") == 15  # the rest overflow, to the cheaper provider
    with runtime.engine.connect() as conn:
        planned = conn.execute(text("select sum(est_seconds) from shards where backend = 'slow'")).scalar_one()
    assert planned <= 600


def test_a_budget_that_covers_no_row_pauses_the_job_then_raising_it_resumes(store_url: str, tmp_path: Path) -> None:
    runtime = _runtime(store_url)
    job_id = _job(runtime, tmp_path, budget_usd=0.005)  # one row's worst case is ~$0.011

    route_job(runtime, job_id)

    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status is JobStatus.PAUSED and "budget" in (job.error or "")
        assert "shard 0's" in (job.error or "")  # the index `status` shows, not a database id
    assert {s.status for s in _shards(runtime, job_id)} == {ShardStatus.BLOCKED}
    assert set_budget(runtime, job_id, 100.0) == "running"
    route_job(runtime, job_id)

    assert all(s.status is ShardStatus.QUEUED for s in _shards(runtime, job_id))


def test_shards_whose_worst_case_does_not_fit_yet_wait_for_running_ones_to_give_theirs_back(
    store_url: str, tmp_path: Path
) -> None:
    runtime = _runtime(store_url)
    job_id = _job(runtime, tmp_path, budget_usd=0.40)

    route_job(runtime, job_id)

    shards = _shards(runtime, job_id)
    queued = [s for s in shards if s.status is ShardStatus.QUEUED]
    assert len(queued) == 4  # 3 shards' worst cases (~$0.112 each), and what is left for a 4th
    waiting = [s for s in shards if s.status is ShardStatus.PENDING]
    assert len(waiting) == 16 and "waiting for budget" in (waiting[0].route_note or "")
    assert _committed(runtime, job_id) == pytest.approx(0.40)

    # The first shard runs and costs $0.05: the rest of its reservation comes back.
    with session_scope(runtime.engine) as session:
        claim = claims.claim_shard(session, shards[0].id, "w:1:t", 60, "slow")
        assert claim is not None
        claims.commit_checkpoint(
            session,
            claim,
            claims.CheckpointStats(
                first_row=0,
                row_count=10,
                rows_failed=0,
                input_tokens=100,
                output_tokens=500,
                cost_usd=0.05,
                url="file:///nowhere",
            ),
            60,
        )
        assert claims.end_shard(session, claim, ShardStatus.DONE, outcome=AttemptOutcome.DONE)
    route_job(runtime, job_id)

    assert [s.status for s in _shards(runtime, job_id)].count(ShardStatus.QUEUED) == 3 + 1
    assert _committed(runtime, job_id) <= 0.40 + 1e-9
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status is JobStatus.RUNNING


def _committed(runtime: Runtime, job_id: str) -> float:
    with runtime.engine.connect() as conn:
        return float(
            conn.execute(text("select sum(amount_usd) from cost_ledger where job_id = :j"), {"j": job_id}).scalar_one()
        )


@pytest.mark.postgres
def test_concurrent_routers_never_commit_more_than_the_budget(postgres_url: str, tmp_path: Path) -> None:
    runtime = _runtime(postgres_url)
    job_id = _job(runtime, tmp_path, budget_usd=0.75)
    errors: list[BaseException] = []
    queued_by: list[int] = []
    try:
        queued_by = race(*[partial(route_job, runtime, job_id)] * 4)
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)

    assert errors == []
    with runtime.engine.connect() as conn:
        committed = conn.execute(
            text("select sum(amount_usd) from cost_ledger where job_id = :j"), {"j": job_id}
        ).scalar_one()
        queued = conn.execute(
            text("select count(*) from shards where job_id = :j and status = 'queued'"), {"j": job_id}
        ).scalar_one()
    assert committed == pytest.approx(0.75)
    assert queued == 7  # 6 worst cases of ~$0.112, and what is left for a seventh
    assert sorted(queued_by) == [0, 0, 0, 7]  # one router held the job; the others found it taken


def test_rules_pin_a_tagged_job_to_its_allowed_backends(store_url: str, tmp_path: Path) -> None:
    runtime = _runtime(store_url, routing={"rules": [{"tag": "team=legal", "backends": ["pricey"]}]})
    pinned = _job(runtime, tmp_path, tags={"team": "legal"})
    free = submit(runtime, JobRequest(str(tmp_path / "in.parquet"), "tiny", rows_per_shard=100, max_tokens=100))

    route_job(runtime, pinned)
    route_job(runtime, free)

    assert {s.backend for s in _shards(runtime, pinned)} == {"pricey"}
    assert {s.backend for s in _shards(runtime, free)} == {"slow"}


def test_a_cooled_down_backend_is_skipped_and_what_was_learnt_replaces_the_prior(
    store_url: str, tmp_path: Path
) -> None:
    runtime = _runtime(store_url)
    routing = runtime.settings.routing
    with session_scope(runtime.engine) as session:
        for _ in range(routing.cooldown_failures):
            learning.record_shard_end(session, "slow", "tiny", "failed", routing)
        learning.record_checkpoint(
            session,
            "api",
            "tiny",
            routing,
            rows=10,
            rows_failed=0,
            prompt_chars=600,
            input_tokens=200,
            output_tokens=300,
            max_tokens=1000,
            seconds=0,
            requests_latency=0.5,
        )
    job_id = _job(runtime, tmp_path)

    route_job(runtime, job_id)

    shards = _shards(runtime, job_id)
    assert {s.backend for s in shards} == {"api"}
    assert shards[0].est_output_tokens == 300  # fill ratio 0.3 learnt from the checkpoint
    with session_scope(runtime.engine) as session:
        seen = learning.observed(session, "api", "tiny")
    assert seen is not None and seen.latency_seconds == 0.5 and seen.chars_per_token == 3.0


def test_plan_prices_without_writing_and_costs_report_the_ledger(store_url: str, tmp_path: Path) -> None:
    runtime = _runtime(store_url)
    path = write_prompts(tmp_path / "in.parquet", 200)

    result = plan(
        runtime,
        str(path),
        JobSpec(model=["tiny"], deadline=utcnow() + timedelta(minutes=10), max_tokens=100, rows_per_shard=10),
    )

    assert result.by_backend["slow"]["shards"] == 5 and result.by_backend["api"]["shards"] == 15
    assert result.cost_usd == pytest.approx(5 * 0.1 + 15 * 0.2, rel=0.05)
    with runtime.engine.connect() as conn:
        assert conn.execute(text("select count(*) from jobs")).scalar_one() == 0
    assert costs(runtime) == []


@pytest.mark.postgres
def test_a_router_and_claiming_workers_racing_on_postgres_never_deadlock(postgres_url: str, tmp_path: Path) -> None:
    """Review L14: the router locked job then shard, a claim shard then job."""
    runtime = _runtime(postgres_url)
    job_id = _job(runtime, tmp_path)  # 20 shards
    errors: list[BaseException] = []
    routing = threading.Event()

    def router() -> None:
        routing.set()
        try:
            route_job(runtime, job_id)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def worker(n: int) -> None:
        routing.wait()
        try:
            for _ in range(200):
                for shard in _shards(runtime, job_id):
                    if shard.status is not ShardStatus.QUEUED:
                        continue
                    with session_scope(runtime.engine) as session:
                        claim = claims.claim_shard(session, shard.id, f"w:{n}:t", 60, shard.backend or "")
                    if claim is None:
                        continue
                    with session_scope(runtime.engine) as session:
                        claims.commit_checkpoint(
                            session,
                            claim,
                            claims.CheckpointStats(claim.row_start, 10, 0, 1, 1, 0.001, "file:///nowhere"),
                            60,
                        )
                    with session_scope(runtime.engine) as session:
                        claims.end_shard(session, claim, ShardStatus.DONE, outcome=AttemptOutcome.DONE)
                if all(s.status is ShardStatus.DONE for s in _shards(runtime, job_id)):
                    return
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=router)] + [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert {s.status for s in _shards(runtime, job_id)} == {ShardStatus.DONE}


def test_the_deadline_plan_prices_each_kind_of_shard_once_not_each_shard(store_url: str, tmp_path: Path) -> None:
    """The plan before the first shard is queued: its queries do not grow with the shards."""
    from sqlalchemy import event

    from pipeline.routing import router

    runtime = _runtime(store_url)
    statements = {}
    for shards in (20, 400):
        path = write_prompts(tmp_path / f"in-{shards}.parquet", shards * 5)
        job_id = submit(
            runtime,
            JobRequest(str(path), "tiny", rows_per_shard=5, max_tokens=100, deadline=utcnow() + timedelta(hours=1)),
        )
        pending = [(s.id, s.shard_index, s.row_start, s.row_end, s.excluded_backends) for s in _shards(runtime, job_id)]
        seen: list[str] = []
        listen = partial(event.listen, runtime.engine, "before_cursor_execute")
        listen(counter := lambda *args: seen.append(args[2]))
        try:
            planned = router._plan(runtime, job_id, pending)
        finally:
            event.remove(runtime.engine, "before_cursor_execute", counter)
        assert len(planned) == shards  # every shard has its backend
        statements[shards] = len(seen)
    assert statements[400] == statements[20]
