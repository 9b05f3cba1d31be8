"""indexes for the control plane at scale: the ledger by shard, queued shards by queue

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-26 19:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # What a shard's attempt holds is read at every chunk and checkpoint (and a purged
    # job's ledger rows are deleted by shard): without it, each read walks the ledger.
    op.create_index("ix_cost_ledger_shard", "cost_ledger", ["shard_id", "attempt"])
    # The reaper's look for lost messages: the oldest queued shards of one queue.
    op.create_index("ix_shards_status_queue", "shards", ["status", "queue", "queued_at"])


def downgrade() -> None:
    op.drop_index("ix_shards_status_queue", table_name="shards")
    op.drop_index("ix_cost_ledger_shard", table_name="cost_ledger")
