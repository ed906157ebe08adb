"""``radtriage demo``: send a few synthetic head CTs, with and without a bleed."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pydicom

from pipeline.config import Settings

DEMO_CASES = (("hemorrhage", 101), ("none", 102), ("none", 103), ("hemorrhage", 104))


def parse_peer(spec: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` → (ae_title, host, port), with an error that says the format."""
    try:
        ae_title, address = spec.split("@", 1)
        host, port = address.rsplit(":", 1)
        return ae_title, host, int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r} is not AE@HOST:PORT (e.g. RADTRIAGE@127.0.0.1:11112)") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="send synthetic head CT studies (with and without a bleed) to a running radtriage"
    )
    parser.add_argument(
        "--to",
        metavar="AE@HOST:PORT",
        type=parse_peer,
        help="destination (default: this config's receiver on 127.0.0.1)",
    )
    parser.add_argument(
        "--studies", type=int, default=len(DEMO_CASES), help="how many studies (bleed, none, none, bleed, ...)"
    )
    parser.add_argument("--slices", type=int, default=32, help="slices per study")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    # The forwarder's C-STORE SCU; it calls as [dicom] ae_title, which the default
    # allowed_aes accepts.
    from pipeline.forward.queue import Target
    from pipeline.forward.scu import Item, store_items
    from pipeline.lab.phantom.generator import volume_generator
    from pipeline.lab.synth import synth_study

    target = Target(*args.to) if args.to else Target(settings.dicom.ae_title, "127.0.0.1", settings.dicom.port)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="radtriage-demo-") as tmp:
        for i in range(args.studies):
            finding, seed = DEMO_CASES[i % len(DEMO_CASES)]
            seed += 10 * (i // len(DEMO_CASES))
            files = synth_study(Path(tmp) / str(i), seed=seed, slices=args.slices, volume=volume_generator(finding))
            items = [
                Item(n, str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID), f) for n, f in enumerate(files)
            ]
            outcomes, _ = store_items(target, items, settings.dicom)
            failed = [o for o in outcomes if not o.delivered]
            failures += len(failed)
            outcome = "sent" if not failed else f"{len(failed)} FAILED ({failed[0].error})"
            print(
                f"study {i + 1}: {finding:<10} {len(outcomes) - len(failed)}/{len(files)} images {outcome} to {target}"
            )
    if not failures:
        print("Open the worklist to watch them arrive; the bleeds rise to the top once analysed.")
    return 1 if failures else 0
