"""web: users, login sessions, failed logins, audit log

Written once; never edit a released revision, add a new one.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "web_user",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=256), nullable=False),
        sa.Column(
            "role",
            sa.Enum("radiologist", "admin", name="web_role", native_enum=False, create_constraint=True, length=16),
            nullable=False,
        ),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_user")),
        sa.UniqueConstraint("username", name=op.f("uq_web_user_username")),
    )
    op.create_table(
        "web_session",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("remote_addr", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["web_user.id"], name=op.f("fk_web_session_user_id_web_user")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_session")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_web_session_token_sha256")),
    )
    with op.batch_alter_table("web_session", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_web_session_user_id"), ["user_id"], unique=False)

    op.create_table(
        "web_login_failure",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("remote_addr", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_login_failure")),
    )
    with op.batch_alter_table("web_login_failure", schema=None) as batch_op:
        batch_op.create_index("ix_web_login_failure_remote_addr_at", ["remote_addr", "at"], unique=False)
        batch_op.create_index("ix_web_login_failure_username_at", ["username", "at"], unique=False)

    op.create_table(
        "web_audit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("remote_addr", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("StudyInstanceUID", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_audit")),
    )
    with op.batch_alter_table("web_audit", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_web_audit_StudyInstanceUID"), ["StudyInstanceUID"], unique=False)
        batch_op.create_index(batch_op.f("ix_web_audit_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_web_audit_username"), ["username"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("web_audit", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_web_audit_username"))
        batch_op.drop_index(batch_op.f("ix_web_audit_at"))
        batch_op.drop_index(batch_op.f("ix_web_audit_StudyInstanceUID"))
    op.drop_table("web_audit")
    with op.batch_alter_table("web_login_failure", schema=None) as batch_op:
        batch_op.drop_index("ix_web_login_failure_username_at")
        batch_op.drop_index("ix_web_login_failure_remote_addr_at")
    op.drop_table("web_login_failure")
    with op.batch_alter_table("web_session", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_web_session_user_id"))
    op.drop_table("web_session")
    op.drop_table("web_user")
