"""Two writers, one archive: the same SOP Instance stored at once by two receivers
(two processes' Archive objects on one folder and one index) is kept once, and the file
on disk is the one its index row describes. Many writers on one Archive are committed in
groups, with the same outcome. On SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import func, select

from pipeline.archive import Archive
from pipeline.archive.store import encode_dataset
from pipeline.config import Settings
from pipeline.index.db import migrate, session_scope
from pipeline.index.schema import Instance
from pipeline.lab.synth import synth_study
from tests.peers.postgres import PostgresServer

ROUNDS = 25


def _variants(folder: Path) -> list[pydicom.Dataset]:
    """One instance, twice: same UIDs, different bytes (as two senders might hold it)."""
    path = synth_study(folder, seed=5, slices=2, rows=64, cols=64)[0]
    first = pydicom.dcmread(path)
    second = pydicom.dcmread(path)
    second.ImageComments = "x" * 4000  # a different size on disk
    return [first, second]


def _race(settings: Settings, variants: list[pydicom.Dataset]) -> None:
    archives = [Archive(settings), Archive(settings)]  # two receivers: own engines, own writers
    try:
        for round_ in range(ROUNDS):
            uid = f"1.2.826.0.1.3680043.8.498.77{round_}"
            encoded = []
            for ds in variants:
                ds.SOPInstanceUID = uid
                encoded.append(encode_dataset(ds, ExplicitVRLittleEndian))
            barrier = threading.Barrier(2)

            def store(i: int, uid: str = uid, encoded: list[bytes] = encoded, barrier: threading.Barrier = barrier):
                barrier.wait()
                return archives[i].store_encoded(
                    encoded[i],
                    transfer_syntax=ExplicitVRLittleEndian,
                    sop_class_uid=variants[i].SOPClassUID,
                    sop_instance_uid=uid,
                )

            with ThreadPoolExecutor(2) as pool:
                results = list(pool.map(store, [0, 1]))
            assert sorted(r.duplicate for r in results) == [False, True], round_
            with session_scope(archives[0].session_factory, readonly=True) as session:
                rows = session.execute(select(Instance.path, Instance.size).where(Instance.SOPInstanceUID == uid)).all()
            assert len(rows) == 1
            [(rel, size)] = rows
            on_disk = settings.storage.data_dir.resolve() / rel
            assert on_disk.stat().st_size == size, f"round {round_}: the file is not the one the index describes"
        with session_scope(archives[0].session_factory, readonly=True) as session:
            assert session.scalar(select(func.count(Instance.id))) == ROUNDS + 0
        leftovers = list((settings.storage.data_dir / "incoming").iterdir())
        assert leftovers == []
    finally:
        for archive in archives:
            archive.engine.dispose()


def test_the_same_instance_from_two_receivers_is_stored_once_on_sqlite(tmp_path: Path) -> None:
    settings = Settings(storage={"data_dir": tmp_path / "data"})
    migrate(settings.index_url)
    _race(settings, _variants(tmp_path / "study"))


@pytest.mark.slow  # a PostgreSQL server
def test_the_same_instance_from_two_receivers_is_stored_once_on_postgresql(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    settings = Settings(storage={"data_dir": tmp_path / "data"}, index={"url": postgres.database()})
    migrate(settings.index_url)
    _race(settings, _variants(tmp_path / "study"))


def _group_race(settings: Settings, variants: list[pydicom.Dataset]) -> None:
    """Eight threads on one Archive, each round four instances sent twice each (other
    bytes): every instance stored once, as its index row says, and commits grouped."""
    archive = Archive(settings)
    try:
        for round_ in range(10):
            uids = [f"1.2.826.0.1.3680043.8.498.88{round_}{k}" for k in range(4)]
            jobs = [(uid, i) for uid in uids for i in (0, 1)]
            encoded = {}
            for uid, i in jobs:
                variants[i].SOPInstanceUID = uid
                encoded[uid, i] = encode_dataset(variants[i], ExplicitVRLittleEndian)
            barrier = threading.Barrier(len(jobs))

            def store(job: tuple[str, int], barrier: threading.Barrier = barrier, encoded: dict = encoded):
                barrier.wait()
                uid, i = job
                return archive.store_encoded(
                    encoded[uid, i],
                    transfer_syntax=ExplicitVRLittleEndian,
                    sop_class_uid=variants[i].SOPClassUID,
                    sop_instance_uid=uid,
                )

            with ThreadPoolExecutor(len(jobs)) as pool:
                results = list(pool.map(store, jobs))
            for uid in uids:
                assert sorted(r.duplicate for r in results if r.SOPInstanceUID == uid) == [False, True], (round_, uid)
            with session_scope(archive.session_factory, readonly=True) as session:
                rows = session.execute(
                    select(Instance.path, Instance.size).where(Instance.SOPInstanceUID.in_(uids))
                ).all()
            assert len(rows) == len(uids)
            for rel, size in rows:
                on_disk = settings.storage.data_dir.resolve() / rel
                assert on_disk.stat().st_size == size, f"round {round_}: the file is not the one the index describes"
        assert list((settings.storage.data_dir / "incoming").iterdir()) == []
        assert archive._group.batches < archive._group.items, "no two writers were ever committed together"
    finally:
        archive.engine.dispose()


def test_many_writers_on_one_archive_are_committed_in_groups_on_sqlite(tmp_path: Path) -> None:
    settings = Settings(storage={"data_dir": tmp_path / "data"})
    migrate(settings.index_url)
    _group_race(settings, _variants(tmp_path / "study"))


@pytest.mark.slow  # a PostgreSQL server
def test_many_writers_on_one_archive_are_committed_in_groups_on_postgresql(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    settings = Settings(storage={"data_dir": tmp_path / "data"}, index={"url": postgres.database()})
    migrate(settings.index_url)
    _group_race(settings, _variants(tmp_path / "study"))


def test_the_writer_queue_hands_the_lock_on_at_once(tmp_path: Path) -> None:
    """Two receivers' writer queues on one index file: the second waits while the first
    holds it and goes on the moment it is released (no busy-handler sleep)."""
    import time

    from pipeline.index.writer import WriterLock

    first, second = WriterLock(tmp_path / "index.sqlite"), WriterLock(tmp_path / "index.sqlite")
    entered = threading.Event()
    entered_at: list[float] = []
    released_at: list[float] = []

    def take_second() -> None:
        with second.held():
            entered_at.append(time.monotonic())
            entered.set()

    try:
        with first.held():
            thread = threading.Thread(target=take_second)
            thread.start()
            assert not entered.wait(0.2), "the second writer got in while the first held the queue"
            released_at.append(time.monotonic())
        assert entered.wait(5)
        thread.join()
        assert entered_at[0] >= released_at[0]
        assert entered_at[0] - released_at[0] < 0.5, "the waiting writer was not woken when the lock was free"
    finally:
        first.close()
        second.close()
