"""Time to triage: from a study's last instance to its worklist update, step by step.

Starts ``radtriage serve`` (embedded Prefect, as ``make run``), sends N synthetic head
CTs with dcmtk ``storescu`` one after another, waits for each on the worklist, then
reads the per-run timings the flow recorded in the index and prints, per study and as
the median: waiting for stability, dispatch (stable → flow running), volume load,
inference, writing SEG+SR, storing them, and the rest (bookkeeping, worklist update).

Usage: ``python benchmarks/time_to_triage.py [--studies 6] [--slices 32] [--stable-age 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.lab.phantom.generator import volume_generator  # noqa: E402
from pipeline.lab.synth import synth_study  # noqa: E402
from tests.peers.radtriage import RadtriageServer  # noqa: E402

# "other": Prefect task orchestration between the steps and the index bookkeeping.
STEPS = ("stability_wait", "dispatch", "volume_load", "inference", "writing", "storing", "other")


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def breakdown(index: Path, study_uid: str) -> dict[str, float]:
    with sqlite3.connect(index) as db:
        row = db.execute(
            "SELECT r.timings, r.last_received_at, w.triaged_at FROM triage_run r "
            "JOIN study s ON s.id = r.study_id JOIN worklist_entry w ON w.study_id = s.id "
            "WHERE s.StudyInstanceUID = ? ORDER BY r.revision DESC LIMIT 1",
            (study_uid,),
        ).fetchone()
    timings, last_received, triaged = json.loads(row[0]), _time(row[1]), _time(row[2])
    total = (triaged - last_received).total_seconds()
    steps = {k: float(timings.get(k, 0.0)) for k in STEPS[:-1]}
    steps["other"] = total - sum(steps.values())
    steps["total"] = total
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--stable-age", type=float, default=2.0, help="[triage] stable_age_seconds")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="radtriage-ttt-") as tmp:
        folder = Path(tmp)
        env = {"RADTRIAGE_TRIAGE__STABLE_AGE_SECONDS": str(args.stable_age)}
        studies = []
        for i in range(args.studies):
            finding = "hemorrhage" if i % 2 == 0 else "none"
            files = synth_study(
                folder / "in" / str(i), seed=500 + i, slices=args.slices, volume=volume_generator(finding)
            )
            studies.append((finding, files))
        with RadtriageServer(folder / "radtriage", prefect_api_url=None, env=env) as server:
            print(
                f"radtriage serve up; sending {args.studies} studies of {args.slices} slices, stable_age {args.stable_age} s"
            )
            rows = []
            for i, (finding, files) in enumerate(studies):
                import pydicom

                study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                subprocess.run(
                    [
                        "storescu",
                        "-aet",
                        "STORESCU",
                        "-aec",
                        server.ae_title,
                        "127.0.0.1",
                        str(server.dicom_port),
                        *map(str, files),
                    ],
                    env={**os.environ, "TCP_NODELAY": "1"},
                    check=True,
                    capture_output=True,
                )
                server.wait_for(
                    lambda wl, uid=study_uid: any(
                        s["StudyInstanceUID"] == uid and s["ai_status"] in ("done", "failed") for s in wl
                    ),
                    timeout=300,
                    what=f"study {i}",
                )
                steps = breakdown(server.data_dir / "index.sqlite", study_uid)
                rows.append(steps)
                print(f"study {i + 1} ({finding:<10}) " + "  ".join(f"{k} {steps[k]:6.2f}" for k in (*STEPS, "total")))
            time.sleep(0.5)
    median = {k: statistics.median(r[k] for r in rows) for k in (*STEPS, "total")}
    print("median              " + "  ".join(f"{k} {median[k]:6.2f}" for k in (*STEPS, "total")))
    rest = median["total"] - median["stability_wait"] - median["inference"]
    print(f"everything but the stability wait and the inference: {rest:.2f} s per study (goal < 2 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
