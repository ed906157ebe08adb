"""Two receivers, one archive: two ``radtriage serve`` front nodes on one index.

The second front node joins the package's cluster (``conftest.py``) as a second host
would: its own folder, DICOM and web ports, the same PostgreSQL index, the same shared
archive folder and the same Prefect API. It is a full ``radtriage serve`` like the
first, dispatcher included, with no local worker: two identical front nodes behind one
DNS name is how a site runs receivers for availability, and it proves that two
dispatchers and two stability sweeps on one index still analyse a study once (the
sweep claims studies with ``FOR UPDATE SKIP LOCKED``, a run is unique per study
revision and the Prefect idempotency key ``<study>/<revision>/<first received>`` returns one flow run).

The tests hold one association open to each node and send over both in lockstep, so
"at the same time" does not depend on how fast two processes start.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from tests.cluster.nodes import Cluster, assert_once, done_runs, make_studies, wait
from tests.peers.radtriage import RadtriageServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def second_front(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RadtriageServer]:
    folder = tmp_path_factory.mktemp("front-b")
    front_b = RadtriageServer(
        folder,
        prefect_api_url=cluster.prefect.api_url,
        env={
            **cluster.shared_env,
            "RADTRIAGE_TRIAGE__LOCAL_WORKER": "false",
            "PREFECT_HOME": str(folder / "prefect"),
            "RADTRIAGE_STORAGE__DATA_DIR": str(cluster.front.data_dir),  # the shared archive
        },
        user=("bob", "correct horse battery staple"),  # users live in the shared index
    )
    cluster.others.append(front_b)
    front_b.start()
    assert front_b.dicom_port != cluster.front.dicom_port
    yield front_b
    front_b.stop()


def _nodelay(event: Event) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def associate(node: RadtriageServer, datasets: list[pydicom.Dataset]) -> Association:
    ae = AE(ae_title="STORESCU")
    for sop_class, syntax in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(
        "127.0.0.1", node.dicom_port, ae_title=node.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)]
    )
    assert assoc.is_established, f"no association with {node.folder.name}"
    return assoc


def send_in_lockstep(sends: dict[RadtriageServer, list[pydicom.Dataset]]) -> dict[str, list[int]]:
    """Send each node its datasets over one association per node, one C-STORE per node
    at a time, all starting together; return the statuses per node folder."""
    assocs = {node: associate(node, datasets) for node, datasets in sends.items()}
    steps = max(len(d) for d in sends.values())
    barrier = threading.Barrier(len(sends))
    statuses: dict[str, list[int]] = {node.folder.name: [] for node in sends}
    errors: list[BaseException] = []

    def sender(node: RadtriageServer) -> Callable[[], None]:
        def run() -> None:
            try:
                for i in range(steps):
                    barrier.wait(30)
                    if i < len(sends[node]):
                        statuses[node.folder.name].append(int(assocs[node].send_c_store(sends[node][i]).Status))
            except BaseException as err:  # noqa: BLE001 - reported by the test
                errors.append(err)
                barrier.abort()

        return run

    threads = [threading.Thread(target=sender(node)) for node in sends]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for assoc in assocs.values():
        assoc.release()
    assert not errors, errors
    return statuses


def instances_of(cluster: Cluster, study_uid: str) -> list[str]:
    rows = cluster.query(
        'SELECT i."SOPInstanceUID" AS uid FROM instance i JOIN series se ON se.id = i.series_id '
        'JOIN study s ON s.id = se.study_id WHERE s."StudyInstanceUID" = :uid AND se."Modality" = \'CT\'',
        uid=study_uid,
    )
    return [r["uid"] for r in rows]


def archived_files(cluster: Cluster, study_uid: str) -> list[Path]:
    return sorted((cluster.front.data_dir / "files" / study_uid).rglob("*.dcm"))


def test_the_same_instances_sent_to_both_receivers_at_once_are_stored_once(
    cluster: Cluster, second_front: RadtriageServer, tmp_path: Path
) -> None:
    [(study_uid, files)] = make_studies(tmp_path, 1, first_seed=900).items()
    datasets = [pydicom.dcmread(f) for f in files]
    statuses = send_in_lockstep({cluster.front: datasets, second_front: datasets})
    assert all(s == [0] * len(datasets) for s in statuses.values()), statuses  # both answer Success

    assert sorted(instances_of(cluster, study_uid)) == sorted(str(d.SOPInstanceUID) for d in datasets)
    ct_files = [
        f for f in archived_files(cluster, study_uid) if pydicom.dcmread(f, stop_before_pixels=True).Modality == "CT"
    ]
    assert len(ct_files) == len(datasets)
    resent = cluster.front.log_text().count("already stored") + second_front.log_text().count("already stored")
    assert resent == len(datasets), resent  # each instance: stored by one node, acknowledged by the other
    wait("the study analysed", lambda: done_runs(cluster, {study_uid}), cluster, timeout=120)
    assert_once(cluster, {study_uid})


def test_a_study_received_half_on_each_receiver_is_analysed_once(
    cluster: Cluster, second_front: RadtriageServer, tmp_path: Path
) -> None:
    [(study_uid, files)] = make_studies(tmp_path, 1, first_seed=901).items()
    datasets = [pydicom.dcmread(f) for f in files]
    statuses = send_in_lockstep({cluster.front: datasets[0::2], second_front: datasets[1::2]})
    assert all(set(s) == {0} for s in statuses.values()), statuses

    assert sorted(instances_of(cluster, study_uid)) == sorted(str(d.SOPInstanceUID) for d in datasets)
    wait("the study analysed", lambda: done_runs(cluster, {study_uid}), cluster, timeout=120)
    assert_once(cluster, {study_uid})
    # Stable once: one revision, dispatched once, by one of the two dispatchers.
    runs = [r for r in cluster.runs() if r["study"] == study_uid]
    assert [(r["revision"], r["status"]) for r in runs] == [(1, "done")], runs
    dispatched = [
        line
        for node in (cluster.front, second_front)
        for line in node.log_text().splitlines()
        if f"dispatched study {study_uid}" in line
    ]
    assert len(dispatched) == 1, dispatched
