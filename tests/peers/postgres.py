"""A real PostgreSQL server for the tests, in a temporary folder, on 127.0.0.1.

Debian's ``postgresql`` binaries (``make test`` installs them); ``initdb`` into a fresh
folder and ``pg_ctl start`` with its socket in that folder and TCP on 127.0.0.1 only, as
the ``postgres`` user when the tests run as root (``initdb`` refuses root). No system
service is used or touched. :meth:`PostgresServer.database` gives a test an empty
database of its own; :meth:`PostgresServer.migrated_database` one already at the head
revision, cloned from a template migrated once per session (a clone takes a tenth of a
second, a migration seconds), which is what ``RADTRIAGE_TEST_INDEX=postgresql`` hands
every test. The next clone is made and the last one dropped on a helper thread while
the test runs, so a test waits for neither.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

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
        self._template: str | None = None
        self._spare: Future[str] | None = None
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="postgres-databases")

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
        self._helper.shutdown(wait=True, cancel_futures=True)
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, name: str) -> str:
        """The SQLAlchemy URL of database ``name`` on this server."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def _admin(self, sql: str) -> None:
        # CREATE/DROP DATABASE cannot run in a transaction: autocommit.
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres") as conn:
            conn.autocommit = True
            conn.execute(sql)

    def database(self, *, template: str | None = None) -> str:
        """A new database, empty or a copy of ``template``; its SQLAlchemy URL."""
        name = f"radtriage_{uuid.uuid4().hex[:12]}"
        self._admin(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
        return self.url(name)

    def migrated_database(self) -> str:
        """A new database at the head revision (a copy of a template migrated once)."""
        if self._template is None:
            from pipeline.index.db import migrate

            url = self.database()
            migrate(url)  # its engine is disposed: no connection left to block the copies
            self._template = str(make_url(url).database)
        spare = self._spare or self._helper.submit(self.database, template=self._template)
        self._spare = self._helper.submit(self.database, template=self._template)
        return spare.result()

    def drop(self, url: str, *, wait: bool = True) -> None:
        """Drop the database ``url`` names, closing any connection a test left open;
        ``wait=False`` drops it on the helper thread."""
        sql = f"DROP DATABASE IF EXISTS {make_url(url).database} WITH (FORCE)"
        if wait:
            self._admin(sql)
        else:
            self._helper.submit(self._admin, sql)
