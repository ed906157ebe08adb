"""The data folder is radtriage's alone: a new install is private, an old one is fixed at
start with a log line, and what the receiver writes is private too."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pipeline.archive.permissions import secure_data_dir
from pipeline.errors import ConfigError
from tests.core.conftest import echoscu, storescu, write_config
from tests.peers.radtriage import ServeProcess, index_url

pytestmark = pytest.mark.slow  # radtriage serve as a process


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_serve_makes_an_old_install_private_and_writes_private_files(tmp_path: Path, study_files: list[Path]) -> None:
    data = tmp_path / "data"
    old = data / "files" / "old"
    old.mkdir(parents=True, mode=0o755)
    (old / "x.dcm").write_bytes(b"old")
    (old / "x.dcm").chmod(0o644)
    data.chmod(0o755)
    server = ServeProcess(write_config(tmp_path / "radtriage.toml", data)).start()
    try:
        assert echoscu(server.port).returncode == 0
        assert storescu(server.port, *study_files[:2]).returncode == 0
        log = server.wait_log("radtriage running")
    finally:
        server.kill()
    assert "tightened the permissions of" in log and "readable by other users" in log
    everything = [data, *data.rglob("*")]
    assert not [p for p in everything if _mode(p) & 0o077], "readable by others: " + ", ".join(
        f"{p.relative_to(tmp_path)} {oct(_mode(p))}" for p in everything if _mode(p) & 0o077
    )
    if index_url(data).startswith("sqlite"):  # on PostgreSQL the index is not a file here
        assert _mode(data / "index.sqlite") == 0o600
    assert len([p for p in (data / "files").rglob("*.dcm")]) == 3  # the old file and the two received
    assert all(_mode(p) == 0o700 for p in everything if p.is_dir())


def test_a_group_may_read_when_configured(tmp_path: Path) -> None:
    import grp
    import os

    group = grp.getgrgid(os.getgid()).gr_name
    data = tmp_path / "data"
    (data / "files").mkdir(parents=True)
    (data / "files" / "a.dcm").write_bytes(b"a")
    (data / "files" / "a.dcm").chmod(0o600)
    mask = os.umask(0o022)
    try:
        secure_data_dir(data, group)
    finally:
        os.umask(mask)
    assert _mode(data / "files" / "a.dcm") == 0o640
    assert _mode(data / "files") == 0o2750
    with pytest.raises(ConfigError, match="does not exist"):
        secure_data_dir(data, "no-such-group-radtriage")
