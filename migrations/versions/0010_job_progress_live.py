"""job_progress shows what a running job looks like now: spent, last commit, rate, time left

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-26 17:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    from migrations.views import job_progress_v2

    op.execute("DROP VIEW job_progress")
    op.execute(job_progress_v2(op.get_bind().dialect.name))


def downgrade() -> None:
    from migrations.views import JOB_PROGRESS_V1

    op.execute("DROP VIEW job_progress")
    op.execute(JOB_PROGRESS_V1)
