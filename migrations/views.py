"""SQL views, versioned (never edit one a released revision uses; add _V2), shared by the revisions that create them and the ones that must
drop and re-create them around a SQLite table rebuild (a view pins its tables)."""

from __future__ import annotations

__all__ = ["JOB_PROGRESS_V1", "RATE_WINDOW_SECONDS", "job_progress_v2"]

JOB_PROGRESS_V1 = """
CREATE VIEW job_progress AS
SELECT
    j.id AS job_id,
    j.status AS status,
    j.model AS model,
    j.rows_total AS rows_total,
    COALESCE(SUM(s.rows_done), 0) AS rows_done,
    COALESCE(SUM(s.rows_failed), 0) AS rows_failed,
    COUNT(s.id) AS shards_total,
    COALESCE(SUM(CASE WHEN s.status = 'done' THEN 1 ELSE 0 END), 0) AS shards_done,
    COALESCE(SUM(CASE WHEN s.status = 'running' THEN 1 ELSE 0 END), 0) AS shards_running,
    COALESCE(SUM(CASE WHEN s.status IN ('pending', 'queued', 'preempted', 'blocked')
                      THEN 1 ELSE 0 END), 0) AS shards_waiting,
    COALESCE(SUM(CASE WHEN s.status = 'failed' THEN 1 ELSE 0 END), 0) AS shards_failed,
    COALESCE(SUM(s.input_tokens), 0) AS input_tokens,
    COALESCE(SUM(s.output_tokens), 0) AS output_tokens,
    COALESCE(SUM(s.cost_usd), 0) AS cost_usd,
    CASE WHEN j.rows_total > 0
         THEN ROUND(100.0 * COALESCE(SUM(s.rows_done), 0) / j.rows_total, 1)
         ELSE 100.0 END AS percent_done,
    j.created_at AS created_at,
    j.started_at AS started_at,
    j.finished_at AS finished_at
FROM jobs j
LEFT JOIN shards s ON s.job_id = j.id
GROUP BY j.id, j.status, j.model, j.rows_total, j.created_at, j.started_at, j.finished_at
"""


#: The window ``job_progress.rows_per_second`` counts committed rows over.
RATE_WINDOW_SECONDS = 300


def job_progress_v2(dialect: str) -> str:
    """V1's columns, and what a running job looks like now: ``spent_usd`` (charged),
    ``last_commit_at``, ``rows_per_second`` (rows committed in the last five minutes /
    300) and ``seconds_left`` at that rate. The database's clock; SQLite stores UTC
    without a zone, as text that sorts."""
    since = (
        f"datetime('now', '-{RATE_WINDOW_SECONDS} seconds')"
        if dialect == "sqlite"
        else f"now() - interval '{RATE_WINDOW_SECONDS} seconds'"
    )
    inner = JOB_PROGRESS_V1.replace("CREATE VIEW job_progress AS\n", "").replace(
        "    j.finished_at AS finished_at\nFROM jobs j",
        f"""    j.finished_at AS finished_at,
    COALESCE((SELECT SUM(l.amount_usd) FROM cost_ledger l
              WHERE l.job_id = j.id AND l.kind = 'charge'), 0) AS spent_usd,
    (SELECT MAX(c.created_at) FROM checkpoints c JOIN shards cs ON cs.id = c.shard_id
     WHERE cs.job_id = j.id) AS last_commit_at,
    CAST(COALESCE((SELECT SUM(c.row_count) FROM checkpoints c JOIN shards cs ON cs.id = c.shard_id
                   WHERE cs.job_id = j.id AND c.created_at >= {since}), 0) AS DOUBLE PRECISION)
        / {RATE_WINDOW_SECONDS} AS rows_per_second
FROM jobs j""",
    )
    return f"""
CREATE VIEW job_progress AS
SELECT p.*,
       CASE WHEN p.rows_per_second > 0 AND p.rows_done < p.rows_total
            THEN (p.rows_total - p.rows_done) / p.rows_per_second END AS seconds_left
FROM ({inner}) p
"""
