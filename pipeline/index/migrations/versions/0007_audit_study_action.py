"""audit: one index on (StudyInstanceUID, action, at) instead of StudyInstanceUID alone

The worklist asks on every poll whether each critical, unread study has been
acknowledged since it was flagged (an audit record with the action "acknowledge
critical"): with this index that is one seek per study, not a walk over every access to
it (a study read in the viewer has thousands). The index starts with StudyInstanceUID,
so it also serves every lookup the old single-column one did; keeping both would only
slow down the audit write every request makes. Building it reads the whole audit log
once: seconds for millions of records.

Written once; never edit a released revision, add a new one.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("web_audit", schema=None) as batch_op:
        batch_op.create_index("ix_web_audit_study_action", ["StudyInstanceUID", "action", "at"], unique=False)
        batch_op.drop_index(batch_op.f("ix_web_audit_StudyInstanceUID"))


def downgrade() -> None:
    with op.batch_alter_table("web_audit", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_web_audit_StudyInstanceUID"), ["StudyInstanceUID"], unique=False)
        batch_op.drop_index("ix_web_audit_study_action")
