"""Forwarding to real Orthanc nodes on loopback: delivery, retries, backoff, dead letters."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import timedelta

import pydicom
import pytest

from pipeline.forward import Forwarder, deliver_due, enqueue_forwards, list_jobs
from pipeline.index.db import session_scope
from pipeline.index.schema import utcnow
from pipeline.index.triage import ForwardState
from tests.peers.orthanc import LOOPBACK, OrthancPeer

pytestmark = pytest.mark.slow  # Orthanc and hung nodes


def node(peer: OrthancPeer, kinds: tuple[str, ...] = ("SEG", "SR")) -> dict[str, object]:
    return {"ae_title": peer.ae_title, "host": LOOPBACK, "port": peer.dicom_port, "kinds": list(kinds)}


def jobs_by(factory, key: Callable = lambda j: (j.SOPInstanceUID, j.destination_ae)) -> dict:
    with session_scope(factory, readonly=True) as session:
        return {key(j): j for j in list_jobs(session)}


def queue_results(settings, archive, factory, objects) -> tuple[str, str]:
    """Store the SEG and SR the way the flow does, and queue their forwards."""
    archive.store_dataset(objects.seg, derived=True)
    archive.store_dataset(objects.sr, derived=True)
    with session_scope(factory) as session:
        enqueue_forwards(session, objects.seg.SOPInstanceUID, "SEG", settings.forward.destinations)
        enqueue_forwards(session, objects.sr.SOPInstanceUID, "SR", settings.forward.destinations)
    return objects.seg.SOPInstanceUID, objects.sr.SOPInstanceUID


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return value


def wait_until_due(factory, sop_uid: str, ae: str) -> None:
    wait_until(lambda: jobs_by(factory)[sop_uid, ae].next_attempt_at <= utcnow(), what=f"{sop_uid} due again")


def test_seg_and_sr_arrive_at_orthanc_as_archived(make_settings, index, objects, orthanc) -> None:
    settings = make_settings([node(orthanc)])
    archive, factory = index(settings)
    seg_uid, sr_uid = queue_results(settings, archive, factory, objects)

    result = deliver_due(settings, archive, factory)

    assert result.delivered == 2 and result.failed == 0
    stored = {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in orthanc.instances()}
    assert set(stored) == {seg_uid, sr_uid}
    for uid, sop_class in ((seg_uid, "1.2.840.10008.5.1.4.1.1.66.4"), (sr_uid, "1.2.840.10008.5.1.4.1.1.88.34")):
        tags = orthanc.get(f"/instances/{stored[uid]}/simplified-tags")
        assert tags["SOPClassUID"] == sop_class
        assert tags["StudyInstanceUID"] == objects.ct[0].StudyInstanceUID
    archived_seg = pydicom.dcmread(archive.path_of(seg_uid))
    assert orthanc.get(f"/instances/{stored[seg_uid]}/simplified-tags")["SegmentSequence"][0]["SegmentLabel"] == "bleed"
    assert archived_seg.SegmentSequence[0].SegmentLabel == "bleed"
    jobs = jobs_by(factory)
    assert {(j.state, j.attempts, j.last_error) for j in jobs.values()} == {(ForwardState.delivered, 1, "")}
    assert all(j.delivered_at is not None for j in jobs.values())
    # Delivered jobs are done: another round sends nothing.
    assert deliver_due(settings, archive, factory).outcomes == {}


def timed_round(settings, archive, factory):
    """One round, with the clock read just before and just after it."""
    before = utcnow()
    result = deliver_due(settings, archive, factory)
    return result, before, utcnow()


def assert_backoff(job, before, after, seconds: float) -> None:
    """The job was put off by ``seconds`` from some moment inside the round."""
    assert before + timedelta(seconds=seconds) <= job.next_attempt_at <= after + timedelta(seconds=seconds)


def test_node_down_queues_with_growing_backoff_then_delivers(make_settings, index, objects, orthanc) -> None:
    settings = make_settings([node(orthanc)], backoff_seconds=0.3, backoff_max_seconds=0.7)
    archive, factory = index(settings)
    orthanc.stop(graceful=False)  # crashed node
    seg_uid, sr_uid = queue_results(settings, archive, factory, objects)

    result, before, after = timed_round(settings, archive, factory)
    assert (result.delivered, result.failed) == (0, 2)
    job = jobs_by(factory)[seg_uid, "ORTHANC"]
    assert (job.state, job.attempts) == (ForwardState.pending, 1)
    assert "cannot connect to ORTHANC@127.0.0.1" in job.last_error
    assert_backoff(job, before, after, 0.3)
    # Not due yet: a round right away leaves the node alone.
    assert deliver_due(settings, archive, factory).outcomes == {}
    assert jobs_by(factory)[seg_uid, "ORTHANC"].attempts == 1

    for attempt, wait in ((2, 0.6), (3, 0.7)):  # doubled, then capped
        wait_until_due(factory, seg_uid, "ORTHANC")
        result, before, after = timed_round(settings, archive, factory)
        assert result.failed == 2
        job = jobs_by(factory)[seg_uid, "ORTHANC"]
        assert (job.state, job.attempts) == (ForwardState.pending, attempt)
        assert_backoff(job, before, after, wait)

    orthanc.start()  # on the same ports
    wait_until_due(factory, seg_uid, "ORTHANC")
    assert deliver_due(settings, archive, factory).delivered == 2
    assert orthanc.sop_instance_uids() == {seg_uid, sr_uid}
    assert {(j.state, j.attempts, j.last_error) for j in jobs_by(factory).values()} == {(ForwardState.delivered, 4, "")}


def test_gives_up_after_max_attempts_and_retry_now_revives(make_settings, index, objects, orthanc, capsys) -> None:
    from pipeline.cli import main

    settings = make_settings([node(orthanc)], max_attempts=2, backoff_seconds=0.1)
    archive, factory = index(settings)
    orthanc.stop(graceful=False)
    seg_uid, sr_uid = queue_results(settings, archive, factory, objects)

    deliver_due(settings, archive, factory)
    wait_until_due(factory, seg_uid, "ORTHANC")
    deliver_due(settings, archive, factory)
    jobs = jobs_by(factory)
    assert {(j.state, j.attempts) for j in jobs.values()} == {(ForwardState.dead, 2)}
    assert all("cannot connect" in j.last_error for j in jobs.values())
    time.sleep(0.15)  # longer than any backoff: a dead job is never due again
    assert deliver_due(settings, archive, factory).outcomes == {}

    config = str(archive.data_dir.parent / "radtriage.toml")
    assert main(["--config", config, "forwards"]) == 0
    text = capsys.readouterr().out
    assert f"ORTHANC 127.0.0.1:{orthanc.dicom_port}: 0 pending, 0 delivered, 2 dead" in text
    assert f"dead      SEG {seg_uid}  attempts 2" in text and "last error: cannot connect to ORTHANC" in text

    orthanc.start()
    assert main(["--config", config, "forwards", "--retry-now", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["destinations"] == [
        {
            "ae_title": "ORTHANC",
            "address": f"127.0.0.1:{orthanc.dicom_port}",
            "configured": True,
            "pending": 0,
            "delivered": 2,
            "dead": 0,
        }
    ]
    assert report["jobs"] == []  # default listing: pending and dead only
    assert orthanc.sop_instance_uids() == {seg_uid, sr_uid}
    assert main(["--config", config, "forwards", "--json", "--state", "delivered"]) == 0
    delivered = json.loads(capsys.readouterr().out)["jobs"]
    assert {(j["SOPInstanceUID"], j["state"], j["attempts"]) for j in delivered} == {
        (seg_uid, "delivered", 1),
        (sr_uid, "delivered", 1),
    }


REFUSE_SR = """
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.Modality == "SR" then error("this node refuses SR") end
  return true
