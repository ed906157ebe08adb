"""``radtriage serve``: run radtriage in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.config import Settings


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.service import Service

    return Service(settings).run()


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the receiver, archive and triage in the foreground (Ctrl-C stops)",
        description="Migrate the index, then run every radtriage component until SIGINT/SIGTERM.")
    parser.set_defaults(func=_serve)
