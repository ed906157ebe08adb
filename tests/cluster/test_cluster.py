"""A radtriage cluster on one machine: PostgreSQL, a Prefect server, a front node, two workers.

Every part is a real process started here, as on separate machines (README, Scale out):

- PostgreSQL (the session's ``postgres``) with two databases, the radtriage index and
  Prefect's own;
- ``prefect server start`` with its database on that PostgreSQL (asyncpg) and an API
  auth string, as radtriage runs its embedded server;
- ``radtriage serve`` (receiver, dispatcher, forwarder, web app) with the index on
  PostgreSQL, the external Prefect API and no local worker (``[triage] local_worker =
  false``);
- two ``radtriage worker`` processes, each in its own working folder with its own
  environment (``PREFECT_HOME``, worker name, inference limit), sharing the archive
  folder, the index URL and the Prefect API;
- dcmtk ``storescp`` as the archive node the results are forwarded to.

Then eight studies are sent, and a worker is killed with SIGKILL in the middle of a run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pydicom
import pytest
from sqlalchemy import create_engine, text

from pipeline.lab.phantom.generator import volume_generator
from pipeline.lab.synth import synth_study
from pipeline.triage.dispatch import WORKER_LABEL
from pipeline.triage.prefect_server import LocalPrefectServer, free_port, load_auth_string
from tests.peers.postgres import PostgresServer
from tests.peers.radtriage import RadtriageServer, WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# The smallest studies the reference model's series rules accept (min_slices 16).
SLICES, SIZE, SPACING = 16, 128, (5.0, 1.8, 1.8)
# The study a worker is killed on: large enough that its inference lasts seconds, not the
# ~0.2 s of the small ones, so the test sees the run inside it before it ends.
KILL_SLICES, KILL_SIZE, KILL_SPACING = 32, 512, (5.0, 0.45, 0.45)
STUDIES = 8
WORKERS = ("worker-a", "worker-b")
HEARTBEAT_SECONDS = 2  # a worker is taken as dead after 3 missed heartbeats: 6 s
T = TypeVar("T")


class PrefectOnPostgres(LocalPrefectServer):
    """``prefect server start`` with its database on PostgreSQL."""

    def __init__(self, home: Path, database_url: str) -> None:
        super().__init__(home, ui=False, auth_string=load_auth_string(home))
        self.database_url = database_url

    def environment(self) -> dict[str, str]:
        return {**super().environment(), "PREFECT_API_DATABASE_CONNECTION_URL": self.database_url}


@dataclass
class Cluster:
    prefect: PrefectOnPostgres
    front: RadtriageServer
    workers: dict[str, WorkerProcess]
    index_url: str
    prefect_db_url: str  # Prefect's own database (psycopg URL, for the test to read)
    forwarded: Path  # storescp's folder: one file per object received

    def flow_runs(self) -> list[dict[str, Any]]:
        """Every flow run on the Prefect server (its REST API, as the UI reads it)."""
        user, secret = (self.prefect.auth_string or ":").split(":", 1)
        response = httpx.post(
            f"{self.prefect.api_url}/flow_runs/filter", json={"limit": 200}, auth=(user, secret), timeout=10
        )
        response.raise_for_status()
        return list(response.json())

    def task_runs(self, flow_run_id: str) -> list[dict[str, Any]]:
        user, secret = (self.prefect.auth_string or ":").split(":", 1)
        response = httpx.post(
            f"{self.prefect.api_url}/task_runs/filter",
            json={"flow_runs": {"id": {"any_": [flow_run_id]}}},
            auth=(user, secret),
            timeout=10,
        )
        response.raise_for_status()
        return list(response.json())

    def runs(self) -> list[dict[str, Any]]:
        """The index's triage runs (one per study revision dispatched)."""
        with create_engine(self.index_url).connect() as db:
            rows = db.execute(
                text(
                    'SELECT s."StudyInstanceUID" AS study, r.revision, r.status, r.flow_run_id, r.error '
                    "FROM triage_run r JOIN study s ON s.id = r.study_id ORDER BY r.id"
                )
            )
            return [dict(row._mapping) for row in rows]

    def results(self) -> list[dict[str, Any]]:
        """The index's current (not superseded) AI results."""
        with create_engine(self.index_url).connect() as db:
            rows = db.execute(
                text(
                    'SELECT s."StudyInstanceUID" AS study, a.revision, a.ok, a."SegSOPInstanceUID" AS seg, '
                    'a."SRSOPInstanceUID" AS sr FROM ai_result a JOIN study s ON s.id = a.study_id '
                    "WHERE NOT a.superseded"
                )
            )
            return [dict(row._mapping) for row in rows]

    def result_instances(self) -> Counter[tuple[str, str]]:
        """(study, modality) -> SEG/SR instances archived."""
        with create_engine(self.index_url).connect() as db:
            rows = db.execute(
                text(
                    'SELECT s."StudyInstanceUID", se."Modality", count(i.id) FROM instance i '
                    "JOIN series se ON se.id = i.series_id JOIN study s ON s.id = se.study_id "
                    "WHERE se.\"Modality\" IN ('SEG', 'SR') GROUP BY 1, 2"
                )
            )
            return Counter({(uid, modality): n for uid, modality, n in rows})

    def forwarded_uids(self) -> Counter[str]:
        """SOP Instance UIDs storescp received, with how often (``-uf``: a file per receipt)."""
        return Counter(
            str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            for f in self.forwarded.iterdir()
            if f.is_file()
        )

    def logs(self) -> str:
        parts = [f"--- serve ---\n{self.front.log_tail(60)}"]
        parts += [f"--- {name} ---\n{w.log_text()[-4000:]}" for name, w in self.workers.items()]
        return "\n".join(parts)


