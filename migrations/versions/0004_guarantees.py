"""guarantees: the input's identity at submit, retry jobs' pending merges, reservations per attempt,
the workers consuming queues now, the input as the submitter named it

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 08:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("input_identity", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("retry_of", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("merged_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_jobs_retry_of", "jobs", ["retry_of"])
    with op.batch_alter_table("cost_ledger") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("source_url", sa.Text(), nullable=True))
    op.create_table(
        "workers",
        sa.Column("owner", sa.String(length=160), nullable=False),
        sa.Column("hostname", sa.String(length=128), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("owner", name=op.f("pk_workers")),
    )
    # Retry jobs recorded their parent in tags only; their merges are long done.
    op.execute("UPDATE jobs SET merged_at = finished_at WHERE finished_at IS NOT NULL")


def downgrade() -> None:
    from migrations.views import JOB_PROGRESS_V1

    op.drop_table("workers")
    op.drop_index("ix_jobs_retry_of", table_name="jobs")
    op.execute("DROP VIEW job_progress")  # SQLite rebuilds the tables below
    with op.batch_alter_table("cost_ledger") as batch:
        batch.drop_column("attempt")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("source_url")
        batch.drop_column("merged_at")
        batch.drop_column("retry_of")
        batch.drop_column("input_identity")
    op.execute(JOB_PROGRESS_V1)
