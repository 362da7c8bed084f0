"""stage heartbeats; jobs.lease_expiries

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-02 07:10:00

``stage_heartbeats``: one row per running stage process (``/healthz`` reads it).
``jobs.lease_expiries``: reclaims after an expired lease, counted apart from ``attempts`` so a
restarted node does not use up a job's attempts.
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('stage_heartbeats',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=False),
    sa.Column('identity', sa.String(length=128), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('stage', 'identity', name='uq_stage_heartbeats_stage_identity')
    )
    with op.batch_alter_table('stage_heartbeats', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_stage_heartbeats_stage'), ['stage'], unique=False)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_expiries', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('lease_expiries')
    with op.batch_alter_table('stage_heartbeats', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_stage_heartbeats_stage'))
    op.drop_table('stage_heartbeats')
