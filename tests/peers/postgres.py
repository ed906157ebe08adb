"""A real PostgreSQL server for the tests, in a temporary folder, on 127.0.0.1.

Debian's ``postgresql`` binaries (``make test`` installs them); ``initdb`` into a fresh
folder and ``pg_ctl start`` with its socket in that folder and TCP on 127.0.0.1 only, as
the ``postgres`` user when the tests run as root (``initdb`` refuses root). No system
service is used or touched. :meth:`PostgresServer.database` gives each test module a
database of its own.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import uuid
from pathlib import Path

from pipeline.triage.prefect_server import free_port


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """``initdb`` + ``pg_ctl`` in ``folder``; stop with :meth:`stop`."""

    def __init__(self, folder: Path) -> None:
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed: run `make test` (it installs Debian's postgresql)")
        self.bin = bin_dir
        self.folder = Path(folder)
        self.data = self.folder / "data"
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)

    def start(self) -> PostgresServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.as_postgres:
            shutil.chown(self.folder, "postgres", "postgres")
        done = self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"
        )
        assert done.returncode == 0, done.stderr
        options = f"-k {self.folder} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        done = self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w", "start")
        assert done.returncode == 0, done.stderr + (self.folder / "log").read_text(errors="replace")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def database(self) -> str:
        """A new, empty database; its SQLAlchemy URL."""
        name = f"radtriage_{uuid.uuid4().hex[:12]}"
        done = self._run(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-c", f"CREATE DATABASE {name}"
        )
        assert done.returncode == 0, done.stderr
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"
