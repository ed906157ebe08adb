"""``radtriage forwards``: what is owed to which archive node, delivered, or given up."""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from datetime import datetime
from typing import Any

from pipeline.config import Settings

log = logging.getLogger(__name__)
STATES = ("pending", "delivered", "dead")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "forwards",
        help="show the forward queue (pending, delivered, dead) per archive node",
        description=(
            "Show the forwards of AI results to archive nodes, per destination: counts, and "
            "the pending and dead jobs with their attempts and last error."
        ),
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--state", choices=STATES, help="list only jobs in this state (default: pending and dead)")
    parser.add_argument(
        "--retry-now",
        action="store_true",
        help="make pending jobs due now, give dead jobs new attempts, and deliver them once right here",
    )
    parser.set_defaults(func=run)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.forward import deliver_due, list_jobs, retry_now
    from pipeline.index.db import create_index_engine, make_session_factory, migrate, session_scope
    from pipeline.index.schema import utcnow

    migrate(settings.index_url)
    engine = create_index_engine(settings.index_url)
    factory = make_session_factory(engine)
    if args.retry_now:
        from pipeline.archive import Archive

        with session_scope(factory) as session:
            touched = retry_now(session)
        result = deliver_due(settings, Archive(settings, engine=engine), factory)
        log.info("retried %d jobs: %d delivered, %d failed", touched, result.delivered, result.failed)

    with session_scope(factory, readonly=True) as session:
        jobs = list_jobs(session)
    now = utcnow()
    counts: dict[str, Counter[str]] = {}
    addresses: dict[str, str] = {}
    for d in settings.forward.destinations:
        counts[d.ae_title] = Counter()
        addresses[d.ae_title] = f"{d.host}:{d.port}"
    for job in jobs:
        counts.setdefault(job.destination_ae, Counter())[job.state.value] += 1
        addresses.setdefault(job.destination_ae, f"{job.host}:{job.port}")
    listed_states = {args.state} if args.state else {"pending", "dead"}
    listed = [j for j in jobs if j.state.value in listed_states]

    if args.json:
        out: dict[str, Any] = {
            "destinations": [
                {
                    "ae_title": ae,
                    "address": addresses[ae],
                    "configured": any(d.ae_title == ae for d in settings.forward.destinations),
                    **{state: counts[ae][state] for state in STATES},
                }
                for ae in sorted(counts)
            ],
            "jobs": [
                {
                    "destination_ae": j.destination_ae,
                    "SOPInstanceUID": j.SOPInstanceUID,
                    "kind": j.kind,
                    "state": j.state.value,
                    "attempts": j.attempts,
                    "next_attempt_at": _iso(j.next_attempt_at) if j.state.value == "pending" else None,
                    "last_error": j.last_error,
                    "created_at": _iso(j.created_at),
                    "delivered_at": _iso(j.delivered_at),
                }
                for j in listed
            ],
        }
        print(json.dumps(out, indent=2))
        return 0

    if not counts:
        print("no forward destinations configured and nothing queued ([[forward.destinations]] in the config)")
        return 0
    for ae in sorted(counts):
        c = counts[ae]
        note = "" if any(d.ae_title == ae for d in settings.forward.destinations) else "  (no longer configured)"
        print(f"{ae} {addresses[ae]}: {c['pending']} pending, {c['delivered']} delivered, {c['dead']} dead{note}")
        for j in (j for j in listed if j.destination_ae == ae):
            when = ""
            if j.state.value == "pending":
                wait = (j.next_attempt_at - now).total_seconds()
                when = f", next attempt in {wait:.0f} s" if wait > 0 else ", due now"
            elif j.delivered_at is not None:
                when = f", delivered {_iso(j.delivered_at)}"
            error = f"\n      last error: {j.last_error}" if j.last_error else ""
            print(f"  {j.state.value:<9} {j.kind:<3} {j.SOPInstanceUID}  attempts {j.attempts}{when}{error}")
    return 0
