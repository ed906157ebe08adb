"""``radtriage token``: API tokens for programs (scripts, DICOMweb clients, other PACS)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime

from pipeline.config import Settings
from pipeline.index.accounts import Role


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "token",
        help="manage API tokens of programs",
        description=(
            "Create, list and revoke API tokens. A program sends one as 'Authorization: Bearer TOKEN' "
            "to /api/ and /dicom-web/; the index keeps only its SHA-256 digest."
        ),
    )
    sub = parser.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="create a token and print it (once: it cannot be shown again)")
    create.add_argument("name", help="what the token is for, e.g. ci-upload (letters, digits, '.', '_', '-')")
    create.add_argument(
        "--role",
        required=True,
        choices=[r.value for r in Role],
        help="uploader: STOW-RS only; radiologist: read; admin: read, store, audit log",
    )
    create.add_argument("--user", help="act as this user (the audit log names them); default: the token itself")
    create.add_argument("--expires-days", type=int, metavar="N", help="refuse the token N days from now")
    create.set_defaults(func=create_token)
    listing = sub.add_parser("list", help="list tokens (never the tokens themselves)")
    listing.set_defaults(func=list_tokens)
    revoke = sub.add_parser("revoke", help="refuse a token from the next request on")
    revoke.add_argument("name")
    revoke.set_defaults(func=revoke_token)


def _factory(settings: Settings):  # type: ignore[no-untyped-def]
    from pipeline.index.db import create_index_engine, make_session_factory, migrate

    migrate(settings.index_url)
    return make_session_factory(create_index_engine(settings.index_url))


def _when(value: datetime | None, empty: str) -> str:
    return value.isoformat(timespec="seconds") if value else empty


def create_token(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.index.db import session_scope
    from pipeline.web import tokens

    with session_scope(_factory(settings)) as session:
        row, token = tokens.create_token(
            session, args.name, args.role, username=args.user, expires_days=args.expires_days
        )
        expires = _when(row.expires_at, "never")
    # The token alone on stdout, so that TOKEN=$(radtriage token create ...) works.
    print(token, flush=True)
    print(f"token {row.name} ({row.role.value}) created, expires {expires}; it is shown only now", file=sys.stderr)
    return 0


def list_tokens(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.index.db import session_scope
    from pipeline.web import tokens

    with session_scope(_factory(settings), readonly=True) as session:
        for row, owner in tokens.list_tokens(session):
            print(
                f"{row.name}\t{row.role.value}\t{owner or '-'}\t{tokens.token_state(row)}"
                f"\tcreated {_when(row.created_at, '')}\tlast used {_when(row.last_used_at, 'never')}"
                f"\texpires {_when(row.expires_at, 'never')}"
            )
    return 0


def revoke_token(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.index.db import session_scope
    from pipeline.web import tokens

    with session_scope(_factory(settings)) as session:
        tokens.revoke_token(session, args.name)
    print(f"token {args.name} revoked")
    return 0
