"""Every query a job's life sends to PostgreSQL has an index to use on the tables that
grow with the work (jobs, shards, attempts, checkpoints, the ledger, provider batches,
the answer cache).

The statements are the real ones: captured as a job is submitted, routed, run by the
real runner on the stub engine, reaped, read and finalized. Each is then explained with
sequential scans priced out of reach (``enable_seqscan = off``): PostgreSQL still
plans a ``Seq Scan`` where no index can serve, whatever the table's size now, or walks
a whole index with no condition on its first column (the same scan in another order);
either one on a growing table fails the test.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from pipeline.jobs.queries import job_status
from pipeline.jobs.submit import JobRequest, submit
from pipeline.tasks.reaper import reap
from tests.support import write_prompts
from tests.support.jobs import model_folder, run_queued, stub_runtime

pytestmark = [pytest.mark.postgres]

#: Tables whose size grows with rows, shards, jobs or time.
GROWING = ("jobs", "shards", "shard_attempts", "checkpoints", "cost_ledger", "provider_batches", "answer_cache")


def test_every_query_of_a_job_can_use_an_index(postgres_url: str, tmp_path: Path) -> None:
    runtime, _ = stub_runtime(postgres_url, worker={"checkpoint_rows": 5}, jobs={"rows_per_shard": 20})
    seen: dict[str, Any] = {}

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper()
        if not many and verb in ("SELECT", "UPDATE", "DELETE", "WITH"):
            seen.setdefault(statement, parameters)

    event.listen(runtime.engine, "before_cursor_execute", capture)
    try:
        data = write_prompts(tmp_path / "in.parquet", 60)
        job_id = submit(runtime, JobRequest(str(data), model_folder(tmp_path), budget_usd=5.0))
        run_queued(runtime, job_id)
        reap(runtime)
        job_status(runtime, job_id)
        second = submit(runtime, JobRequest(str(data), model_folder(tmp_path)))  # the answer cache answers it
        run_queued(runtime, second)
    finally:
        event.remove(runtime.engine, "before_cursor_execute", capture)
    assert len(seen) > 30  # the job's life really was captured

    scans: set[str] = set()
    with runtime.engine.connect() as conn:
        leading = dict(
            conn.exec_driver_sql(
                "SELECT c.relname, a.attname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
            ).all()
        )
        conn.exec_driver_sql("SET enable_seqscan = off")
        for statement, parameters in seen.items():
            plan = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).scalar_one()
            for table, how in _whole_scans(plan[0]["Plan"], leading):
                scans.add(f"{table} ({how}): {' '.join(statement.split())[:400]}")
    assert not scans, "queries that read a growing table whole:\n" + "\n".join(sorted(scans))


def _whole_scans(node: dict[str, Any], leading: dict[str, str], table: str | None = None) -> list[tuple[str, str]]:
    """(table, scan) of each scan in the plan that reads a growing table whole: a
    sequential scan, or an index scan with no condition on the index's first column.
    ``leading``: each index's first column."""
    found = []
    table = node.get("Relation Name", table)  # a bitmap index scan's table is its parent's
    kind = node.get("Node Type", "")
    index = node.get("Index Name")
    if table in GROWING:
        if kind == "Seq Scan":
            found.append((table, kind))
        elif index is not None and not re.search(rf"\b{leading.get(index, '?')}\b", node.get("Index Cond", "")):
            found.append((table, f"{kind} walking all of {index}"))
    for child in node.get("Plans", []):
        found.extend(_whole_scans(child, leading, table))
    return found
