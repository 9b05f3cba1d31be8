"""spotlane serve: API keys, files, webhook deliveries; jobs know their tenant and batch

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26 14:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("budget_usd", sa.Float(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "files",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("api_key_id", sa.String(40), nullable=False),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_files_key", "files", ["api_key_id", "created_at"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("webhook", sa.String(128), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("delivered", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("event_id", "webhook", "attempt"),
    )
    op.create_index("ix_webhook_deliveries_job", "webhook_deliveries", ["job_id"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("api_key_id", sa.String(40), nullable=True))
        batch.add_column(sa.Column("openai_endpoint", sa.String(40), nullable=True))
        batch.add_column(sa.Column("input_file_id", sa.String(40), nullable=True))
        batch.add_column(sa.Column("completion_window", sa.String(16), nullable=True))
        batch.add_column(sa.Column("batch_metadata", sa.JSON(), nullable=True))
    op.create_index("ix_jobs_api_key", "jobs", ["api_key_id", "created_at"])


def downgrade() -> None:
    from migrations.views import JOB_PROGRESS_V1

    op.drop_index("ix_jobs_api_key", table_name="jobs")
    op.execute("DROP VIEW job_progress")  # SQLite rebuilds the table below
    with op.batch_alter_table("jobs") as batch:
        for column in ("batch_metadata", "completion_window", "input_file_id", "openai_endpoint", "api_key_id"):
            batch.drop_column(column)
    op.execute(JOB_PROGRESS_V1)
    op.drop_table("webhook_deliveries")
    op.drop_table("files")
    op.drop_table("api_keys")
