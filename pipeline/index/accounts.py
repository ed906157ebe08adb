"""Index tables of the web app: users, login sessions, API tokens, failed logins and the audit log.

Passwords are stored only as argon2 hashes; session cookies and API tokens only as
SHA-256 digests of the random token the browser or program holds, so a copy of the
database logs nobody in.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from pipeline.index.schema import Base, UTCDateTime, _enum, utcnow


class Role(str, enum.Enum):
    """What a user may do: radiologists read the worklist; admins also see the audit log
    and may store over STOW-RS; uploaders may store over STOW-RS, may not read patient data."""

    radiologist = "radiologist"
    admin = "admin"
    uploader = "uploader"


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


class ApiToken(Base):
    """A program's login (``Authorization: Bearer``). ``token_sha256`` is the digest of the token.

    The token is random (256 bits), so one SHA-256 lookup checks it; argon2 would only
    slow every request of a script down. A token with an owner works only while the
    owner is active; revoked and expired rows are kept until their name is reused.
    """

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(_enum(Role, "web_role"))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("web_user.id"), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Updated at most once a minute: a polling script must not write on every request.
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    user: Mapped[User | None] = relationship()


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
    # Per study, then per action: "has anyone acknowledged this critical finding since?"
    # is one seek (pipeline.web.alerts); lookups by study alone use its first column.
    __table_args__ = (Index("ix_web_audit_study_action", "StudyInstanceUID", "action", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    username: Mapped[str] = mapped_column(String(64), default="", index=True)
    remote_addr: Mapped[str] = mapped_column(String(64), default="")
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    status_code: Mapped[int] = mapped_column(Integer)
    # What happened beyond the request line: "login", "login failed", "mark read", ...
    action: Mapped[str] = mapped_column(String(64), default="")
    StudyInstanceUID: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