def wait(what: str, check: Callable[[], T | None], cluster: Cluster, timeout: float = 120.0) -> T:
    """Poll ``check`` until it returns something truthy; fail with the cluster's logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n{cluster.logs()}")


@pytest.fixture(scope="module")
def cluster(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    index_url = postgres.database()
    prefect_db = postgres.database()
    prefect = PrefectOnPostgres(root / "prefect-server", prefect_db.replace("+psycopg://", "+asyncpg://"))
    forwarded = root / "forwarded"
    forwarded.mkdir()
    forward_port = free_port()
    storescp = subprocess.Popen(
        ["storescp", "-aet", "FWD", "-od", str(forwarded), "-uf", str(forward_port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    processes: list[Any] = []
    try:
        api_url = prefect.start()
        shared = {
            "RADTRIAGE_INDEX__URL": index_url,
            "PREFECT_API_URL": api_url,
            "PREFECT_API_AUTH_STRING": prefect.auth_string or "",
            "RADTRIAGE_TRIAGE__WORKER_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
            "RADTRIAGE_FORWARD__DESTINATIONS": json.dumps(
                [{"ae_title": "FWD", "host": "127.0.0.1", "port": forward_port, "kinds": ["SEG", "SR"]}]
            ),
            "RADTRIAGE_FORWARD__BACKOFF_SECONDS": "0.5",
        }
        front = RadtriageServer(
            root / "front",
            prefect_api_url=api_url,
            env={**shared, "RADTRIAGE_TRIAGE__LOCAL_WORKER": "false", "PREFECT_HOME": str(root / "front" / "prefect")},
        )
        processes.append(front)
        front.start()  # migrates the index first: the workers find it ready
        worker_env = {
            **shared,
            "RADTRIAGE_CONFIG": front.env["RADTRIAGE_CONFIG"],
            "RADTRIAGE_MODELS__DIR": front.env["RADTRIAGE_MODELS__DIR"],
            "RADTRIAGE_STORAGE__DATA_DIR": str(front.data_dir),  # the shared archive
        }
        workers = {name: WorkerProcess(root / name, name, worker_env) for name in WORKERS}
        processes.extend(workers.values())
        for worker in workers.values():
            worker.launch()
        for worker in workers.values():
            worker.wait_ready()
        yield Cluster(prefect, front, workers, index_url, prefect_db, forwarded)
    finally:
        for process in reversed(processes):
            process.stop()
        prefect.stop()
        storescp.terminate()
        storescp.wait(10)


def make_studies(
    folder: Path,
    count: int,
    first_seed: int,
    shape: tuple[int, int, tuple[float, float, float]] = (SLICES, SIZE, SPACING),
) -> dict[str, list[Path]]:
    slices, size, spacing = shape
    studies: dict[str, list[Path]] = {}
    for i in range(count):
        finding = "hemorrhage" if i % 2 == 0 else "none"
        files = synth_study(
            folder / f"s{first_seed + i}",
            seed=first_seed + i,
            slices=slices,
            rows=size,
            cols=size,
            spacing_zyx=spacing,
            volume=volume_generator(finding),
        )
        studies[str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)] = files
    return studies


def storescu(front: RadtriageServer, files: list[Path]) -> None:
    subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", front.ae_title, "127.0.0.1", str(front.dicom_port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"},
        check=True,
        capture_output=True,
        timeout=120,
    )


def done_runs(cluster: Cluster, study_uids: set[str]) -> list[dict[str, Any]] | None:
    runs = [r for r in cluster.runs() if r["study"] in study_uids and r["status"] == "done"]
    return runs if {r["study"] for r in runs} == study_uids else None


def assert_once(cluster: Cluster, study_uids: set[str]) -> dict[str, dict[str, Any]]:
    """Each study analysed once: one done run, one current result, one SEG and one SR
    archived and forwarded once; return the current result per study."""
    done = Counter(r["study"] for r in cluster.runs() if r["status"] == "done" and r["study"] in study_uids)
    assert done == Counter(dict.fromkeys(study_uids, 1)), f"done runs per study: {done}"
    results = {r["study"]: r for r in cluster.results() if r["study"] in study_uids}
    assert len([r for r in cluster.results() if r["study"] in study_uids]) == len(study_uids)
    assert set(results) == study_uids and all(r["ok"] for r in results.values()), results
    archived = cluster.result_instances()
    for uid in study_uids:
        assert archived[(uid, "SEG")] == 1 and archived[(uid, "SR")] == 1, (uid, archived)
    owed = {u for r in results.values() for u in (r["seg"], r["sr"])}
    wait("every SEG and SR forwarded", lambda: owed <= set(cluster.forwarded_uids()), cluster, timeout=60)
    time.sleep(1.5)  # a second delivery, if the forwarder sent twice, would land by now
    received = cluster.forwarded_uids()
    assert all(received[u] == 1 for u in owed), {u: received[u] for u in owed}
    return results


def test_eight_studies_are_analysed_once_each_spread_over_both_workers(cluster: Cluster, tmp_path: Path) -> None:
    studies = make_studies(tmp_path, STUDIES, first_seed=700)
    for files in studies.values():
        storescu(cluster.front, files)
    wait("all eight studies analysed", lambda: done_runs(cluster, set(studies)), cluster, timeout=240)
    assert_once(cluster, set(studies))

    assert "no local triage worker" in cluster.front.log_text()
    flow_ids = {r["flow_run_id"] for r in cluster.runs() if r["study"] in studies}
    by_id = {f["id"]: f for f in cluster.flow_runs()}
    ran_by = Counter(by_id[i]["labels"].get(WORKER_LABEL) for i in flow_ids)
    assert all(by_id[i]["state"]["type"] == "COMPLETED" for i in flow_ids)
    assert set(ran_by) == set(WORKERS), f"flow runs per worker: {ran_by}"
    assert sum(ran_by.values()) == STUDIES
    # Prefect keeps them in its database on the PostgreSQL server.
    with create_engine(cluster.prefect_db_url).connect() as db:
        stored = {str(i) for (i,) in db.execute(text("SELECT id FROM flow_run"))}
    assert flow_ids <= stored


def test_a_worker_killed_during_inference_loses_nothing(cluster: Cluster, tmp_path: Path) -> None:
    [(study_uid, files)] = make_studies(
        tmp_path, 1, first_seed=800, shape=(KILL_SLICES, KILL_SIZE, KILL_SPACING)
    ).items()
    storescu(cluster.front, files)

    def in_inference() -> tuple[dict[str, Any], str] | None:
        runs = [r for r in cluster.runs() if r["study"] == study_uid and r["flow_run_id"]]
        flow = next((f for f in cluster.flow_runs() if runs and f["id"] == runs[-1]["flow_run_id"]), None)
        if flow is None or flow["state"]["type"] != "RUNNING" or WORKER_LABEL not in flow["labels"]:
            return None
        tasks = cluster.task_runs(flow["id"])
        busy = [t for t in tasks if t["name"].startswith("run-inference") and t["state"]["type"] == "RUNNING"]
        return (flow, flow["labels"][WORKER_LABEL]) if busy else None

    flow, victim = wait("the study's run inside its inference", in_inference, cluster, timeout=120)
    cluster.workers[victim].kill(signal.SIGKILL)
    survivor = next(name for name in WORKERS if name != victim)

    def crashed() -> dict[str, Any] | None:
        state = next(f for f in cluster.flow_runs() if f["id"] == flow["id"])["state"]
        return state if state["type"] == "CRASHED" else None

    state = wait("the dead worker's flow run marked Crashed", crashed, cluster, timeout=60)
    assert victim in state["message"]
    wait("the study analysed again", lambda: done_runs(cluster, {study_uid}), cluster, timeout=120)
    [result] = assert_once(cluster, {study_uid}).values()
    assert result["revision"] == 2

    runs = [r for r in cluster.runs() if r["study"] == study_uid]
    assert [(r["revision"], r["status"]) for r in runs] == [(1, "failed"), (2, "done")]
    assert victim in runs[0]["error"]
    second = next(f for f in cluster.flow_runs() if f["id"] == runs[1]["flow_run_id"])
    assert second["labels"][WORKER_LABEL] == survivor
    assert second["state"]["type"] == "COMPLETED"

    # The killed worker restarted on its host, alone: it works again (nothing it held,
    # its inference slot in Prefect included, outlives it).
    cluster.workers[survivor].stop()
    restarted = cluster.workers[victim]
    restarted.start()
    [(late_uid, late_files)] = make_studies(tmp_path, 1, first_seed=801).items()
    storescu(cluster.front, late_files)
    wait("the restarted worker analysing a new study", lambda: done_runs(cluster, {late_uid}), cluster, timeout=90)
    [late_run] = [r for r in cluster.runs() if r["study"] == late_uid]
    late_flow = next(f for f in cluster.flow_runs() if f["id"] == late_run["flow_run_id"])
    assert late_flow["labels"][WORKER_LABEL] == victim
