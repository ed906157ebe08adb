"""api tokens: the api_token table, and the uploader role (STOW-RS without reading)

The role column is a VARCHAR with a CHECK constraint (``native_enum=False``), named
``ck_web_user_web_role`` by the naming convention; widening it means dropping and
recreating that constraint. ``batch_alter_table`` does so on PostgreSQL with ALTER
TABLE and on SQLite by copying the table.

Written once; never edit a released revision, add a new one.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_ROLES = ("radiologist", "admin", "uploader")


def _role_check(roles: tuple[str, ...]) -> str:
    return "role IN (" + ", ".join(f"'{r}'" for r in roles) + ")"


def upgrade() -> None:
    with op.batch_alter_table("web_user", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_web_user_web_role"), type_="check")
        batch_op.create_check_constraint(op.f("ck_web_user_web_role"), _role_check(_ROLES))
    op.create_table(
        "api_token",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column(
            "role",
            sa.Enum(*_ROLES, name="web_role", native_enum=False, create_constraint=True, length=16),
            nullable=False,
        ),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["web_user.id"], name=op.f("fk_api_token_user_id_web_user")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_token")),
        sa.UniqueConstraint("name", name=op.f("uq_api_token_name")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_api_token_token_sha256")),
    )
    with op.batch_alter_table("api_token", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_token_user_id"), ["user_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("api_token", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_token_user_id"))
    op.drop_table("api_token")
    # Uploaders cannot be expressed before this revision: they are disabled radiologists then.
    op.execute("UPDATE web_user SET role = 'radiologist', active = false WHERE role = 'uploader'")
    with op.batch_alter_table("web_user", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_web_user_web_role"), type_="check")
        batch_op.create_check_constraint(op.f("ck_web_user_web_role"), _role_check(_ROLES[:2]))
