"""Scale out: 16 studies through one or two workers, the index on SQLite or PostgreSQL.

The cluster of ``tests/cluster`` (README, Scale out), started afresh for each run: one
PostgreSQL server for the whole benchmark, and per run a new index and a new Prefect
server with a database of its own on it. Four runs over the same studies:

- ``radtriage serve`` with its in-process worker, index on SQLite (the one-machine
  install; ``radtriage worker`` refuses SQLite, which cannot be shared between hosts);
- the same on PostgreSQL: SQLite against PostgreSQL for the same run;
- ``radtriage serve`` with no local worker and one ``radtriage worker``, on PostgreSQL;
- the same with two workers, each with its own folder.

Warm-up studies are analysed first until every worker has run one (the first run loads
torch and the model: seconds); then the 16 studies are sent back to back with dcmtk
``storescu``. Printed per run: studies per minute (16 over the time from the first
instance sent to the last result on the worklist), the median time to triage of a
study from the moment it became stable to its result (dispatch, queueing, the flow),
how many triage runs the 16 took (16: each analysed once) and the flow runs per worker.

On a 2-core machine a second worker has no core of its own: both share the CPU with
each other, the front node, PostgreSQL and Prefect, so the two-worker figures show the
orchestration overhead and that the work is spread and done once, more than speed.

Usage: ``python benchmarks/scale_out.py [--studies 16] [--slices 32] [--size 512] [--no-netns]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

from benchmarks.netns import maybe_enter_netns  # noqa: E402
from pipeline.triage.dispatch import WORKER_LABEL  # noqa: E402
from tests.cluster.nodes import PrefectOnPostgres, make_studies, storescu  # noqa: E402
from tests.peers.postgres import PostgresServer  # noqa: E402
from tests.peers.radtriage import RadtriageServer, WorkerProcess  # noqa: E402

STABLE_AGE = 2.0


def _rows(index_url: str, sql: str) -> list[dict[str, Any]]:
    engine = create_engine(index_url)
    try:
        with engine.connect() as db:
            return [dict(r._mapping) for r in db.execute(text(sql))]
    finally:
        engine.dispose()


def _dt(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def triaged(index_url: str) -> dict[str, dict[str, Any]]:
    """Per analysed study: when it became stable, when its result was on the worklist,
    how many runs it took, and the flow run of its last one."""
    rows = _rows(
        index_url,
        'SELECT s."StudyInstanceUID" AS uid, r.stable_at, r.flow_run_id, r.status, w.triaged_at '
        "FROM triage_run r JOIN study s ON s.id = r.study_id JOIN worklist_entry w ON w.study_id = s.id "
        "ORDER BY r.revision",
    )
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = out.setdefault(row["uid"], {"runs": 0})
        entry["runs"] += 1
        entry.update(stable_at=row["stable_at"], flow_run_id=row["flow_run_id"], status=row["status"])
        entry["triaged_at"] = row["triaged_at"]
    return {uid: e for uid, e in out.items() if e["status"] == "done" and e["triaged_at"] is not None}


def flow_run_workers(prefect: PrefectOnPostgres, ids: set[str]) -> Counter[str]:
    import httpx

    user, secret = (prefect.auth_string or ":").split(":", 1)
    runs = httpx.post(
        f"{prefect.api_url}/flow_runs/filter",
        json={"flow_runs": {"id": {"any_": sorted(ids)}}, "limit": 200},
        auth=(user, secret),
        timeout=10,
    ).json()
    return Counter(r["labels"].get(WORKER_LABEL, "?") for r in runs)


def wait_done(index_url: str, uids: set[str], timeout: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = {u: e for u, e in triaged(index_url).items() if u in uids}
        if set(done) == uids:
            return done
        time.sleep(0.25)
    raise RuntimeError(f"only {len(done)} of {len(uids)} studies analysed in {timeout:.0f} s")


def run_once(
    root: Path,
    prefect: PrefectOnPostgres,
    index_url: str,
    workers: int,
    studies: dict[str, list[Path]],
    warmups: list[dict[str, list[Path]]],
) -> dict[str, Any]:
    """One run; ``workers`` 0: the front node's own in-process worker runs the flows."""
    shared = {
        "RADTRIAGE_INDEX__URL": index_url,
        "PREFECT_API_URL": prefect.api_url,
        "PREFECT_API_AUTH_STRING": prefect.auth_string or "",
        "RADTRIAGE_TRIAGE__STABLE_AGE_SECONDS": str(STABLE_AGE),
    }
    front = RadtriageServer(
        root / "front",
        prefect_api_url=prefect.api_url,
        env={
            **shared,
            "RADTRIAGE_TRIAGE__LOCAL_WORKER": "false" if workers else "true",
            "PREFECT_HOME": str(root / "front" / "prefect"),
        },
    )
    nodes: list[Any] = [front]
    try:
        front.start()
        worker_env = {
            **shared,
            "RADTRIAGE_CONFIG": front.env["RADTRIAGE_CONFIG"],
            "RADTRIAGE_MODELS__DIR": front.env["RADTRIAGE_MODELS__DIR"],
            "RADTRIAGE_STORAGE__DATA_DIR": str(front.data_dir),
        }
        procs = [WorkerProcess(root / f"worker-{i}", f"worker-{i}", worker_env) for i in range(workers)]
        nodes += procs
        for p in procs:
            p.launch()
        for p in procs:
            p.wait_ready()
        # Warm-up: until every worker has loaded the model.
        warmed: Counter[str] = Counter()
        for batch in warmups:
            for files in batch.values():
                storescu(front, files)
            done = wait_done(index_url, set(batch), 600)
            warmed += flow_run_workers(prefect, {e["flow_run_id"] for e in done.values()})
            if len(warmed) >= max(workers, 1):
                break
        start = datetime.now().astimezone()
        for files in studies.values():
            storescu(front, files)
        done = wait_done(index_url, set(studies), 1200)
        last = max(_dt(e["triaged_at"]) for e in done.values())
        if last.tzinfo is None:
            last = last.astimezone()
        elapsed = (last - start).total_seconds()
        ttt = [(_dt(e["triaged_at"]) - _dt(e["stable_at"])).total_seconds() for e in done.values()]
        spread = flow_run_workers(prefect, {e["flow_run_id"] for e in done.values()})
        return {
            "studies_per_min": len(studies) * 60 / elapsed,
            "median_ttt": statistics.median(ttt),
            "elapsed": elapsed,
            "runs": sum(e["runs"] for e in done.values()),
            "spread": dict(spread),
            "warmed": dict(warmed),
        }
    finally:
        for node in reversed(nodes):
            node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=16)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--no-netns", action="store_true")
    args = parser.parse_args()
    maybe_enter_netns(__file__, sys.argv[1:])

    with tempfile.TemporaryDirectory(prefix="radtriage-scale-") as tmp:
        root = Path(tmp)
        postgres = PostgresServer(Path(tempfile.mkdtemp(prefix="radtriage-scale-pg-"))).start()
        shape = (args.slices, args.size, (5.0, 0.45 * 512 / args.size, 0.45 * 512 / args.size))
        # The same studies in every run (each run has a new index and a new Prefect database).
        studies = make_studies(root / "in", args.studies, 3000, shape)
        warmups = [make_studies(root / f"warm{i}", 2, 3100 + 10 * i, shape) for i in range(3)]
        runs = [("sqlite", 0), ("postgresql", 0), ("postgresql", 1), ("postgresql", 2)]
        results: list[tuple[str, int, dict[str, Any]]] = []
        try:
            for n, (index, workers) in enumerate(runs):
                run_root = root / f"run{n}"
                if index == "sqlite":
                    (run_root / "front" / "data").mkdir(parents=True)
                    url = f"sqlite:///{run_root / 'front' / 'data' / 'index.sqlite'}"
                else:
                    url = postgres.database()
                # A Prefect database of its own per run, so that no run's flow runs,
                # work pool or concurrency slots are left over for the next.
                prefect = PrefectOnPostgres(
                    run_root / "prefect", postgres.database().replace("+psycopg://", "+asyncpg://")
                )
                prefect.start()
                load = os.getloadavg()[0]
                batches = [dict(list(w.items())[: max(workers, 1)]) for w in warmups]
                try:
                    result = run_once(run_root, prefect, url, workers, studies, batches)
                finally:
                    prefect.stop()
                result["load"] = (round(load, 1), round(os.getloadavg()[0], 1))
                results.append((index, workers, result))
                print(f"{index:<10} {workers or 'in-process'} worker(s): " + json.dumps(result), flush=True)
        finally:
            postgres.stop()
            subprocess.run(["rm", "-rf", str(postgres.folder)], check=False)

    print(f"\n{args.studies} studies of {args.slices} slices {args.size}x{args.size}, stable_age {STABLE_AGE} s")
    print("| index | workers | studies/min | median stable → result (s) | triage runs | flow runs per worker | load |")
    print("|---|---|---|---|---|---|---|")
    for index, workers, r in results:
        spread = ", ".join(f"{v}" for _, v in sorted(r["spread"].items()))
        who = "1 (in `serve`)" if workers == 0 else str(workers)
        print(
            f"| {index} | {who} | {r['studies_per_min']:.1f} | {r['median_ttt']:.2f} | {r['runs']} | {spread} |"
            f" {r['load'][0]}–{r['load'][1]} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
