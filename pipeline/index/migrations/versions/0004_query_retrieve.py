"""query/retrieve: what C-FIND answers that the index lacked, and indexes for matching

SpecificCharacterSet on patient, study and series (names are returned in the character
set they were received in), InstitutionName on study, and indexes for the keys
workstations match on. Existing rows get empty values; an archive re-indexed by
``Archive.recover`` or received again fills them.

Written once; never edit a released revision, add a new one.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _text(name: str) -> sa.Column:
    # server_default fills the rows already there (NOT NULL on both SQLite and PostgreSQL).
    return sa.Column(name, sa.String(length=64), nullable=False, server_default="")


def upgrade() -> None:
    with op.batch_alter_table("patient", schema=None) as batch_op:
        batch_op.add_column(_text("SpecificCharacterSet"))
        batch_op.create_index(batch_op.f("ix_patient_PatientBirthDate"), ["PatientBirthDate"], unique=False)
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.add_column(_text("InstitutionName"))
        batch_op.add_column(_text("SpecificCharacterSet"))
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(_text("SpecificCharacterSet"))
        batch_op.create_index("ix_series_study_id_Modality", ["study_id", "Modality"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index("ix_series_study_id_Modality")
        batch_op.drop_column("SpecificCharacterSet")
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_column("SpecificCharacterSet")
        batch_op.drop_column("InstitutionName")
    with op.batch_alter_table("patient", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_patient_PatientBirthDate"))
        batch_op.drop_column("SpecificCharacterSet")