end
"""


def test_failure_status_counts_as_failed_attempt(make_settings, index, objects, tmp_path) -> None:
    picky = OrthancPeer(tmp_path / "picky", ae_title="PICKY", lua=REFUSE_SR)
    picky.start()
    try:
        settings = make_settings([node(picky)])
        archive, factory = index(settings)
        seg_uid, sr_uid = queue_results(settings, archive, factory, objects)
        result = deliver_due(settings, archive, factory)
        assert (result.delivered, result.failed) == (1, 1)
        assert picky.sop_instance_uids() == {seg_uid}
    finally:
        picky.stop(graceful=False)
    jobs = jobs_by(factory)
    assert (jobs[seg_uid, "PICKY"].state, jobs[seg_uid, "PICKY"].attempts) == (ForwardState.delivered, 1)
    sr_job = jobs[sr_uid, "PICKY"]
    assert (sr_job.state, sr_job.attempts) == (ForwardState.pending, 1)
    assert "answered C-STORE with 0xA700 Failure" in sr_job.last_error


def test_forwarder_keeps_delivering_while_other_nodes_are_down_or_hung(
    make_settings, index, objects, orthanc, second_orthanc, closed_port, hung_node
) -> None:
    down = {"ae_title": "DOWN", "host": LOOPBACK, "port": closed_port, "kinds": ["SEG", "SR"]}
    hung = {"ae_title": "HUNG", "host": LOOPBACK, "port": hung_node, "kinds": ["SEG", "SR"]}
    settings = make_settings(
        [down, hung, node(orthanc), node(second_orthanc, kinds=("SEG",))], network_timeout=4.0, max_attempts=100
    )
    archive, factory = index(settings)
    forwarder = Forwarder(settings, archive, factory, poll_interval=0.5)
    forwarder.start()
    try:
        seg_uid, sr_uid = queue_results(settings, archive, factory, objects)
        forwarder.wake()
        started = time.monotonic()
        orthanc.wait_for_instances({seg_uid, sr_uid}, timeout=5)
        second_orthanc.wait_for_instances({seg_uid}, timeout=5)
        # The hung node answers nothing for network_timeout_seconds (4 s); the others did not wait for it.
        assert time.monotonic() - started < 3.5
        assert "HUNG" in forwarder.in_flight

        wait_until(lambda: jobs_by(factory)[seg_uid, "HUNG"].attempts >= 1, timeout=8, what="an attempt on HUNG")
        jobs = jobs_by(factory)
        assert jobs[seg_uid, "HUNG"].state == ForwardState.pending
        assert "did not answer the association request within 4 s" in jobs[seg_uid, "HUNG"].last_error
        assert jobs[seg_uid, "DOWN"].state == ForwardState.pending and jobs[seg_uid, "DOWN"].attempts >= 1
        assert {jobs[uid, ae].state for uid, ae in [(seg_uid, "ORTHANC"), (sr_uid, "ORTHANC"), (seg_uid, "PACS2")]} == {
            ForwardState.delivered
        }
        assert (sr_uid, "PACS2") not in jobs  # PACS2 subscribes to SEG only
        assert second_orthanc.sop_instance_uids() == {seg_uid}
    finally:
        forwarder.stop()


def test_forwarder_picks_up_jobs_queued_elsewhere_and_after_a_restart_of_the_node(
    make_settings, index, objects, orthanc
) -> None:
    settings = make_settings([node(orthanc)], backoff_seconds=0.2, backoff_max_seconds=0.4)
    archive, factory = index(settings)
    forwarder = Forwarder(settings, archive, factory, poll_interval=0.3)
    forwarder.start()
    try:
        orthanc.stop(graceful=False)
        seg_uid, sr_uid = queue_results(settings, archive, factory, objects)  # no wake(): another process queued them
        wait_until(lambda: jobs_by(factory)[seg_uid, "ORTHANC"].attempts >= 2, what="two failed attempts")
        orthanc.start()
        orthanc.wait_for_instances({seg_uid, sr_uid}, timeout=5)
        wait_until(
            lambda: {j.state for j in jobs_by(factory).values()} == {ForwardState.delivered},
            what="jobs marked delivered",
        )
    finally:
        forwarder.stop()
