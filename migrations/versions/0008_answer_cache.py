"""the answer cache: rows answered before are answered again for free

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26 15:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "answer_cache",
        sa.Column("fingerprint", sa.String(64), primary_key=True),
        sa.Column("output", sa.Text(), nullable=True),
        sa.Column("finish_reason", sa.String(16), nullable=True),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("embedding", sa.JSON(), nullable=True),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_answer_cache_created", "answer_cache", ["created_at"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("use_cache", sa.Boolean(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("refresh_cache", sa.Boolean(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("rows_cached", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("saved_usd", sa.Float(), nullable=False, server_default="0"))
    with op.batch_alter_table("shards") as batch:
        batch.add_column(sa.Column("rows_cached", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("saved_usd", sa.Float(), nullable=False, server_default="0"))


def downgrade() -> None:
    from migrations.views import JOB_PROGRESS_V1

    op.execute("DROP VIEW job_progress")  # SQLite rebuilds the tables below
    with op.batch_alter_table("shards") as batch:
        batch.drop_column("saved_usd")
        batch.drop_column("rows_cached")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("saved_usd")
        batch.drop_column("rows_cached")
        batch.drop_column("refresh_cache")
        batch.drop_column("use_cache")
    op.execute(JOB_PROGRESS_V1)
    op.drop_index("ix_answer_cache_created", table_name="answer_cache")
    op.drop_table("answer_cache")
