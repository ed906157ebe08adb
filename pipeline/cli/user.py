"""``radtriage user``: accounts of the worklist web app."""

from __future__ import annotations

import argparse
import getpass
import sys

from pipeline.config import Settings
from pipeline.errors import RadtriageError
from pipeline.index.accounts import Role


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "user",
        help="manage worklist web app users",
        description="Create, list and disable users of the worklist web app.",
    )
    sub = parser.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    add = sub.add_parser(
        "add",
        help="create a user, or set a new password and role for an existing one (ending their open sessions)",
    )
    add.add_argument("name", help="user name (no spaces)")
    add.add_argument(
        "--role",
        choices=[r.value for r in Role],
        default="radiologist",
        help="admin also reads the audit log; uploader may only store over STOW-RS (default: radiologist)",
    )
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input instead of prompting",
    )
    add.set_defaults(func=add_user)
    listing = sub.add_parser("list", help="list users")
    listing.set_defaults(func=list_users)
    disable = sub.add_parser(
        "disable", help="disable a user and end their sessions (their API tokens stop working too)"
    )
    disable.add_argument("name")
    disable.set_defaults(func=disable_user)


def _factory(settings: Settings):  # type: ignore[no-untyped-def]
    from pipeline.index.db import create_index_engine, make_session_factory, migrate

    migrate(settings.index_url)
    return make_session_factory(create_index_engine(settings.index_url))


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != first:
        raise RadtriageError("the passwords differ; nothing changed")
    return first


def add_user(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.index.db import session_scope
    from pipeline.web.auth import create_user

    password = _read_password(args.password_stdin)
    with session_scope(_factory(settings)) as session:
        # create_user also ends every session opened with the old password.
        user = create_user(session, args.name, password, args.role)
        print(f"user {user.username} ({user.role.value}) saved; any open sessions of theirs are ended")
    return 0


def list_users(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import select

    from pipeline.index.accounts import User
    from pipeline.index.db import session_scope

    with session_scope(_factory(settings), readonly=True) as session:
        for user in session.scalars(select(User).order_by(User.username)):
            last = user.last_login_at.isoformat(timespec="seconds") if user.last_login_at else "never"
            print(f"{user.username}\t{user.role.value}\t{'active' if user.active else 'disabled'}\tlast login {last}")
    return 0


def disable_user(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import select

    from pipeline.index.accounts import User
    from pipeline.index.db import session_scope
    from pipeline.web.auth import end_sessions

    with session_scope(_factory(settings)) as session:
        user = session.scalar(select(User).where(User.username == args.name))
        if user is None:
            raise RadtriageError(f"no user {args.name}; see radtriage user list")
        user.active = False
        end_sessions(session, user.id)
    print(f"user {args.name} disabled")
    return 0
