"""Fixtures for forwarding: an archive with a SEG and an SR in it, and real Orthanc nodes."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from pipeline.archive import Archive
from pipeline.config import Settings, load_settings
from pipeline.index.db import create_index_engine, make_session_factory, migrate
from pipeline.triage.prefect_server import free_port
from tests.peers.orthanc import OrthancPeer

from .objects import ResultObjects, result_objects


@pytest.fixture(scope="session")
def objects() -> ResultObjects:
    return result_objects()


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings, numbers and booleans read the same in TOML


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Write a config file like an administrator would, and load it.

    ``make_settings(destinations, max_attempts=3, ...)``: the destinations as dicts,
    other keyword arguments go to ``[forward]``; ``network_timeout`` is
    ``dicom.network_timeout_seconds``. The file is ``tmp_path / "radtriage.toml"``.
    """

    def make(destinations: list[dict[str, Any]], *, network_timeout: float = 2.0, **forward: Any) -> Settings:
        forward = {"backoff_seconds": 0.2, "backoff_max_seconds": 1.0, "max_attempts": 5, **forward}
        lines = [
            "[dicom]",
            'ae_title = "RADTRIAGE"',
            f"network_timeout_seconds = {network_timeout}",
            "[storage]",
            f"data_dir = {json.dumps(str(tmp_path / 'data'))}",
            "fsync = false",
            "[forward]",
            *(f"{k} = {_toml_value(v)}" for k, v in forward.items()),
            f"destinations = {_toml_value(destinations)}",
        ]
        path = tmp_path / "radtriage.toml"
        path.write_text("\n".join(lines) + "\n")
        return load_settings(path)

    return make


@pytest.fixture
def index(make_settings: Callable[..., Settings]) -> Callable[[Settings], tuple[Archive, sessionmaker[Session]]]:
    """The archive and index session factory for a settings object (migrated)."""

    def build(settings: Settings) -> tuple[Archive, sessionmaker[Session]]:
        migrate(settings.index_url)
        engine = create_index_engine(settings.index_url)
        return Archive(settings, engine=engine), make_session_factory(engine)

    return build


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancPeer]:
    peer = OrthancPeer(tmp_path / "orthanc", ae_title="ORTHANC")
    peer.start()
    yield peer
    peer.stop(graceful=False)


@pytest.fixture
def second_orthanc(tmp_path: Path) -> Iterator[OrthancPeer]:
    peer = OrthancPeer(tmp_path / "orthanc2", ae_title="PACS2")
    peer.start()
    yield peer
    peer.stop(graceful=False)


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on: a node that is down (connection refused)."""
    return free_port()


@pytest.fixture
def hung_node() -> Iterator[int]:
    """A node that accepts TCP but never answers the association (a hung PACS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])
