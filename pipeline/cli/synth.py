"""``radtriage synth``: write a synthetic head CT study as DICOM files."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.config import Settings


def _synth(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.lab.synth import VOLUME_GENERATORS, synth_study

    volume = VOLUME_GENERATORS[args.phantom]
    if args.finding is not None:
        from pipeline.lab.phantom.generator import volume_generator

        volume = volume_generator(args.finding)
    paths = synth_study(
        Path(args.out), seed=args.seed, slices=args.slices, rows=args.rows, cols=args.cols, volume=volume
    )
    print(f"wrote {len(paths)} CT images to {args.out}")
    return 0


def register(subparsers: Any) -> None:
    from pipeline.lab.synth import VOLUME_GENERATORS

    parser = subparsers.add_parser("synth", help="write a synthetic CT study (DICOM files)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same patient and UIDs (default 0)")
    parser.add_argument("--slices", type=int, default=40, help="number of axial slices (default 40)")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument(
        "--phantom", choices=sorted(VOLUME_GENERATORS), default="head", help="volume generator (default head)"
    )
    parser.add_argument(
        "--finding",
        choices=["hemorrhage", "none"],
        help="realistic head CT from real atlas anatomy (pipeline.lab.phantom), with or without an "
        "acute intracranial hemorrhage; replaces --phantom",
    )
    parser.set_defaults(func=_synth)
