"""A spool's fdatasync started ahead (:meth:`pipeline.archive.spool.Spool.flush_ahead`):
the file a store gets is whole, and nothing closes it under a flush still running."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.archive.spool import Spool

KEY = ("1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1", "STORESCU")


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1) as executor:
        yield executor


def _spool(tmp_path: Path, flusher: ThreadPoolExecutor | None) -> Spool:
    path = tmp_path / "x.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    return Spool(path, fd, KEY, writeback=True, flusher=flusher)


def test_a_spool_flushed_ahead_finishes_whole(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    spool = _spool(tmp_path, pool)
    spool.write(b"meta")
    spool.write(memoryview(b"dataset" * 50_000))
    spool.flush_ahead()
    assert spool.flushing
    path, size = spool.finish(fsync=True)
    assert path.read_bytes() == b"meta" + b"dataset" * 50_000
    assert size == path.stat().st_size


def test_bytes_written_after_the_flush_began_are_kept(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    spool = _spool(tmp_path, pool)
    spool.write(b"first")
    spool.flush_ahead()
    spool.write(b" and after")
    path, size = spool.finish(fsync=True)
    assert path.read_bytes() == b"first and after"
    assert size == 15


def test_without_a_flusher_nothing_starts_ahead(tmp_path: Path) -> None:
    """fsync off: the archive gives no flusher, and finish does what it always did."""
    spool = _spool(tmp_path, None)
    spool.write(b"abc")
    spool.flush_ahead()
    assert not spool.flushing
    assert spool.finish(fsync=False)[0].read_bytes() == b"abc"


def test_a_discarded_spool_waits_for_its_running_flush(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    """An aborted store discards a spool whose flush is still queued: the file goes only
    after that flush ran, so its descriptor is never closed (or reused) under it."""
    spool = _spool(tmp_path, pool)
    spool.write(b"abc")
    hold = threading.Event()
    pool.submit(hold.wait, 10)  # the single worker is busy: the flush waits in the queue
    spool.flush_ahead()
    discarding = threading.Thread(target=spool.discard)
    discarding.start()
    discarding.join(0.3)
    assert discarding.is_alive(), "discard closed the file while its flush was still to run"
    assert spool.path.exists()
    hold.set()
    discarding.join(10)
    assert not discarding.is_alive()
    assert not spool.path.exists()
    assert spool.failed
