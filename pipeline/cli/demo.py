"""``radtriage demo``: send a few synthetic head CTs, with and without a bleed."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pipeline.config import Settings
from pipeline.scu import parse_peer, send_files

DEMO_CASES = (("hemorrhage", 101), ("none", 102), ("none", 103), ("hemorrhage", 104))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="send synthetic head CT studies (with and without a bleed) to a running radtriage"
    )
    parser.add_argument("--to", metavar="AE@HOST:PORT", help="destination (default: this config's receiver on 127.0.0.1)")
    parser.add_argument("--calling-ae", default="STORESCU", help="our AE title (must be in the receiver's allowed_aes)")
    parser.add_argument("--studies", type=int, default=len(DEMO_CASES), help="how many studies (bleed, none, none, bleed, ...)")
    parser.add_argument("--slices", type=int, default=32, help="slices per study")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.phantom.generator import volume_generator
    from pipeline.synth import synth_study

    if args.to:
        ae_title, host, port = parse_peer(args.to)
    else:
        ae_title, host, port = settings.dicom.ae_title, "127.0.0.1", settings.dicom.port
    with tempfile.TemporaryDirectory(prefix="radtriage-demo-") as tmp:
        for i in range(args.studies):
            finding, seed = DEMO_CASES[i % len(DEMO_CASES)]
            seed += 10 * (i // len(DEMO_CASES))
            files = synth_study(Path(tmp) / str(i), seed=seed, slices=args.slices, volume=volume_generator(finding))
            report = send_files(files, ae_title, host, port, calling_ae=args.calling_ae)
            outcome = "sent" if not report.failed else f"{len(report.failed)} FAILED ({next(iter(report.failed.values()))})"
            print(f"study {i + 1}: {finding:<10} {len(report.sent)}/{len(files)} images {outcome} to {ae_title}@{host}:{port}")
    print("Open the worklist to watch them arrive; the bleeds rise to the top once analysed.")
    return 0
