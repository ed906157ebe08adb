"""Two writers, one archive: the same SOP Instance stored at once by two receivers
(two processes' Archive objects on one folder and one index) is kept once, and the file
on disk is the one its index row describes. On SQLite and on PostgreSQL."""

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
