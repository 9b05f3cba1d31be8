"""providers' batch APIs as a routing lane: the provider batches spotlane created

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-26 16:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "provider_batches",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("shard_id", sa.Integer(), sa.ForeignKey("shards.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("backend", sa.String(64), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("marker", sa.String(64), nullable=False, unique=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("first_row", sa.Integer(), nullable=False),
        sa.Column("row_end", sa.Integer(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("sent_rows", sa.JSON(), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.String(128), nullable=True),
        sa.Column("input_file_id", sa.String(128), nullable=True),
        sa.Column("provider_status", sa.String(32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("give_up_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_poll_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("collected_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rows_answered", sa.Integer(), nullable=False),
        sa.Column("rows_returned", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("poll_failures", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index("ix_provider_batches_status_poll", "provider_batches", ["status", "next_poll_at"])
    op.create_index("ix_provider_batches_shard", "provider_batches", ["shard_id"])
    op.create_index("ix_provider_batches_backend_ended", "provider_batches", ["backend", "ended_at"])


def downgrade() -> None:
    op.drop_index("ix_provider_batches_backend_ended", table_name="provider_batches")
    op.drop_index("ix_provider_batches_shard", table_name="provider_batches")
    op.drop_index("ix_provider_batches_status_poll", table_name="provider_batches")
    op.drop_table("provider_batches")
