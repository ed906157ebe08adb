"""core: patient, study, series, instance (the archive index)

Written once; never edit a released revision, add a new one.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patient",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("PatientID", sa.String(length=64), nullable=False),
        sa.Column("IssuerOfPatientID", sa.String(length=64), nullable=False),
        sa.Column("PatientName", sa.String(length=324), nullable=False),
        sa.Column("PatientBirthDate", sa.String(length=8), nullable=False),
        sa.Column("PatientSex", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient")),
        sa.UniqueConstraint("PatientID", "IssuerOfPatientID", name="uq_patient_id_issuer"),
    )
    with op.batch_alter_table("patient", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_patient_PatientName"), ["PatientName"], unique=False)

    op.create_table(
        "study",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("StudyInstanceUID", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.Integer(), nullable=False),
        sa.Column("AccessionNumber", sa.String(length=16), nullable=False),
        sa.Column("StudyID", sa.String(length=16), nullable=False),
        sa.Column("StudyDate", sa.String(length=8), nullable=False),
        sa.Column("StudyTime", sa.String(length=16), nullable=False),
        sa.Column("StudyDescription", sa.String(length=64), nullable=False),
        sa.Column("ReferringPhysicianName", sa.String(length=324), nullable=False),
        sa.Column("ModalitiesInStudy", sa.String(length=64), nullable=False),
        sa.Column("NumberOfStudyRelatedSeries", sa.Integer(), nullable=False),
        sa.Column("NumberOfStudyRelatedInstances", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "received",
                "stable",
                "dispatched",
                "analysed",
                "failed",
                name="study_state",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("state_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["patient_id"], ["patient.id"], name=op.f("fk_study_patient_id_patient")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study")),
        sa.UniqueConstraint("StudyInstanceUID", name=op.f("uq_study_StudyInstanceUID")),
    )
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_study_AccessionNumber"), ["AccessionNumber"], unique=False)
        batch_op.create_index(batch_op.f("ix_study_StudyDate"), ["StudyDate"], unique=False)
        batch_op.create_index(batch_op.f("ix_study_patient_id"), ["patient_id"], unique=False)
        batch_op.create_index("ix_study_state_last_received", ["state", "last_received_at"], unique=False)

    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("SeriesInstanceUID", sa.String(length=64), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("Modality", sa.String(length=16), nullable=False),
        sa.Column("BodyPartExamined", sa.String(length=64), nullable=False),
        sa.Column("SeriesDescription", sa.String(length=64), nullable=False),
        sa.Column("SeriesNumber", sa.Integer(), nullable=True),
        sa.Column("SeriesDate", sa.String(length=8), nullable=False),
        sa.Column("SeriesTime", sa.String(length=16), nullable=False),
        sa.Column("ImageType", sa.String(length=256), nullable=False),
        sa.Column("SliceThickness", sa.Float(), nullable=True),
        sa.Column("NumberOfSeriesRelatedInstances", sa.Integer(), nullable=False),
        sa.Column(
            "origin",
            sa.Enum("received", "derived", name="series_origin", native_enum=False, create_constraint=True, length=16),
            nullable=False,
        ),
        sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"], name=op.f("fk_series_study_id_study")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series")),
        sa.UniqueConstraint("SeriesInstanceUID", name=op.f("uq_series_SeriesInstanceUID")),
    )
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_series_Modality"), ["Modality"], unique=False)
        batch_op.create_index(batch_op.f("ix_series_study_id"), ["study_id"], unique=False)

    op.create_table(
        "instance",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("SOPInstanceUID", sa.String(length=64), nullable=False),
        sa.Column("SOPClassUID", sa.String(length=64), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("InstanceNumber", sa.Integer(), nullable=True),
        sa.Column("TransferSyntaxUID", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["series_id"], ["series.id"], name=op.f("fk_instance_series_id_series")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instance")),
        sa.UniqueConstraint("SOPInstanceUID", name=op.f("uq_instance_SOPInstanceUID")),
    )
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_instance_SOPClassUID"), ["SOPClassUID"], unique=False)
        batch_op.create_index(batch_op.f("ix_instance_series_id"), ["series_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instance_series_id"))
        batch_op.drop_index(batch_op.f("ix_instance_SOPClassUID"))

    op.drop_table("instance")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_series_study_id"))
        batch_op.drop_index(batch_op.f("ix_series_Modality"))

    op.drop_table("series")
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index("ix_study_state_last_received")
        batch_op.drop_index(batch_op.f("ix_study_patient_id"))
        batch_op.drop_index(batch_op.f("ix_study_StudyDate"))
        batch_op.drop_index(batch_op.f("ix_study_AccessionNumber"))

    op.drop_table("study")
    with op.batch_alter_table("patient", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_patient_PatientName"))

    op.drop_table("patient")
