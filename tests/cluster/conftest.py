"""One cluster for the package: PostgreSQL, Prefect on it, a front node, two workers.

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

The cluster lives for the package: ``test_receivers.py`` adds a second front node to
it rather than starting another one (each start costs seconds on two cores).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline.triage.prefect_server import free_port
from tests.cluster.nodes import HEARTBEAT_SECONDS, WORKERS, Cluster, PrefectOnPostgres
from tests.peers.postgres import PostgresServer
from tests.peers.radtriage import RadtriageServer, WorkerProcess


@pytest.fixture(scope="package")
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
    cluster: Cluster | None = None
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
        cluster = Cluster(prefect, front, {}, index_url, prefect_db, forwarded, forward_port, shared)
        cluster.workers.update({name: WorkerProcess(root / name, name, cluster.worker_env()) for name in WORKERS})
        processes.extend(cluster.workers.values())
        for worker in cluster.workers.values():
            worker.launch()
        for worker in cluster.workers.values():
            worker.wait_ready()
        yield cluster
    finally:
        for process in reversed([*processes, *(cluster.others if cluster else [])]):
            process.stop()
        prefect.stop()
        storescp.terminate()
        storescp.wait(10)
