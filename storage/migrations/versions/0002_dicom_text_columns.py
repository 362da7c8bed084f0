"""index text columns sized by DICOM VR: descriptive attributes unbounded

Revision ID: 0002
Revises: 0003 (written on 0001; re-chained onto main's head at the merge)
Create Date: 2026-12-02 07:10:00

The descriptive attributes the listener indexes (PN, LO, SH, CS, DA) become TEXT: a value
longer than its VR's standard length (a 24-character accession number, a 200-character
description) no longer overflows a VARCHAR on PostgreSQL. UIDs stay VARCHAR(64) (VR UI).
See storage/limits.py. On SQLite the tables are rebuilt (batch mode); ``storage.db.migrate``
turns foreign-key enforcement off meanwhile so the rebuild cascades to nothing.
Downgrade restores the old lengths and fails on PostgreSQL if longer values were stored.
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0003'
branch_labels = None
depends_on = None

#: table -> [(column, old VARCHAR length)]
COLUMNS = {
    "studies": [("patient_name", 324), ("patient_id", 64), ("accession_number", 16), ("study_date", 8),
                ("study_description", 64), ("modalities", 64)],
    "series": [("modality", 16), ("series_description", 64)],
}


def upgrade() -> None:
    for table, columns in COLUMNS.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name, length in columns:
                batch_op.alter_column(name, existing_type=sa.String(length=length), type_=sa.Text(),
                                      existing_nullable=True)


def downgrade() -> None:
    for table, columns in COLUMNS.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name, length in columns:
                batch_op.alter_column(name, existing_type=sa.Text(), type_=sa.String(length=length),
                                      existing_nullable=True)
