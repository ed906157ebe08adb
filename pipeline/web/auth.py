"""Users, passwords, login sessions and the failed-login limit.

Passwords are hashed with argon2id (argon2-cffi defaults). A login creates a server-side
session (a row in ``web_session``); the browser holds a random token in an HttpOnly
cookie and the index holds only its SHA-256 digest. The JSON API also accepts HTTP
Basic. After ``[web] login_max_failures`` wrong passwords for one name (or four times as
many from one address) within ``login_lockout_seconds``, further attempts are refused
until the window has passed, even with the right password.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from pipeline.config import Settings
from pipeline.errors import ConfigError, RadtriageError
from pipeline.index.accounts import LoginFailure, Role, User, WebSession
from pipeline.index.schema import utcnow

log = logging.getLogger(__name__)

SESSION_COOKIE = "radtriage_session"
SESSION_LIFETIME = timedelta(hours=12)
SESSION_IDLE = timedelta(hours=2)
_TOUCH_EVERY = timedelta(minutes=1)
MIN_PASSWORD_LENGTH = 8
# One address may fail this many times more than one name: an office behind one NAT
# address must not lock everyone out after one person's typos.
ADDRESS_FACTOR = 4

_hasher = PasswordHasher()
# Verified against when the user does not exist, so that a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


class UserError(RadtriageError):
    """A user could not be created or changed (the message says why)."""


@dataclass(frozen=True)
class AuthUser:
    """The logged-in user of one request."""

    id: int
    username: str
    role: Role
    session_token: str = ""  # empty when authenticated with HTTP Basic

    @property
    def is_admin(self) -> bool:
        return self.role is Role.admin


class LockedOut(RadtriageError):
    """Too many wrong passwords: refused until ``retry_after`` seconds have passed."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed logins; try again in {max(1, round(retry_after / 60))} minute(s)")
        self.retry_after = retry_after


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def create_user(session: Session, username: str, password: str, role: Role | str = Role.radiologist) -> User:
    """Add a user, or set a new password and role for an existing one.

    Raises
    ------
    UserError
        For an empty or over-long name or a password shorter than 8 characters.
    """
    username = username.strip()
    if not username or len(username) > 64 or any(c.isspace() for c in username):
        raise UserError(f"user name {username!r} must be 1-64 characters without spaces")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password for {username} must have at least {MIN_PASSWORD_LENGTH} characters")
    role = Role(role)
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        user = User(username=username, role=role, password_hash=hash_password(password), active=True)
        session.add(user)
    else:
        user.password_hash = hash_password(password)
        user.role = role
        user.active = True
    session.flush()
    return user


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Authenticator:
    """Checks passwords against the index, applying the failed-login limit."""

    def __init__(self, max_failures: int, lockout_seconds: float) -> None:
        self.max_failures = max_failures
        self.window = timedelta(seconds=lockout_seconds)

    def check_lockout(self, session: Session, username: str, remote_addr: str) -> None:
        """Raise :class:`LockedOut` when the name or the address has too many recent failures."""
        now = utcnow()
        since = now - self.window
        limits = (
            (LoginFailure.username, username, self.max_failures),
            (LoginFailure.remote_addr, remote_addr, self.max_failures * ADDRESS_FACTOR),
        )
        for column, value, limit in limits:
            recent = session.scalars(
                select(LoginFailure.at)
                .where(column == value, LoginFailure.at > since)
                .order_by(LoginFailure.at.desc())
                .limit(limit)
            ).all()
            if len(recent) >= limit:
                # Refused until the limit-th most recent failure leaves the window.
                raise LockedOut((recent[-1] + self.window - now).total_seconds())

    def verify(self, session: Session, username: str, password: str, remote_addr: str) -> AuthUser | None:
        """The user when name and password match, else ``None`` (and the failure is recorded).

        Raises
        ------
        LockedOut
            Before checking anything, when the limit is reached.
        """
        username = username.strip()[:64]
        self.check_lockout(session, username, remote_addr)
        user = session.scalar(select(User).where(User.username == username))
        ok = False
        try:
            ok = _hasher.verify(user.password_hash if user is not None and user.active else _DUMMY_HASH, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            ok = False
        if not ok or user is None or not user.active:
            session.add(LoginFailure(username=username, remote_addr=remote_addr[:64], at=utcnow()))
            session.flush()
            log.warning("failed login for %r from %s", username, remote_addr)
            return None
        if _hasher.check_needs_rehash(user.password_hash):
            user.password_hash = hash_password(password)
        # A success clears this name's failures, not the address's (one attacker, many names).
        session.execute(delete(LoginFailure).where(LoginFailure.username == username))
        user.last_login_at = utcnow()
        return AuthUser(user.id, user.username, user.role)

    @staticmethod
    def open_session(session: Session, user: AuthUser, remote_addr: str) -> str:
        """Start a login session; returns the token for the cookie."""
        token = secrets.token_urlsafe(32)
        now = utcnow()
        session.add(
            WebSession(
                token_sha256=_digest(token),
                user_id=user.id,
                created_at=now,
                last_seen_at=now,
                expires_at=now + SESSION_LIFETIME,
                remote_addr=remote_addr[:64],
            )
        )
        # Housekeeping: forget sessions that ended long ago.
        session.execute(delete(WebSession).where(WebSession.expires_at < now - SESSION_LIFETIME))
        return token

    @staticmethod
    def resume_session(session: Session, token: str) -> AuthUser | None:
        """The user of a session cookie, or ``None`` if it is unknown, expired or idle too long."""
        if not token:
            return None
        row = session.scalar(select(WebSession).where(WebSession.token_sha256 == _digest(token)))
        now = utcnow()
        if row is None or row.expires_at <= now or row.last_seen_at + SESSION_IDLE <= now or not row.user.active:
            return None
        if now - row.last_seen_at > _TOUCH_EVERY:
            row.last_seen_at = now
        return AuthUser(row.user.id, row.user.username, row.user.role, session_token=token)

    @staticmethod
    def close_session(session: Session, token: str) -> None:
        session.execute(delete(WebSession).where(WebSession.token_sha256 == _digest(token)))


def csrf_token(secret: bytes, session_token: str) -> str:
    """The token a form must echo back: an HMAC of the session token."""
    return hmac.new(secret, b"csrf:" + session_token.encode(), hashlib.sha256).hexdigest()


def csrf_ok(secret: bytes, session_token: str, given: str) -> bool:
    return bool(session_token) and hmac.compare_digest(csrf_token(secret, session_token), given or "")


def load_secret(settings: Settings) -> bytes:
    """``[web] secret_key``, or one generated once and kept in ``<data_dir>/web_secret`` (mode 0600)."""
    if settings.web.secret_key:
        return settings.web.secret_key.encode()
    path = Path(settings.storage.data_dir) / "web_secret"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    except OSError as err:
        raise ConfigError(f"cannot create {path} ({err}); set [web] secret_key instead") from err
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_hex(32).encode())
    return path.read_bytes().strip()


def users_exist(session: Session) -> bool:
    """True when at least one active user can log in."""
    return bool(session.scalar(select(func.count(User.id)).where(User.active.is_(True))))
