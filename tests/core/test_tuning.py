"""pipeline/dicom/tuning.py is active on real associations, and says so when it is not.

The tuning swaps pynetdicom's socket class, wraps its queues and replaces a module
global; an upgrade of pynetdicom can make any of that silently ineffective. These tests
fail then: the receiver's associations must be tuned, and pynetdicom must still read
through the tuned socket and wait through the tuned clock.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import types
from pathlib import Path

import pynetdicom
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from pipeline.dicom import tuning

from .conftest import HOST, running_receiver

pytestmark = pytest.mark.slow  # a receiver on loopback

ROOT = Path(__file__).resolve().parents[2]


def test_pynetdicom_is_the_version_the_tuning_was_written_against() -> None:
    assert pynetdicom.__version__ == tuning.PYNETDICOM_VERSION
    pinned = re.search(r'"pynetdicom==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned is not None and pinned.group(1) == tuning.PYNETDICOM_VERSION


def test_the_receivers_associations_are_tuned_and_pynetdicom_uses_the_tuning(
    tmp_path: Path, study_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"ready": 0, "recv": 0, "wake_wait": 0}
    ready, recv = tuning._LowLatencySocket.ready.fget, tuning._LowLatencySocket.recv  # type: ignore[attr-defined]
    sleep = tuning._ReactorClock.sleep

    def counting_ready(sock: object) -> bool:
        calls["ready"] += 1
        return bool(ready(sock))

    def counting_recv(sock: object, n: int) -> bytearray:
        calls["recv"] += 1
        return recv(sock, n)

    def counting_sleep(clock: object, seconds: float) -> None:
        if seconds == tuning._REACTOR_POLL_SECONDS and hasattr(threading.current_thread(), tuning._WAKE_ATTRIBUTE):
            calls["wake_wait"] += 1
        sleep(clock, seconds)  # type: ignore[arg-type]

    monkeypatch.setattr(tuning._LowLatencySocket, "ready", property(counting_ready))
    monkeypatch.setattr(tuning._LowLatencySocket, "recv", counting_recv)
    monkeypatch.setattr(tuning._ReactorClock, "sleep", counting_sleep)

    with running_receiver(tmp_path) as running:
        server = running.server
        assert tuning.contexts_are_cheap(server)
        ae = AE(ae_title="TUNINGTEST")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(HOST, running.port, ae_title="RADTRIAGE")
        assert assoc.is_established
        try:
            deadline = time.monotonic() + 5
            while not server.active_associations and time.monotonic() < deadline:
                time.sleep(0.01)
            ours = server.active_associations
            assert ours and all(tuning.is_tuned(a) for a in ours), "the receiver's association is not tuned"
            assert assoc.send_c_echo().Status == 0x0000
            assert assoc.send_c_store(dcmread(study_files[0])).Status == 0x0000
        finally:
            assoc.release()
    # pynetdicom still reads PDUs through the tuned socket and polls through the tuned clock.
    assert calls["ready"] > 0 and calls["recv"] > 0 and calls["wake_wait"] > 0, calls


def test_a_tuning_that_cannot_apply_warns_and_leaves_the_association(caplog: pytest.LogCaptureFixture) -> None:
    tuning._warned.clear()
    unknown = types.SimpleNamespace(dul=types.SimpleNamespace(socket=object()))
    with caplog.at_level(logging.WARNING, logger="pipeline.dicom.tuning"):
        assert tuning.tune_association(unknown) is False
        assert tuning.cheap_context_copies(types.SimpleNamespace(contexts=None)) is False
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'low-latency DUL' skipped" in m for m in warned), warned
    assert any("'cheap context copies' skipped" in m for m in warned), warned
    assert not tuning.is_tuned(unknown)
