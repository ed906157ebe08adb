"""Users, passwords, login sessions and the failed-login limit.

Passwords are hashed with argon2id (argon2-cffi defaults). A login creates a server-side
session (a row in ``web_session``); the browser holds a random token in an HttpOnly
cookie and the index holds only its SHA-256 digest. Setting a user's password (again)
ends their sessions. The JSON API also accepts HTTP Basic; a right name and password is
remembered for ``[web] basic_auth_cache_seconds`` as an HMAC under a per-process random
key (never the password), so a polling program costs one argon2 hash, not one a request.
Programs had better use API tokens (:mod:`pipeline.web.tokens`): no argon2 at all.

Failed logins slow the attacker without locking the real user out: after ``[web]
login_max_failures`` wrong passwords for one name *from one address* (or four times as
many, any names, from one address) further attempts from there are refused for
``login_lockout_seconds``, doubling with each failure after that up to
``login_lockout_max_seconds``. The same name from another address is not refused.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import and_, delete, func, select
from sqlalchemy.orm import Session

from pipeline.config import Settings
from pipeline.errors import ConfigError, RadtriageError
from pipeline.index.accounts import LoginFailure, Role, User, WebSession
from pipeline.index.schema import utcnow

log = logging.getLogger(__name__)

SESSION_COOKIE = "radtriage_session"
# Holds a random nonce before login; the login form echoes an HMAC of it (login CSRF).
LOGIN_COOKIE = "radtriage_login"
SESSION_LIFETIME = timedelta(hours=12)
SESSION_IDLE = timedelta(hours=2)
_TOUCH_EVERY = timedelta(minutes=1)
MIN_PASSWORD_LENGTH = 8
# One address may fail this many times more than one name from it: an office behind one
# NAT address must not lock everyone out after one person's typos.
ADDRESS_FACTOR = 4
CACHE_ENTRIES = 1024

_hasher = PasswordHasher()
# Verified against when the user does not exist, so that a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


class UserError(RadtriageError):
    """A user could not be created or changed (the message says why)."""


@dataclass(frozen=True)
class AuthUser:
    """The logged-in user of one request."""

    id: int  # web_user.id; 0 for an API token without an owner
    username: str
    role: Role
    session_token: str = ""  # empty when authenticated with HTTP Basic or a token
    token_name: str = ""  # the API token's name when authenticated with one

    @property
    def is_admin(self) -> bool:
        return self.role is Role.admin


def may_store(user: AuthUser) -> bool:
    """Whether ``user`` may add instances to the archive (STOW-RS)."""
    return user.role in (Role.admin, Role.uploader)


def may_read(user: AuthUser) -> bool:
    """Whether ``user`` may see patient data: everyone but an uploader.

    The web app's middleware asks this once for every request, so no page or route can
    forget it; an uploader gets only STOW-RS and logging out.
    """
    return user.role is not Role.uploader


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
        # A new password ends every login made with the old one (a stolen cookie too).
        ended = end_sessions(session, user.id)
        if ended:
            log.info("password of %s set: %d open session(s) ended", username, ended)
    session.flush()
    return user


def end_sessions(session: Session, user_id: int) -> int:
    """Log the user out everywhere; returns how many sessions were open."""
    result = session.execute(delete(WebSession).where(WebSession.user_id == user_id))
    return int(getattr(result, "rowcount", 0) or 0)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class _Verified:
    user_id: int
    password_hash: str  # the hash it was verified against: a new password no longer matches
    until: float  # time.monotonic()


class CredentialCache:
    """Name + password pairs verified lately, keyed by an HMAC under a per-process random key.

    Neither the password nor a hash anyone could test guesses against leaves the process.
    A hit is only used while the user's stored hash is still the one it was verified
    against and the user is active (checked by :meth:`Authenticator.verify`), so a new
    password or ``radtriage user disable`` in another process takes effect at once.
    """

    def __init__(self, seconds: float, entries: int = CACHE_ENTRIES) -> None:
        self.seconds = seconds
        self.entries = entries
        self._key = secrets.token_bytes(32)
        self._items: OrderedDict[bytes, _Verified] = OrderedDict()
        self._lock = threading.Lock()

    def _key_of(self, username: str, password: str) -> bytes:
        data = username.encode("utf-8", "surrogatepass") + b"\0" + password.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def get(self, username: str, password: str) -> _Verified | None:
        if self.seconds <= 0:
            return None
        key = self._key_of(username, password)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and hit.until <= time.monotonic():
                del self._items[key]
                hit = None
            return hit

    def put(self, username: str, password: str, user_id: int, password_hash: str) -> None:
        if self.seconds <= 0:
            return
        key = self._key_of(username, password)
        with self._lock:
            self._items[key] = _Verified(user_id, password_hash, time.monotonic() + self.seconds)
            self._items.move_to_end(key)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)

    def forget(self, user_id: int) -> None:
        """Drop every entry of the user (password changed, user disabled)."""
        with self._lock:
            for key in [k for k, v in self._items.items() if v.user_id == user_id]:
                del self._items[key]


class Authenticator:
    """Checks passwords against the index, applying the failed-login limit.

    Parameters
    ----------
    max_failures, lockout_seconds
        Wrong passwords for one name from one address before that pair is refused, and
        for how long (after the latest failure); four times as many from one address
        refuse the address.
    max_lockout_seconds
        Each failure past the limit doubles the lockout, up to this; failures are
        remembered this long.
    cache_seconds
        How long a right HTTP Basic name and password is remembered (0: never).
    """

    def __init__(
        self,
        max_failures: int,
        lockout_seconds: float,
        *,
        max_lockout_seconds: float = 3600.0,
        cache_seconds: float = 0.0,
    ) -> None:
        self.max_failures = max_failures
        self.lockout_seconds = lockout_seconds
        self.max_lockout_seconds = max(max_lockout_seconds, lockout_seconds)
        self.memory = timedelta(seconds=self.max_lockout_seconds)
        self.cache = CredentialCache(cache_seconds)
        self.hash_verifications = 0  # argon2 verifications done (a cache hit does none)
        self._count_lock = threading.Lock()

    def lockout_for(self, failures: int, limit: int) -> float:
        """Seconds refused after the latest of ``failures`` (``>= limit``) failures."""
        return min(self.lockout_seconds * 2.0 ** min(failures - limit, 40), self.max_lockout_seconds)

    def check_lockout(self, session: Session, username: str, remote_addr: str) -> None:
        """Raise :class:`LockedOut` when this name from this address, or this address, failed too often."""
        now = utcnow()
        since = now - self.memory
        limits = (
            (and_(LoginFailure.username == username, LoginFailure.remote_addr == remote_addr), self.max_failures),
            (LoginFailure.remote_addr == remote_addr, self.max_failures * ADDRESS_FACTOR),
        )
        for where, limit in limits:
            recent = session.scalars(
                select(LoginFailure.at)
                .where(where, LoginFailure.at > since)
                .order_by(LoginFailure.at.desc())
                .limit(limit + 41)  # enough to reach the longest lockout
            ).all()
            if len(recent) >= limit:
                until = recent[0] + timedelta(seconds=self.lockout_for(len(recent), limit))
                if until > now:
                    raise LockedOut((until - now).total_seconds())

    def _hash_matches(self, password_hash: str, password: str) -> bool:
        with self._count_lock:
            self.hash_verifications += 1
        try:
            return bool(_hasher.verify(password_hash, password))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def verify(
        self, session: Session, username: str, password: str, remote_addr: str, *, cached: bool = False
    ) -> AuthUser | None:
        """The user when name and password match, else ``None`` (and the failure is recorded).

        Parameters
        ----------
        cached
            Use (and fill) the credential cache: for HTTP Basic, sent with every request.

        Raises
        ------
        LockedOut
            Before checking anything, when the limit is reached.
        """
        username = username.strip()[:64]
        remote_addr = remote_addr[:64]
        self.check_lockout(session, username, remote_addr)
        if cached and (hit := self.cache.get(username, password)) is not None:
            known = session.get(User, hit.user_id)
            if (
                known is not None
                and known.active
                and known.username == username
                and hmac.compare_digest(known.password_hash, hit.password_hash)
            ):
                return AuthUser(known.id, known.username, known.role)
            self.cache.forget(hit.user_id)
        user = session.scalar(select(User).where(User.username == username))
        ok = self._hash_matches(user.password_hash if user is not None and user.active else _DUMMY_HASH, password)
        if not ok or user is None or not user.active:
            session.add(LoginFailure(username=username, remote_addr=remote_addr, at=utcnow()))
            session.flush()
            log.warning("failed login for %r from %s", username, remote_addr)
            return None
        if _hasher.check_needs_rehash(user.password_hash):
            user.password_hash = hash_password(password)
        # A success clears this name's failures from this address only: not an attacker's elsewhere.
        session.execute(
            delete(LoginFailure).where(LoginFailure.username == username, LoginFailure.remote_addr == remote_addr)
        )
        user.last_login_at = utcnow()
        if cached:
            self.cache.put(username, password, user.id, user.password_hash)
        return AuthUser(user.id, user.username, user.role)

    def open_session(self, session: Session, user: AuthUser, remote_addr: str) -> str:
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
        # Housekeeping: forget sessions that ended long ago, and failures no lockout counts.
        session.execute(delete(WebSession).where(WebSession.expires_at < now - SESSION_LIFETIME))
        session.execute(delete(LoginFailure).where(LoginFailure.at < now - self.memory))
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


def login_csrf_token(secret: bytes, nonce: str) -> str:
    """The token the login form echoes back: an HMAC of the pre-login cookie's nonce.

    Without it a page elsewhere could post its own credentials to ``/login`` and log the
    victim's browser in as the attacker (login CSRF).
    """
    return hmac.new(secret, b"login-csrf:" + nonce.encode(), hashlib.sha256).hexdigest()


def login_csrf_ok(secret: bytes, nonce: str, given: str) -> bool:
    return bool(nonce) and hmac.compare_digest(login_csrf_token(secret, nonce), given or "")


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
