"""The parts of a test cluster and what the tests read from them.

:class:`Cluster` is PostgreSQL (the index and Prefect's database), ``prefect server
start`` on it, one ``radtriage serve`` front node, ``radtriage worker`` processes and
dcmtk ``storescp`` as the archive node results are forwarded to; its methods read what
an operator would look at: the index's triage runs and results, the flow runs on the
Prefect server, the objects the archive node received.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pydicom
from sqlalchemy import create_engine, text

from pipeline.lab.phantom.generator import volume_generator
from pipeline.lab.synth import synth_study
from pipeline.triage.prefect_server import LocalPrefectServer, load_auth_string
from tests.peers.radtriage import REPO, RadtriageServer, ServeProcess, WorkerProcess

# The smallest studies the reference model's series rules accept (min_slices 16).
SLICES, SIZE, SPACING = 16, 128, (5.0, 1.8, 1.8)
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


class PrefectProcessWorker(ServeProcess):
    """``prefect worker start --pool radtriage`` (Prefect's process worker), as prefect.yaml says."""

    subcommand = "prefect-worker"

    def __init__(self, folder: Path, name: str, env: dict[str, str]) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(folder=folder, cwd=folder, env={**os.environ, "TCP_NODELAY": "1", **env})
        self.name = name

    def command(self) -> list[str]:
        prefect = str(Path(sys.executable).parent / "prefect")
        return [prefect, "worker", "start", "--pool", "radtriage", "--type", "process", "--name", self.name]


@dataclass
class Cluster:
    prefect: PrefectOnPostgres
    front: RadtriageServer
    workers: dict[str, WorkerProcess]
    index_url: str
    prefect_db_url: str  # Prefect's own database (psycopg URL, for the test to read)
    forwarded: Path  # storescp's folder: one file per object received
    forward_port: int
    shared_env: dict[str, str] = field(default_factory=dict)  # what every radtriage node gets
    others: list[ServeProcess] = field(default_factory=list)  # more nodes a test started

    def flow_runs(self) -> list[dict[str, Any]]:
        """Every flow run on the Prefect server (its REST API, as the UI reads it)."""
        return list(self._api("/flow_runs/filter", {"limit": 200}))

    def task_runs(self, flow_run_id: str) -> list[dict[str, Any]]:
        return list(self._api("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}}))

    def _api(self, path: str, body: dict[str, Any]) -> Any:
        user, secret = (self.prefect.auth_string or ":").split(":", 1)
        response = httpx.post(f"{self.prefect.api_url}{path}", json=body, auth=(user, secret), timeout=10)
        response.raise_for_status()
        return response.json()

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        with create_engine(self.index_url).connect() as db:
            return [dict(row._mapping) for row in db.execute(text(sql), params)]

    def runs(self) -> list[dict[str, Any]]:
        """The index's triage runs (one per study revision dispatched)."""
        return self.query(
            'SELECT s."StudyInstanceUID" AS study, r.revision, r.status, r.flow_run_id, r.error '
            "FROM triage_run r JOIN study s ON s.id = r.study_id ORDER BY r.id"
        )

    def results(self) -> list[dict[str, Any]]:
        """The index's current (not superseded) AI results."""
        return self.query(
            'SELECT s."StudyInstanceUID" AS study, a.revision, a.ok, a."SegSOPInstanceUID" AS seg, '
            'a."SRSOPInstanceUID" AS sr FROM ai_result a JOIN study s ON s.id = a.study_id '
            "WHERE NOT a.superseded"
        )

    def result_instances(self) -> Counter[tuple[str, str]]:
        """(study, modality) -> SEG/SR instances archived."""
        rows = self.query(
            'SELECT s."StudyInstanceUID" AS uid, se."Modality" AS modality, count(i.id) AS n FROM instance i '
            "JOIN series se ON se.id = i.series_id JOIN study s ON s.id = se.study_id "
            "WHERE se.\"Modality\" IN ('SEG', 'SR') GROUP BY 1, 2"
        )
        return Counter({(r["uid"], r["modality"]): r["n"] for r in rows})

    def forwarded_uids(self) -> Counter[str]:
        """SOP Instance UIDs storescp received, with how often (``-uf``: a file per receipt)."""
        return Counter(
            str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            for f in self.forwarded.iterdir()
            if f.is_file()
        )

    def worker_env(self) -> dict[str, str]:
        """A worker host's environment: the shared index, archive, models and Prefect API."""
        return {
            **self.shared_env,
            "RADTRIAGE_CONFIG": self.front.env["RADTRIAGE_CONFIG"],
            "RADTRIAGE_MODELS__DIR": self.front.env["RADTRIAGE_MODELS__DIR"],
            "RADTRIAGE_STORAGE__DATA_DIR": str(self.front.data_dir),  # the shared archive
        }

    def logs(self) -> str:
        parts = [f"--- serve ---\n{self.front.log_tail(60)}"]
        parts += [f"--- {name} ---\n{w.log_text()[-4000:]}" for name, w in self.workers.items()]
        parts += [f"--- {p.folder.name} ---\n{p.log_text()[-4000:]}" for p in self.others]
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


def make_studies(
    folder: Path,
    count: int,
    first_seed: int,
    shape: tuple[int, int, tuple[float, float, float]] = (SLICES, SIZE, SPACING),
) -> dict[str, list[Path]]:
    """``count`` synthetic head CTs (every other one with a bleed), by StudyInstanceUID."""
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


def storescu_command(node: RadtriageServer, files: list[Path]) -> list[str]:
    return ["storescu", "-aet", "STORESCU", "-aec", node.ae_title, "127.0.0.1", str(node.dicom_port), *map(str, files)]


def storescu(node: RadtriageServer, files: list[Path]) -> None:
    subprocess.run(
        storescu_command(node, files),
        env={**os.environ, "TCP_NODELAY": "1"},
        check=True,
        capture_output=True,
        timeout=120,
        cwd=REPO,
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
    time.sleep(1.5)  # a second delivery, if a forwarder sent twice, would land by now
    received = cluster.forwarded_uids()
    assert all(received[u] == 1 for u in owed), {u: received[u] for u in owed}
    return results
