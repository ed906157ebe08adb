"""API tokens: how programs (scripts, DICOMweb clients, other PACS) log in.

A token is ``rt_`` plus 256 random bits, shown once by ``radtriage token create``; the
index keeps only its SHA-256 digest (as for session cookies). Such a token cannot be
guessed, so checking it needs no slow hash and no failed-login limit: one lookup on the
unique digest, joined with the owner. That is the point of tokens: HTTP Basic costs an
argon2 hash whenever its cache misses, a token never does.

A token has its own role. With an owner (``--user``) it acts as that user in the audit
log and on the worklist, works only while the owner is active, and may not have more
rights than the owner (an admin owner may hold any role). Without an owner it appears
as ``token:NAME``. Revoking or expiry takes effect on the next request: nothing is cached.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.errors import RadtriageError
from pipeline.index.accounts import ApiToken, Role, User
from pipeline.index.db import session_scope
from pipeline.index.schema import utcnow
from pipeline.web.auth import AuthUser

log = logging.getLogger(__name__)

TOKEN_PREFIX = "rt_"
# Longer than any token we hand out; anything longer is refused before hashing.
MAX_TOKEN_LENGTH = 128
# "token:" + name still fits the audit log's 64-character user column.
_NAME = re.compile(r"[A-Za-z0-9._-]{1,48}")
LAST_USED_EVERY = timedelta(minutes=1)


class TokenError(RadtriageError):
    """A token could not be created or revoked (the message says why)."""


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _role_allowed(owner_role: Role, token_role: Role) -> bool:
    return owner_role is Role.admin or owner_role is token_role


def token_state(row: ApiToken) -> str:
    """``"active"``, ``"revoked"`` or ``"expired"``."""
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= utcnow():
        return "expired"
    return "active"


def create_token(
    session: Session,
    name: str,
    role: Role | str,
    *,
    username: str | None = None,
    expires_days: int | None = None,
) -> tuple[ApiToken, str]:
    """Add a token; returns the row and the token itself (shown once, never stored).

    A revoked or expired token's name may be reused: its row is replaced.

    Raises
    ------
    TokenError
        For a bad name, an active token of that name, an unknown or disabled owner, a
        role above the owner's, or ``expires_days < 1``.
    """
    if not _NAME.fullmatch(name):
        raise TokenError(f"token name {name!r} must be 1-48 letters, digits, '.', '_' or '-'")
    role = Role(role)
    if expires_days is not None and expires_days < 1:
        raise TokenError(f"--expires-days must be at least 1, not {expires_days}")
    owner = None
    if username is not None:
        owner = session.scalar(select(User).where(User.username == username))
        if owner is None or not owner.active:
            raise TokenError(f"no active user {username}; see radtriage user list")
        if not _role_allowed(owner.role, role):
            raise TokenError(f"{username} is {owner.role.value}: their token cannot be {role.value}")
    existing = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if existing is not None:
        if token_state(existing) == "active":
            raise TokenError(
                f"token {name} exists; revoke it first (radtriage token revoke {name}) or pick another name"
            )
        session.execute(delete(ApiToken).where(ApiToken.id == existing.id))
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    row = ApiToken(
        name=name,
        token_sha256=token_digest(token),
        role=role,
        user_id=owner.id if owner is not None else None,
        created_at=now,
        expires_at=now + timedelta(days=expires_days) if expires_days is not None else None,
    )
    session.add(row)
    session.flush()
    return row, token


def list_tokens(session: Session) -> list[tuple[ApiToken, str]]:
    """Every token with its owner's name (``""`` for none), by name."""
    rows = session.execute(select(ApiToken, User.username).outerjoin(User).order_by(ApiToken.name))
    return [(row, owner or "") for row, owner in rows]


def revoke_token(session: Session, name: str) -> ApiToken:
    """Refuse the token from the next request on.

    Raises
    ------
    TokenError
        When no token has that name.
    """
    row = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if row is None:
        raise TokenError(f"no token {name}; see radtriage token list")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


@dataclass(frozen=True)
class TokenCheck:
    """What :func:`check_token` found: the user, or why not (``name`` when the token is known)."""

    user: AuthUser | None
    name: str = ""
    reason: str = ""


def check_token(session_factory: sessionmaker[Session], token: str) -> TokenCheck:
    """The user a bearer token logs in, or the reason it is refused.

    One read-only lookup on the digest; a write only when ``last_used_at`` is older than
    a minute, so a busy script neither waits for the write lock nor holds it.
    """
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return TokenCheck(None, reason="unknown token")
    with session_scope(session_factory, readonly=True) as session:
        found = session.execute(
            select(ApiToken, User.username, User.active, User.role)
            .outerjoin(User, ApiToken.user_id == User.id)
            .where(ApiToken.token_sha256 == token_digest(token))
        ).first()
    if found is None:
        return TokenCheck(None, reason="unknown token")
    row, owner, owner_active, owner_role = found
    state = token_state(row)
    if state != "active":
        return TokenCheck(None, row.name, f"{state} token")
    if row.user_id is not None and not (owner_active and _role_allowed(owner_role, row.role)):
        return TokenCheck(None, row.name, f"owner {owner} disabled or no longer {row.role.value}")
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY:
        with session_scope(session_factory) as session:
            # Conditional: of concurrent first requests, one writes; the rest change nothing.
            session.execute(
                update(ApiToken)
                .where(
                    ApiToken.id == row.id,
                    or_(ApiToken.last_used_at.is_(None), ApiToken.last_used_at < now - LAST_USED_EVERY),
                )
                .values(last_used_at=now)
            )
    if row.user_id is not None:
        user = AuthUser(row.user_id, owner, row.role, token_name=row.name)
    else:
        user = AuthUser(0, f"token:{row.name}", row.role, token_name=row.name)
    return TokenCheck(user, row.name)
