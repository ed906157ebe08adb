"""Index tables of the web app: users, login sessions, failed logins and the audit log.

Passwords are stored only as argon2 hashes; session cookies only as SHA-256 digests
of the random token the browser holds, so a copy of the database logs nobody in.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from pipeline.index.schema import Base, UTCDateTime, _enum, utcnow


class Role(str, enum.Enum):
    """What a user may do: radiologists read the worklist; admins also see the audit log."""

    radiologist = "radiologist"
    admin = "admin"


class User(Base):
    __tablename__ = "web_user"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[Role] = mapped_column(_enum(Role, "web_role"), default=Role.radiologist)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class WebSession(Base):
    """A logged-in browser. ``token_sha256`` is the digest of the cookie value."""

    __tablename__ = "web_session"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("web_user.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    remote_addr: Mapped[str] = mapped_column(String(64), default="")

    user: Mapped[User] = relationship()


class LoginFailure(Base):
    """One wrong password (or unknown user): the rate limit counts these per name and address."""

    __tablename__ = "web_login_failure"
    __table_args__ = (
        Index("ix_web_login_failure_username_at", "username", "at"),
        Index("ix_web_login_failure_remote_addr_at", "remote_addr", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64))
    remote_addr: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AuditEvent(Base):
    """One access to the web app or API: who, from where, what, and the answer."""

    __tablename__ = "web_audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    username: Mapped[str] = mapped_column(String(64), default="", index=True)
    remote_addr: Mapped[str] = mapped_column(String(64), default="")
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    status_code: Mapped[int] = mapped_column(Integer)
    # What happened beyond the request line: "login", "login failed", "mark read", ...
    action: Mapped[str] = mapped_column(String(64), default="")
    StudyInstanceUID: Mapped[str] = mapped_column(String(64), default="", index=True)
    detail: Mapped[str] = mapped_column(Text, default="")
