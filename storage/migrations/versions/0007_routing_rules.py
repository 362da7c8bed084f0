"""routing: rules, decisions, return_to, priorities, forwarded originals

Revision ID: 0007
Revises: 0009

``routing_rules``: the rules (``dicom_node.routing``), in ``position`` order.
``routing_decisions``: what routing decided for each series, and why.
``sources.return_to``: the destinations "sender" means for a source.
``series.route_analyse``/``route_summary``/``discard_pending``: the latest decision on the series.
``jobs.priority``/``routing`` and ``transfers.priority``/``kind``/``series_id``/``instance_ids``:
urgent work first; where results go; transfers of forwarded originals.
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('routing_rules',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('definition', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    with op.batch_alter_table('routing_rules', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_routing_rules_position'), ['position'], unique=False)
    op.create_table('routing_decisions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('series_id', sa.Integer(), nullable=False),
    sa.Column('decided_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('matched', sa.JSON(), nullable=False),
    sa.Column('actions', sa.JSON(), nullable=False),
    sa.Column('destinations', sa.JSON(), nullable=False),
    sa.Column('summary', sa.Text(), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['series_id'], ['series.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('routing_decisions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_routing_decisions_series_id'), ['series_id'], unique=False)
    with op.batch_alter_table('sources', schema=None) as batch_op:
        batch_op.add_column(sa.Column('return_to', sa.JSON(), nullable=True))
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('route_analyse', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('route_summary', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('discard_pending', sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('routing', sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_priority'), ['priority'], unique=False)
    with op.batch_alter_table('transfers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), server_default='results', nullable=False))
        batch_op.add_column(sa.Column('series_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('instance_ids', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('priority', sa.Integer(), server_default='0', nullable=False))
        batch_op.create_index(batch_op.f('ix_transfers_series_id'), ['series_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_transfers_priority'), ['priority'], unique=False)
        batch_op.create_foreign_key('fk_transfers_series_id_series', 'series', ['series_id'], ['id'],
                                    ondelete='CASCADE')


def downgrade() -> None:
    with op.batch_alter_table('transfers', schema=None) as batch_op:
        batch_op.drop_constraint('fk_transfers_series_id_series', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_transfers_priority'))
        batch_op.drop_index(batch_op.f('ix_transfers_series_id'))
        batch_op.drop_column('priority')
        batch_op.drop_column('instance_ids')
        batch_op.drop_column('series_id')
        batch_op.drop_column('kind')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_priority'))
        batch_op.drop_column('routing')
        batch_op.drop_column('priority')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('discard_pending')
        batch_op.drop_column('route_summary')
        batch_op.drop_column('route_analyse')
    with op.batch_alter_table('sources', schema=None) as batch_op:
        batch_op.drop_column('return_to')
    with op.batch_alter_table('routing_decisions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_routing_decisions_series_id'))
    op.drop_table('routing_decisions')
    with op.batch_alter_table('routing_rules', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_routing_rules_position'))
    op.drop_table('routing_rules')
