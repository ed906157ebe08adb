"""The ``radtriage`` command line: the top of the layers.

Each module in this package that defines ``register(subparsers)`` adds one or more
subcommands; a subcommand's handler is ``func(args, settings) -> int``. :mod:`.serve`
and :mod:`.worker` compose the process (which components run, how they wake each
other); ``synth`` and ``demo`` use :mod:`pipeline.lab`, the server never does.

May import anything: ``flows/`` and every core package.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from pipeline.config import load_settings
from pipeline.errors import RadtriageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radtriage", description="AI triage for a picture archive")
    parser.add_argument("--config", help="TOML config file (default: $RADTRIAGE_CONFIG or config/default.toml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("pynetdicom", "httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not args.verbose else logging.INFO)
    try:
        settings = load_settings(args.config)
        return int(args.func(args, settings) or 0)
    except RadtriageError as err:
        print(f"radtriage: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
