"""``radtriage worker``: run triage flow runs on another machine (scale-out)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.process.runner import ProcessRunner


def build_worker(settings: Settings) -> ProcessRunner:
    """The worker's one component: deployment registration and the in-process worker."""
    from flows.serve import triage_orchestration
    from pipeline.triage.runtime import Runtime

    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(
            "radtriage worker needs the shared Prefect server: set PREFECT_API_URL "
            "(e.g. http://prefect.example:4200/api)"
        )
    if settings.index_url.startswith("sqlite"):
        raise ConfigError(
            "radtriage worker needs the shared index: set [index] url (PostgreSQL) or "
            "RADTRIAGE_INDEX__URL; SQLite cannot be shared between machines"
        )
    # What this worker writes into the shared archive is private too; the receiving
    # machine, which owns the folder, fixes older files at its start.
    os.umask(0o027 if settings.storage.group else 0o077)
    runtime = Runtime.from_settings(settings)  # no archive recovery: the receiving machine does that
    return ProcessRunner([triage_orchestration(runtime, dispatch=False)], on_stop=runtime.engine.dispose)


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    return build_worker(settings).run()


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run triage flow runs from a shared Prefect server, models kept in memory",
        description="Claim and run triage-study flow runs (the index, archive and Prefect are shared; "
        "see README, Scale out).",
    )
    parser.set_defaults(func=_worker)
