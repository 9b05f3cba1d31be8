"""routing: shard estimates and exclusions, accepted models, backend_stats

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 18:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.views import JOB_PROGRESS_V1

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("models", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("shards") as batch:
        batch.add_column(sa.Column("model", sa.Text(), nullable=True))
        batch.add_column(sa.Column("est_input_tokens", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("est_output_tokens", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("est_cost_usd", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("est_seconds", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("excluded_backends", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("route_note", sa.Text(), nullable=True))
    op.create_table(
        "backend_stats",
        sa.Column("backend", sa.String(length=64), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("tokens_per_second", sa.Float(), nullable=True),
        sa.Column("latency_seconds", sa.Float(), nullable=True),
        sa.Column("error_rate", sa.Float(), nullable=False),
        sa.Column("preemption_rate", sa.Float(), nullable=True),
        sa.Column("chars_per_token", sa.Float(), nullable=True),
        sa.Column("output_fill", sa.Float(), nullable=True),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("cooldown_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("backend", "model", name=op.f("pk_backend_stats")),
    )


def downgrade() -> None:
    op.drop_table("backend_stats")
    op.execute("DROP VIEW job_progress")  # SQLite rebuilds the tables below
    with op.batch_alter_table("shards") as batch:
        for column in ("route_note", "excluded_backends", "est_seconds", "est_cost_usd",
                       "est_output_tokens", "est_input_tokens", "model"):
            batch.drop_column(column)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("models")
    op.execute(JOB_PROGRESS_V1)
