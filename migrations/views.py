"""SQL views, versioned (never edit one a released revision uses; add _V2), shared by the revisions that create them and the ones that must
drop and re-create them around a SQLite table rebuild (a view pins its tables)."""

from __future__ import annotations

__all__ = ["JOB_PROGRESS_V1"]

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
