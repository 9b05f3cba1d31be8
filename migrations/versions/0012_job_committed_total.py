"""a job's spent + reserved as a running total on its row, kept by triggers on the ledger

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-27 02:00:00

Every reservation (the router's, each chunk's top-up) checks the budget under the job
lock against ``sum(cost_ledger.amount_usd)`` of the job, which grows by a row or two
with every checkpoint (tens of thousands for a 10M-row job). ``jobs.committed_usd``
holds that sum, kept by the database itself on every insert, update and delete of a
ledger row, so no writer of the ledger can forget it.

A later migration that rebuilds ``cost_ledger`` on SQLite (batch mode copies the
table) must create the SQLite triggers again.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ADD = "UPDATE jobs SET committed_usd = committed_usd + NEW.amount_usd WHERE id = NEW.job_id"
_TAKE = "UPDATE jobs SET committed_usd = committed_usd - OLD.amount_usd WHERE id = OLD.job_id"

POSTGRESQL = [
    f"""
    CREATE FUNCTION cost_ledger_committed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP IN ('UPDATE', 'DELETE') THEN
            {_TAKE};
        END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            {_ADD};
        END IF;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER cost_ledger_committed
    AFTER INSERT OR DELETE OR UPDATE OF amount_usd, job_id ON cost_ledger
    FOR EACH ROW EXECUTE FUNCTION cost_ledger_committed()
    """,
]
SQLITE = [
    f"CREATE TRIGGER cost_ledger_committed_insert AFTER INSERT ON cost_ledger BEGIN {_ADD}; END",
    f"CREATE TRIGGER cost_ledger_committed_delete AFTER DELETE ON cost_ledger BEGIN {_TAKE}; END",
    "CREATE TRIGGER cost_ledger_committed_update AFTER UPDATE OF amount_usd, job_id ON cost_ledger "
    f"BEGIN {_TAKE}; {_ADD}; END",
]


def upgrade() -> None:
    op.add_column("jobs", sa.Column("committed_usd", sa.Float(), nullable=False, server_default="0"))
    op.execute(
        "UPDATE jobs SET committed_usd = "
        "(SELECT coalesce(sum(amount_usd), 0) FROM cost_ledger WHERE cost_ledger.job_id = jobs.id)"
    )
    for statement in POSTGRESQL if op.get_bind().dialect.name == "postgresql" else SQLITE:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER cost_ledger_committed ON cost_ledger")
        op.execute("DROP FUNCTION cost_ledger_committed()")
    else:
        for name in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER cost_ledger_committed_{name}")
    from migrations.views import job_progress_v2

    op.execute("DROP VIEW job_progress")  # SQLite rebuilds the table below
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("committed_usd")
    op.execute(job_progress_v2(op.get_bind().dialect.name))
