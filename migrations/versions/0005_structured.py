"""structured outputs: a job's JSON Schema and how often an API lane re-asks for a valid answer

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 11:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("response_schema", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("schema_retries", sa.Integer(), nullable=False, server_default="2"))


def downgrade() -> None:
    from migrations.views import JOB_PROGRESS_V1

    op.execute("DROP VIEW job_progress")  # SQLite rebuilds the table below
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("schema_retries")
        batch.drop_column("response_schema")
    op.execute(JOB_PROGRESS_V1)
