"""triage: dispatch runs, AI results and findings, worklist, forwards

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "forward_job",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("SOPInstanceUID", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("destination_ae", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "pending",
                "delivered",
                "dead",
                name="forward_state",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_forward_job")),
        sa.UniqueConstraint("SOPInstanceUID", "destination_ae", name="uq_forward_job_sop_destination"),
    )
    with op.batch_alter_table("forward_job", schema=None) as batch_op:
        batch_op.create_index("ix_forward_job_due", ["state", "next_attempt_at"], unique=False)

    op.create_table(
        "ai_result",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("SourceSeriesInstanceUID", sa.String(length=64), nullable=False),
        sa.Column("SegSOPInstanceUID", sa.String(length=64), nullable=False),
        sa.Column("SRSOPInstanceUID", sa.String(length=64), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("superseded", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"], name=op.f("fk_ai_result_study_id_study")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_result")),
        sa.UniqueConstraint("study_id", "revision", "model_name", "model_version", name="uq_ai_result_run_model"),
    )
    with op.batch_alter_table("ai_result", schema=None) as batch_op:
        batch_op.create_index("ix_ai_result_study_current", ["study_id", "superseded"], unique=False)
        batch_op.create_index(batch_op.f("ix_ai_result_study_id"), ["study_id"], unique=False)

    op.create_table(
        "triage_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("flow_run_id", sa.String(length=64), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "dispatched",
                "running",
                "done",
                "failed",
                name="run_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stable_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("timings", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"], name=op.f("fk_triage_run_study_id_study")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_triage_run")),
        sa.UniqueConstraint("study_id", "revision", name="uq_triage_run_study_revision"),
    )
    with op.batch_alter_table("triage_run", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_triage_run_study_id"), ["study_id"], unique=False)

    op.create_table(
        "worklist_entry",
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column(
            "ai_status",
            sa.Enum(
                "pending",
                "running",
                "done",
                "failed",
                name="ai_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("ai_error", sa.Text(), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("priority_rank", sa.Integer(), nullable=False),
        sa.Column("summary", sa.String(length=256), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("results_stored_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("triaged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("time_to_triage_seconds", sa.Float(), nullable=True),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("read_by", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"], name=op.f("fk_worklist_entry_study_id_study")),
        sa.PrimaryKeyConstraint("study_id", name=op.f("pk_worklist_entry")),
    )
    with op.batch_alter_table("worklist_entry", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_worklist_entry_priority_rank"), ["priority_rank"], unique=False)

    op.create_table(
        "ai_finding",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("present", sa.Boolean(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("volume_ml", sa.Float(), nullable=False),
        sa.Column("max_diameter_mm", sa.Float(), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("segment_number", sa.Integer(), nullable=False),
        sa.Column("key_sop_instance_uid", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["result_id"], ["ai_result.id"], name=op.f("fk_ai_finding_result_id_ai_result")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_finding")),
    )
    with op.batch_alter_table("ai_finding", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ai_finding_result_id"), ["result_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("ai_finding", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_finding_result_id"))

    op.drop_table("ai_finding")
    with op.batch_alter_table("worklist_entry", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_worklist_entry_priority_rank"))

    op.drop_table("worklist_entry")
    with op.batch_alter_table("triage_run", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_triage_run_study_id"))

    op.drop_table("triage_run")
    with op.batch_alter_table("ai_result", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_result_study_id"))
        batch_op.drop_index("ix_ai_result_study_current")

    op.drop_table("ai_result")
    with op.batch_alter_table("forward_job", schema=None) as batch_op:
        batch_op.drop_index("ix_forward_job_due")

    op.drop_table("forward_job")
