"""Time to triage of a bleed under a backlog, against the same on an idle system.

Starts ``radtriage serve`` (embedded Prefect, as ``make run``) and, in one run:

1. warms up (one routine head CT: the model loads), then sends a head CT with a bleed
   (RequestedProcedurePriority STAT, which the default ``[triage] priority_rules``
   make critical) to the idle system, ``--idle-runs`` times;
2. sends a backlog of ``--backlog`` studies in one association: most of them no model
   reads (single images, chest CTs, head scouts), ``--routine`` of them routine head
   CTs spread through it; then at once another bleed;
3. waits for the backlog to drain.

Reports the bleed's time to triage (last image received → worklist updated) idle and
under the backlog side by side, its steps (time_to_triage.py's breakdown), and how fast
the backlog drained: the studies no model reads, and the routine head CTs.

Usage: ``python benchmarks/triage_under_load.py [--backlog 300] [--routine 10] [--slices 32]``
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pydicom  # noqa: E402
from time_to_triage import STEPS, breakdown  # noqa: E402 - the benchmarks' own helper, beside this file

from pipeline.lab.phantom.generator import volume_generator  # noqa: E402
from pipeline.lab.synth import synth_study  # noqa: E402
from tests.peers.radtriage import RadtriageServer  # noqa: E402

SETTLED = ("done", "failed", "not_applicable")


def study_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def head_ct(folder: Path, seed: int, slices: int, finding: str, **attributes: str) -> list[Path]:
    files = synth_study(folder / f"ct-{seed}", seed=seed, slices=slices, volume=volume_generator(finding))
    if attributes:
        for path in files:
            ds = pydicom.dcmread(path)
            for keyword, value in attributes.items():
                setattr(ds, keyword, value)
            ds.save_as(path)
    return files


def unreadable(folder: Path, seed: int) -> list[Path]:
    """A small study the head CT model does not read: a single image, a chest CT or a scout."""
    kind = seed % 5
    out = folder / f"other-{seed}"
    if kind <= 2:
        return synth_study(out, seed=seed, slices=1, rows=64, cols=64)
    if kind == 3:
        return synth_study(out, seed=seed, slices=20, rows=64, cols=64, BodyPartExamined="CHEST")
    return synth_study(out, seed=seed, slices=2, rows=64, cols=64, SeriesDescription="Head scout")


def storescu(server: RadtriageServer, files: list[Path]) -> None:
    subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port)]
        + [str(f) for f in files],
        env={**os.environ, "TCP_NODELAY": "1"},
        check=True,
        capture_output=True,
    )


def _utc(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def settled(index: Path, uids: list[str]) -> dict[str, tuple[str, datetime, datetime]]:
    """UID → (AI status, last received, triaged) for the studies already settled."""
    with sqlite3.connect(index) as db:
        rows = db.execute(
            "SELECT s.StudyInstanceUID, w.ai_status, s.last_received_at, w.triaged_at FROM study s "
            "JOIN worklist_entry w ON w.study_id = s.id WHERE w.ai_status IN (?, ?, ?) AND w.triaged_at IS NOT NULL",
            SETTLED,
        ).fetchall()
    wanted = set(uids)
    return {uid: (status, _utc(received), _utc(triaged)) for uid, status, received, triaged in rows if uid in wanted}


def wait_settled(index: Path, uids: list[str], timeout: float) -> dict[str, tuple[str, datetime, datetime]]:
    deadline = time.monotonic() + timeout
    while True:
        done = settled(index, uids)
        if len(done) == len(uids):
            return done
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(uids) - len(done)} of {len(uids)} studies not settled after {timeout:.0f} s")
        time.sleep(0.2)


def line(label: str, steps: dict[str, float]) -> str:
    return f"{label:<22}" + "  ".join(f"{k} {steps[k]:6.2f}" for k in (*STEPS, "total"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=300, help="studies sent before the bleed")
    parser.add_argument("--routine", type=int, default=10, help="of which routine head CTs (the rest no model reads)")
    parser.add_argument("--slices", type=int, default=32, help="slices of every head CT")
    parser.add_argument("--idle-runs", type=int, default=2)
    parser.add_argument("--stable-age", type=float, default=2.0, help="[triage] stable_age_seconds")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="radtriage-load-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        warmup = head_ct(folder, 900, args.slices, "none")
        idle = [
            head_ct(folder, 910 + i, args.slices, "hemorrhage", RequestedProcedurePriority="STAT")
            for i in range(args.idle_runs)
        ]
        every = max(1, args.backlog // max(1, args.routine))
        backlog: list[list[Path]] = []
        routine_uids: list[str] = []
        for i in range(args.backlog):
            if len(routine_uids) < args.routine and i % every == every // 2:
                files = head_ct(folder, 1000 + i, args.slices, "none")
                routine_uids.append(study_uid(files))
            else:
                files = unreadable(folder, 2000 + i)
            backlog.append(files)
        bleed = head_ct(folder, 950, args.slices, "hemorrhage", RequestedProcedurePriority="STAT")
        backlog_uids = [study_uid(f) for f in backlog]
        other_uids = [u for u in backlog_uids if u not in set(routine_uids)]
        print(
            f"{args.backlog} backlog studies ({len(routine_uids)} routine head CTs of {args.slices} slices, "
            f"{len(other_uids)} no model reads) written in {time.perf_counter() - t0:.0f} s"
        )

        env = {"RADTRIAGE_TRIAGE__STABLE_AGE_SECONDS": str(args.stable_age)}
        with RadtriageServer(folder / "radtriage", prefect_api_url=None, env=env) as server:
            index = server.data_dir / "index.sqlite"
            storescu(server, warmup)
            wait_settled(index, [study_uid(warmup)], 600)

            idle_steps = []
            for files in idle:
                storescu(server, files)
                wait_settled(index, [study_uid(files)], 600)
                idle_steps.append(breakdown(index, study_uid(files)))
                print(line("idle bleed", idle_steps[-1]))

            sent = time.perf_counter()
            storescu(server, [f for files in backlog for f in files])
            backlog_sent = time.perf_counter() - sent
            storescu(server, bleed)
            bleed_uid = study_uid(bleed)
            wait_settled(index, [bleed_uid], 900)
            loaded = breakdown(index, bleed_uid)
            print(line("bleed behind backlog", loaded))
            # Routine head CTs sent before the bleed and not yet analysed when it was: those it overtook.
            ahead = len(routine_uids) - len(settled(index, routine_uids))
            done = wait_settled(index, backlog_uids, 1800)

    idle_total = statistics.median(s["total"] for s in idle_steps)
    ratio = loaded["total"] / idle_total
    print()
    print(
        f"bleed time to triage: idle {idle_total:.1f} s (median of {len(idle_steps)}), behind the backlog "
        f"{loaded['total']:.1f} s = {ratio:.2f}x idle (goal <= 2x); {ahead} routine head CTs it overtook"
    )
    first = min(r for _, r, _ in done.values())
    last_received = max(r for _, r, _ in done.values())
    not_applicable = [done[u] for u in other_uids]
    na_last = max(t for _, _, t in not_applicable)
    routine_last = max((done[u][2] for u in routine_uids), default=last_received)
    na_ttt = statistics.median((t - r).total_seconds() for _, r, t in not_applicable)
    statuses = {s for s, _, _ in not_applicable}
    print(
        f"backlog sent in {backlog_sent:.1f} s; studies no model reads: {len(not_applicable)} {sorted(statuses)}, "
        f"all settled {(na_last - first).total_seconds():.1f} s after the first image "
        f"({len(not_applicable) / max((na_last - first).total_seconds(), 1e-9):.1f} studies/s), "
        f"median time to triage {na_ttt:.1f} s (stable_age {args.stable_age:g} s)"
    )
    if routine_uids:
        span = (routine_last - last_received).total_seconds()
        print(
            f"routine head CTs: {len(routine_uids)} analysed, the last {span:.1f} s after the backlog's last image "
            f"({len(routine_uids) / max((routine_last - first).total_seconds(), 1e-9) * 60:.1f} studies/min overall)"
        )
    print(
        f"whole backlog drained in {(max(routine_last, na_last) - first).total_seconds():.1f} s "
        f"({len(done) / max((max(routine_last, na_last) - first).total_seconds(), 1e-9):.2f} studies/s)"
    )
    print(f"machine: {os.cpu_count()} CPUs (shared with other work: figures vary with its load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
