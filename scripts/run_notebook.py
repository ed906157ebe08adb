#!/usr/bin/env python
"""Run a notebook top to bottom with parameters: ``run_notebook.py NB [-p KEY=VALUE ...] [-o OUT]``.

Values are Python literals (``-p SMOKE=False -p TRAIN_CASES=160``). Without ``-o`` the
executed notebook, outputs included, replaces the input.
"""

from __future__ import annotations

import argparse
import ast
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.lab.notebook import execute_notebook


def _parameter(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    if not key.isidentifier() or not _:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("-p", "--parameter", type=_parameter, action="append", default=[])
    parser.add_argument("-o", "--output", type=Path)
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per cell")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    execute_notebook(args.notebook, dict(args.parameter), output=args.output or args.notebook, timeout=args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
