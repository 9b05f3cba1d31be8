"""the router learns how often an API lane re-asks a row with a schema

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 13:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("backend_stats") as batch:
        batch.add_column(sa.Column("reask_rate", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("backend_stats") as batch:
        batch.drop_column("reask_rate")
