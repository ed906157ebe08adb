"""triage queue: AI status "not_applicable", and each run's place in the AI queue

A study no model can read is marked ``not_applicable`` at dispatch instead of getting a
flow run; ``worklist_entry.ai_status`` is a VARCHAR with a CHECK constraint
(``native_enum=False``, named ``ck_worklist_entry_ai_status`` by the naming convention),
so widening it drops and recreates that constraint: ``batch_alter_table`` does so with
ALTER TABLE on PostgreSQL and by copying the table on SQLite. ``triage_run`` gains the
urgency the dispatcher chose (its Prefect work queue) and why, with an index for the
queue-position query. Existing runs are routine.

Written once; never edit a released revision, add a new one.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_AI_STATUSES = ("pending", "running", "done", "failed", "not_applicable")


def _ai_status_check(statuses: tuple[str, ...]) -> str:
    return "ai_status IN (" + ", ".join(f"'{s}'" for s in statuses) + ")"


def upgrade() -> None:
    with op.batch_alter_table("worklist_entry", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_worklist_entry_ai_status"), type_="check")
        batch_op.create_check_constraint(op.f("ck_worklist_entry_ai_status"), _ai_status_check(_AI_STATUSES))
    with op.batch_alter_table("triage_run", schema=None) as batch_op:
        # server_default fills the rows already there (NOT NULL on both databases).
        batch_op.add_column(sa.Column("urgency", sa.String(length=16), nullable=False, server_default="routine"))
        batch_op.add_column(sa.Column("urgency_rank", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("urgency_reason", sa.String(length=256), nullable=False, server_default=""))
        batch_op.create_index("ix_triage_run_queue", ["status", "urgency_rank", "dispatched_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("triage_run", schema=None) as batch_op:
        batch_op.drop_index("ix_triage_run_queue")
        batch_op.drop_column("urgency_reason")
        batch_op.drop_column("urgency_rank")
        batch_op.drop_column("urgency")
    # "No model applies" cannot be expressed before this revision: such a study reads as
    # done with the "No applicable AI model" summary the flow used to write.
    op.execute("UPDATE worklist_entry SET ai_status = 'done' WHERE ai_status = 'not_applicable'")
    with op.batch_alter_table("worklist_entry", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_worklist_entry_ai_status"), type_="check")
        batch_op.create_check_constraint(op.f("ck_worklist_entry_ai_status"), _ai_status_check(_AI_STATUSES[:-1]))
