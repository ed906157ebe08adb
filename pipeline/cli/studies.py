"""``radtriage studies``: the studies in the archive with their state and counts."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipeline.config import Settings


def list_studies(settings: Settings) -> list[dict[str, Any]]:
    """Every study in the index, newest received first, as plain dicts."""
    from sqlalchemy import select
    from sqlalchemy.orm import joinedload

    from pipeline.index.db import create_index_engine, migrate, session_scope
    from pipeline.index.schema import Study

    migrate(settings.index_url)
    engine = create_index_engine(settings.index_url)
    try:
        with session_scope(engine, readonly=True) as session:
            studies = session.scalars(
                select(Study).options(joinedload(Study.patient)).order_by(Study.last_received_at.desc())
            ).all()
            return [
                {
                    "StudyInstanceUID": s.StudyInstanceUID,
                    "PatientName": s.patient.PatientName,
                    "PatientID": s.patient.PatientID,
                    "AccessionNumber": s.AccessionNumber,
                    "StudyDate": s.StudyDate,
                    "StudyDescription": s.StudyDescription,
                    "ModalitiesInStudy": s.ModalitiesInStudy,
                    "state": s.state.value,
                    "state_changed_at": s.state_changed_at.isoformat(),
                    "last_received_at": s.last_received_at.isoformat(),
                    "NumberOfStudyRelatedSeries": s.NumberOfStudyRelatedSeries,
                    "NumberOfStudyRelatedInstances": s.NumberOfStudyRelatedInstances,
                }
                for s in studies
            ]
    finally:
        engine.dispose()


def _studies(args: argparse.Namespace, settings: Settings) -> int:
    rows = list_studies(settings)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no studies")
        return 0
    print(f"{'state':<10} {'series':>6} {'inst':>6}  {'date':<8}  {'patient':<24} {'accession':<12} StudyInstanceUID")
    for r in rows:
        print(
            f"{r['state']:<10} {r['NumberOfStudyRelatedSeries']:>6} {r['NumberOfStudyRelatedInstances']:>6}  "
            f"{r['StudyDate']:<8}  {r['PatientName'][:24]:<24} {r['AccessionNumber'][:12]:<12} {r['StudyInstanceUID']}"
        )
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("studies", help="list studies with state and instance counts")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=_studies)
