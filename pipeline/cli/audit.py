"""``radtriage audit``: the audit log on the command line (what admins see at ``/api/audit``).

Web accesses and every C-FIND, C-MOVE and C-GET, newest first; filter by who (a web
user name or a calling AE title) and by study.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipeline.config import Settings


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "audit",
        help="recent audit records: web accesses and DICOM queries/retrieves, newest first",
        description=(
            "List the latest audit records, newest first: who (web user or calling AE title) and "
            "from where, what (request line, or the C-FIND keys / C-MOVE and C-GET UIDs), the status, "
            "and the details (matches, instances sent, reasons)."
        ),
    )
    parser.add_argument("--who", default="", help="only this web user or calling AE title (e.g. WS1)")
    parser.add_argument("--study", default="", help="only this StudyInstanceUID")
    parser.add_argument("--dicom", action="store_true", help="only C-FIND, C-MOVE and C-GET")
    parser.add_argument("--limit", type=int, default=50, help="how many records (default 50, at most 5000)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def _row(event: Any) -> dict[str, Any]:
    try:
        detail: Any = json.loads(event.detail) if event.detail else {}
    except ValueError:
        detail = event.detail
    return {
        "at": event.at.isoformat(timespec="seconds"),
        "who": event.username,
        "address": event.remote_addr,
        "operation": event.method,
        "request": event.path,
        "status": event.status_code,
        "action": event.action,
        "StudyInstanceUID": event.StudyInstanceUID,
        "detail": detail,
    }


def _status(row: dict[str, Any]) -> str:
    # DIMSE statuses read in hex (0xA900); HTTP ones in decimal.
    return f"0x{row['status']:04X}" if row["operation"].startswith("C-") else str(row["status"])


def run(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import select

    from pipeline.index.accounts import AuditEvent
    from pipeline.index.db import create_index_engine, make_session_factory, migrate, session_scope

    migrate(settings.index_url)
    engine = create_index_engine(settings.index_url)
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(max(1, min(args.limit, 5000)))
    if args.who:
        query = query.where(AuditEvent.username == args.who)
    if args.study:
        query = query.where(AuditEvent.StudyInstanceUID == args.study)
    if args.dicom:
        query = query.where(AuditEvent.method.in_(("C-FIND", "C-MOVE", "C-GET")))
    try:
        with session_scope(make_session_factory(engine), readonly=True) as session:
            rows = [_row(e) for e in session.scalars(query)]
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    if not rows:
        print("no audit records match")
        return 0
    for row in rows:
        detail = row["detail"]
        shown = ", ".join(f"{k}={v}" for k, v in detail.items()) if isinstance(detail, dict) else str(detail)
        print(
            f"{row['at']}  {row['who'] or '-':<16} {row['address'] or '-':<15} {row['operation']:<6} "
            f"{_status(row):>6}  {row['request']}"
            + (f"  [{row['StudyInstanceUID']}]" if row["StudyInstanceUID"] else "")
            + (f"  {shown}" if shown else "")
        )
    return 0
