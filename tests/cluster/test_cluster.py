"""A radtriage cluster on one machine: PostgreSQL, a Prefect server, a front node, two workers.

The cluster (``conftest.py``) is what the README's "Scale out" section sets up. Eight
studies are sent and analysed once each, spread over both workers; a worker is killed
with SIGKILL in the middle of a run and the other one takes the study over; then
``prefect.yaml`` is deployed and Prefect's own process worker analyses a study.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from pipeline.triage.dispatch import WORKER_LABEL
from tests.cluster.nodes import (
    WORKERS,
    Cluster,
    PrefectProcessWorker,
    assert_once,
    done_runs,
    make_studies,
    storescu,
    wait,
)
from tests.peers.radtriage import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STUDIES = 8
# The study a worker is killed on: large enough that its inference lasts seconds, not the
# ~0.2 s of the small ones, so the test sees the run inside it before it ends.
KILL_SLICES, KILL_SIZE, KILL_SPACING = 32, 512, (5.0, 0.45, 0.45)


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


def test_prefect_yaml_deploys_and_a_prefect_process_worker_analyses_a_study(cluster: Cluster, tmp_path: Path) -> None:
    """The standard Prefect path of prefect.yaml: ``prefect deploy --all``, then ``prefect
    worker start --pool radtriage`` instead of ``radtriage worker`` (a process per run)."""
    for worker in cluster.workers.values():
        worker.stop()
    env = {
        **cluster.worker_env(),
        "PREFECT_HOME": str(tmp_path / "prefect-cli"),
        "RADTRIAGE_HOME": str(REPO),
        "RADTRIAGE_INFERENCE_LIMIT": "radtriage-inference-prefect-worker",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    prefect = str(Path(sys.executable).parent / "prefect")
    for command in (
        [prefect, "--no-prompt", "deploy", "--all"],
        [prefect, "gcl", "create", env["RADTRIAGE_INFERENCE_LIMIT"], "--limit", "1"],  # the GPU guard
    ):
        done = subprocess.run(
            command, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert command[2] != "deploy" or "triage-study/triage-study" in done.stdout
    prefect_worker = PrefectProcessWorker(tmp_path / "prefect-worker", "prefect-process-worker", env)
    cluster.others.append(prefect_worker)
    try:
        prefect_worker.launch()
        [(study_uid, files)] = make_studies(tmp_path, 1, first_seed=820).items()
        storescu(cluster.front, files)
        wait("the study analysed by Prefect's process worker", lambda: done_runs(cluster, {study_uid}), cluster, 240)
        assert_once(cluster, {study_uid})
        [run] = [r for r in cluster.runs() if r["study"] == study_uid]
        flow = next(f for f in cluster.flow_runs() if f["id"] == run["flow_run_id"])
        assert flow["state"]["type"] == "COMPLETED"
        assert flow["labels"]["prefect.worker.name"] == "prefect-process-worker"
        assert WORKER_LABEL not in flow["labels"]
        assert "do not exist" not in prefect_worker.log_text()  # the inference limit was used
    finally:
        prefect_worker.stop()
        cluster.others.remove(prefect_worker)
        for worker in cluster.workers.values():  # the cluster as it was, for the next tests
            worker.launch()
        for worker in cluster.workers.values():
            worker.wait_ready()
