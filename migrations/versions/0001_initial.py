"""initial schema: jobs, shards, attempts, checkpoints, cost ledger

Revision ID: 0001
Revises:
Create Date: 2026-11-25 17:34:41.249105
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.views import JOB_PROGRESS_V1

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None




def upgrade() -> None:
    op.create_table('jobs',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('status', sa.Enum('pending', 'running', 'finalizing', 'succeeded', 'succeeded_with_errors', 'failed', 'paused', 'cancelled', name='jobstatus', native_enum=False, length=32), nullable=False),
    sa.Column('task', sa.String(length=16), nullable=False),
    sa.Column('model', sa.Text(), nullable=False),
    sa.Column('input_url', sa.Text(), nullable=False),
    sa.Column('input_kind', sa.String(length=16), nullable=False),
    sa.Column('carried_columns', sa.JSON(), nullable=False),
    sa.Column('max_tokens', sa.Integer(), nullable=False),
    sa.Column('temperature', sa.Float(), nullable=False),
    sa.Column('rows_total', sa.Integer(), nullable=False),
    sa.Column('rows_per_shard', sa.Integer(), nullable=False),
    sa.Column('est_prompt_tokens', sa.Float(), nullable=False),
    sa.Column('shard_count', sa.Integer(), nullable=False),
    sa.Column('budget_usd', sa.Float(), nullable=True),
    sa.Column('deadline', sa.DateTime(timezone=True), nullable=True),
    sa.Column('tags', sa.JSON(), nullable=False),
    sa.Column('result_url', sa.Text(), nullable=True),
    sa.Column('result_tier', sa.String(length=8), nullable=True),
    sa.Column('rows_ok', sa.Integer(), nullable=False),
    sa.Column('rows_failed', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_status', ['status'], unique=False)

    op.create_table('shards',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('shard_index', sa.Integer(), nullable=False),
    sa.Column('row_start', sa.Integer(), nullable=False),
    sa.Column('row_end', sa.Integer(), nullable=False),
    sa.Column('status', sa.Enum('pending', 'queued', 'running', 'preempted', 'blocked', 'done', 'failed', name='shardstatus', native_enum=False, length=32), nullable=False),
    sa.Column('backend', sa.String(length=64), nullable=True),
    sa.Column('queue', sa.String(length=128), nullable=True),
    sa.Column('rows_done', sa.Integer(), nullable=False),
    sa.Column('rows_failed', sa.Integer(), nullable=False),
    sa.Column('input_tokens', sa.Integer(), nullable=False),
    sa.Column('output_tokens', sa.Integer(), nullable=False),
    sa.Column('cost_usd', sa.Float(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('lease_owner', sa.String(length=128), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_shards_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_shards')),
    sa.UniqueConstraint('job_id', 'shard_index', name=op.f('uq_shards_job_id'))
    )
    with op.batch_alter_table('shards', schema=None) as batch_op:
        batch_op.create_index('ix_shards_job_status', ['job_id', 'status'], unique=False)
        batch_op.create_index('ix_shards_status_lease', ['status', 'lease_expires_at'], unique=False)

    op.create_table('checkpoints',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('shard_id', sa.Integer(), nullable=False),
    sa.Column('first_row', sa.Integer(), nullable=False),
    sa.Column('row_count', sa.Integer(), nullable=False),
    sa.Column('rows_failed', sa.Integer(), nullable=False),
    sa.Column('input_tokens', sa.Integer(), nullable=False),
    sa.Column('output_tokens', sa.Integer(), nullable=False),
    sa.Column('cost_usd', sa.Float(), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['shard_id'], ['shards.id'], name=op.f('fk_checkpoints_shard_id_shards'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_checkpoints')),
    sa.UniqueConstraint('shard_id', 'first_row', name=op.f('uq_checkpoints_shard_id'))
    )
    op.create_table('cost_ledger',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('shard_id', sa.Integer(), nullable=True),
    sa.Column('backend', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.Enum('reserve', 'charge', 'release', name='ledgerkind', native_enum=False, length=32), nullable=False),
    sa.Column('amount_usd', sa.Float(), nullable=False),
    sa.Column('input_tokens', sa.Integer(), nullable=False),
    sa.Column('output_tokens', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_cost_ledger_job_id_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['shard_id'], ['shards.id'], name=op.f('fk_cost_ledger_shard_id_shards'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cost_ledger'))
    )
    with op.batch_alter_table('cost_ledger', schema=None) as batch_op:
        batch_op.create_index('ix_cost_ledger_job', ['job_id', 'kind'], unique=False)

    op.create_table('shard_attempts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('shard_id', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('worker_id', sa.String(length=128), nullable=False),
    sa.Column('backend', sa.String(length=64), nullable=True),
    sa.Column('outcome', sa.Enum('running', 'done', 'preempted', 'lost', 'failed', name='attemptoutcome', native_enum=False, length=32), nullable=False),
    sa.Column('resumed_from', sa.Integer(), nullable=False),
    sa.Column('rows_processed', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['shard_id'], ['shards.id'], name=op.f('fk_shard_attempts_shard_id_shards'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_shard_attempts')),
    sa.UniqueConstraint('shard_id', 'attempt', name=op.f('uq_shard_attempts_shard_id'))
    )
    op.execute(JOB_PROGRESS_V1)


def downgrade() -> None:
    op.execute("DROP VIEW job_progress")
    op.drop_table('shard_attempts')
    with op.batch_alter_table('cost_ledger', schema=None) as batch_op:
        batch_op.drop_index('ix_cost_ledger_job')

    op.drop_table('cost_ledger')
    op.drop_table('checkpoints')
    with op.batch_alter_table('shards', schema=None) as batch_op:
        batch_op.drop_index('ix_shards_status_lease')
        batch_op.drop_index('ix_shards_job_status')

    op.drop_table('shards')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_status')

    op.drop_table('jobs')
