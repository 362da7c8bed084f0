"""completion, content idempotency and delivery

Revision ID: 0008
Revises: 0007

``associations.listener``: the ``host:pid`` of the listener process that holds an inbound
association (its heartbeat tells a live association from one of a crashed listener).
``instances.pixel_sha256`` / ``pixel_of_sha256``: the hash of the decoded pixel data and the file
hash it was computed from (the content part of a job's idempotency key, cached).
``series.complete_requested``: "complete now" asked by an administrator.
``jobs.replaces_job_id``: the job whose results a re-run replaces (its SR is the predecessor).
``transfers.object_status``: per-object (SOP Instance UID) delivery status (0007 added
``transfers.instance_ids``, the received instances a transfer forwards).
``destinations.kind`` / ``url`` / ``options``: the destination kind ("dicom" C-STORE or
"dicomweb" STOW-RS), the DICOMweb base URL, and kind options (auth header, SR fallback).
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('associations', schema=None) as b:
        b.add_column(sa.Column('listener', sa.String(length=128), nullable=True))
    with op.batch_alter_table('instances', schema=None) as b:
        b.add_column(sa.Column('pixel_sha256', sa.String(length=64), nullable=True))
        b.add_column(sa.Column('pixel_of_sha256', sa.String(length=64), nullable=True))
    with op.batch_alter_table('series', schema=None) as b:
        b.add_column(sa.Column('complete_requested', sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table('jobs', schema=None) as b:
        b.add_column(sa.Column('replaces_job_id', sa.Integer(), nullable=True))
    with op.batch_alter_table('transfers', schema=None) as b:
        b.add_column(sa.Column('object_status', sa.JSON(), nullable=True))
    with op.batch_alter_table('destinations', schema=None) as b:
        b.add_column(sa.Column('kind', sa.String(length=16), server_default='dicom', nullable=False))
        b.add_column(sa.Column('url', sa.Text(), nullable=True))
        b.add_column(sa.Column('options', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('destinations', schema=None) as b:
        b.drop_column('options')
        b.drop_column('url')
        b.drop_column('kind')
    with op.batch_alter_table('transfers', schema=None) as b:
        b.drop_column('object_status')
    with op.batch_alter_table('jobs', schema=None) as b:
        b.drop_column('replaces_job_id')
    with op.batch_alter_table('series', schema=None) as b:
        b.drop_column('complete_requested')
    with op.batch_alter_table('instances', schema=None) as b:
        b.drop_column('pixel_of_sha256')
        b.drop_column('pixel_sha256')
    with op.batch_alter_table('associations', schema=None) as b:
        b.drop_column('listener')
