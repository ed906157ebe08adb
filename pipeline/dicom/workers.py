"""Several receiver processes on one port (``[dicom] workers``): parallel senders use
every core.

One Python process handles every association with one interpreter lock, so four
modalities sending at once share one core. :class:`ReceiverPool` (a component of
``radtriage serve``) binds and listens on ``[dicom] bind:port`` once, then runs
``workers`` child processes (``python -m pipeline.dicom.workers``) that each accept on
that inherited socket with their own pynetdicom AE, their own
:class:`~pipeline.archive.Archive` and index engine, sharing the data folder and the
index (SQLite in WAL mode, or PostgreSQL). A shared listening socket rather than
``SO_REUSEPORT``: a free process takes the next connection (the kernel's hash would put
two of four senders on one process half of the time), and a second radtriage started on
the same port still fails with "address in use" instead of silently sharing it.

Every child runs the same receiver (:func:`pipeline.dicom.receiver.start_receiver`): AE
title checks, peers' rights, TLS and limits are the same in each. ``max_associations``
is shared out: each process takes ``ceil(max_associations / workers)``;
``max_associations_per_address`` applies in each process (at most its share). Children
log to the parent's stderr, each line tagged ``[receiver N]``.

Supervision: a child that exits is logged and restarted after a backoff (1 s, doubling
to 30 s; back to 1 s once a child has run a minute). Its temp files in ``incoming/``
(named ``r<pid>-…``) are removed first: none can be in flight. Children die with the
parent: ``PR_SET_PDEATHSIG`` (Linux) kills them when the parent dies, even by ``kill
-9``, and each also stops when its stdin (a pipe from the parent) reaches end of file.
Children run in their own session, so signals to serve's process group (Ctrl-C) reach
serve alone; on stop, serve sends them SIGTERM, then SIGKILL after 10 s. Crash recovery
(:meth:`~pipeline.archive.Archive.recover`) runs once, in the parent, before any child
starts.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import json
import logging
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.archive import Archive
from pipeline.config import Settings
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

READY = "ready"
START_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 10.0
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
HEALTHY_AFTER_SECONDS = 60.0
_PR_SET_PDEATHSIG = 1


def temp_prefix(pid: int) -> str:
    """The start of the names of the temp files receiver process ``pid`` writes."""
    return f"r{pid}-"


def process_settings(settings: Settings, processes: int) -> Settings:
    """The settings one of ``processes`` receiver processes runs with: its share of
    ``max_associations`` (rounded up), and ``max_associations_per_address`` within it."""
    dicom = settings.dicom
    share = math.ceil(dicom.max_associations / processes)
    mine = dicom.model_copy(
        update={
            "workers": 1,
            "max_associations": share,
            "max_associations_per_address": min(dicom.max_associations_per_address, share),
        }
    )
    return settings.model_copy(update={"dicom": mine})


def bind_listening_socket(settings: Settings, retry_seconds: float = 5.0) -> socket.socket:
    """Bind and listen on ``[dicom] bind:port`` (port 0: any free port).

    A port still held for a moment by the children of a server killed just before (they
    die with it, a few milliseconds later) is retried for ``retry_seconds``.
    """
    host, port = settings.dicom.bind, settings.dicom.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + retry_seconds
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            break
        except OSError as err:
            sock.close()
            if err.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise ConfigError(f"DICOM receiver cannot listen on {host}:{port}: {err.strerror}") from None
            time.sleep(0.1)
    # Connections queue here while every process is busy accepting (bounded, like the slots).
    sock.listen(max(settings.dicom.max_associations, 16))
    return sock


@dataclass
class _Child:
    """One receiver process slot: the process now running in it, and its restarts."""

    number: int
    proc: subprocess.Popen[bytes] | None = None
    ready: bool = False
    started_at: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    backoff: float = BACKOFF_FIRST_SECONDS
    history: list[int] = field(default_factory=list)  # pids, oldest first


class ReceiverPool:
    """``workers`` receiver processes accepting on one port, as one component of ``serve``.

    Parameters
    ----------
    settings
        The whole settings; each child gets :func:`process_settings` of them.
    processes
        How many receiver processes (``[dicom] workers`` resolved, at least 2).
    """

    name = "DICOM receiver"

    def __init__(self, settings: Settings, processes: int) -> None:
        self.settings = settings
        self.processes = processes
        self.incoming_dir = Path(settings.storage.data_dir).resolve() / "incoming"
        self.sock: socket.socket | None = None
        self.children = [_Child(n + 1) for n in range(processes)]
        self._stop = threading.Event()
        self._started = threading.Event()
        self._start_error: str | None = None
        self._thread: threading.Thread | None = None
        self._log_level = logging.getLogger().getEffectiveLevel()

    @property
    def port(self) -> int:
        if self.sock is None:
            raise RuntimeError("the DICOM receiver is not started")
        return int(self.sock.getsockname()[1])

    @property
    def pids(self) -> list[int]:
        """The receiver processes running now."""
        return [c.proc.pid for c in self.children if c.proc is not None and c.proc.poll() is None]

    def start(self) -> None:
        from pipeline.dicom.receiver import ssl_context

        ssl_context(self.settings)  # a TLS configuration error stops serve here, said once
        self.sock = bind_listening_socket(self.settings)
        self._stop.clear()
        # Children are started by this thread only: PR_SET_PDEATHSIG fires when the thread
        # that started a child ends, so it lives until every child is stopped.
        self._thread = threading.Thread(target=self._supervise, name="receiver-supervisor", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_SECONDS) or self._start_error:
            error = self._start_error or f"not every receiver process was ready within {START_TIMEOUT_SECONDS:g} s"
            self.stop()
            raise RuntimeError(f"DICOM receiver did not start: {error}; see the [receiver N] lines above")
        host, port = self.sock.getsockname()[:2]
        log.info(
            "DICOM receiver %s listening on %s:%d%s in %d processes (pids %s)",
            self.settings.dicom.ae_title,
            host,
            port,
            " (TLS)" if self.settings.dicom.tls.enabled else "",
            self.processes,
            ", ".join(map(str, self.pids)),
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_SECONDS + 5)
            self._thread = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # ---- supervision (the supervisor thread only) ---------------------------------
    def _supervise(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._round()
                except Exception:  # the supervisor must outlive any one failure
                    log.exception("receiver supervisor round failed; carrying on")
                self._stop.wait(0.1)
        finally:
            self._stop_children()

    def _round(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.proc is None:
                if now >= child.next_start and self._start_error is None:
                    self._spawn(child)
                continue
            if not child.ready:
                self._read_ready(child)
            code = child.proc.poll()
            if code is not None:
                self._exited(child, code)
        if not self._started.is_set() and all(c.ready for c in self.children):
            self._started.set()

    def _spawn(self, child: _Child) -> None:
        assert self.sock is not None
        fd = self.sock.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.dicom.workers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(fd,),
            # Its own session: a terminal's Ctrl-C or a SIGTERM to serve's process group
            # reaches serve alone, which stops the receivers last, in order (no restarts).
            start_new_session=True,
        )
        header = {
            "number": child.number,
            "of": self.processes,
            "parent": os.getpid(),
            "fd": fd,
            "log_level": self._log_level,
            "settings": process_settings(self.settings, self.processes).model_dump(mode="json"),
        }
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(header).encode() + b"\n")
            proc.stdin.flush()  # stdin stays open: the child stops when it closes
        except BrokenPipeError:
            pass  # it died at once; the next round sees its exit code
        child.proc, child.ready, child.started_at = proc, False, time.monotonic()
        child.history.append(proc.pid)
        log.info("receiver process %d of %d started (pid %d)", child.number, self.processes, proc.pid)

    def _read_ready(self, child: _Child) -> None:
        assert child.proc is not None and child.proc.stdout is not None
        readable, _, _ = select.select([child.proc.stdout], [], [], 0)
        if readable and child.proc.stdout.readline().decode().strip() == READY:
            child.ready = True

    def _exited(self, child: _Child, code: int) -> None:
        assert child.proc is not None
        pid, ran = child.proc.pid, time.monotonic() - child.started_at
        for pipe in (child.proc.stdin, child.proc.stdout):
            if pipe is not None:
                pipe.close()
        child.proc, child.ready = None, False
        removed = self._remove_temp_files(pid)
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        if code == 0:
            how = "stopped (it was sent SIGTERM)"
        if not self._started.is_set():
            self._start_error = f"receiver process {child.number} (pid {pid}) {how} while starting"
            self._started.set()
            return
        if ran >= HEALTHY_AFTER_SECONDS:
            child.backoff = BACKOFF_FIRST_SECONDS
        child.restarts += 1
        child.next_start = time.monotonic() + child.backoff
        log.error(
            "receiver process %d (pid %d) %s after %.0f s%s; its open associations were cut off "
            "(their senders get no answer and resend); restarting it in %g s (restart %d)",
            child.number,
            pid,
            how,
            ran,
            f", {removed} of its partial temp files removed" if removed else "",
            child.backoff,
            child.restarts,
        )
        child.backoff = min(child.backoff * 2, BACKOFF_MAX_SECONDS)

    def _remove_temp_files(self, pid: int) -> int:
        removed = 0
        for path in self.incoming_dir.glob(f"{temp_prefix(pid)}*"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def _stop_children(self) -> None:
        running = [c for c in self.children if c.proc is not None]
        for child in running:
            assert child.proc is not None
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for child in running:
            assert child.proc is not None
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("receiver process %d (pid %d) did not stop; killing it", child.number, child.proc.pid)
                child.proc.kill()
                child.proc.wait()
            for pipe in (child.proc.stdin, child.proc.stdout):
                if pipe is not None:
                    pipe.close()
            child.proc = None


# ---- the child process ------------------------------------------------------------
def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux), and exit now if it already did."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); stdin end of file stops us", ctypes.get_errno())
    if os.getppid() != parent:
        os._exit(1)


def _read_line(fd: int) -> bytes:
    """The header line from ``fd``, read unbuffered (no buffer lock for the watcher thread)."""
    line = b""
    while not line.endswith(b"\n"):
        piece = os.read(fd, 65536)  # the parent writes the header line and nothing after it
        if not piece:
            break
        line += piece
    return line


def _log_setup(number: int, level: int) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s [receiver {number}] %(name)s: %(message)s",
    )
    for noisy in ("pynetdicom", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level > logging.DEBUG else logging.INFO)


def worker_main() -> int:
    """A receiver process: read its header from stdin, accept on the inherited socket
    until SIGTERM or until stdin (the parent) closes."""
    header: dict[str, Any] = json.loads(_read_line(0) or b"null") or {}
    if not header:
        print("pipeline.dicom.workers is started by radtriage serve ([dicom] workers)", file=sys.stderr)
        return 2
    _die_with_parent(int(header["parent"]))
    _log_setup(int(header["number"]), int(header["log_level"]))
    from pipeline.dicom.receiver import start_receiver

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    settings = Settings.model_validate(header["settings"])
    archive = Archive(settings)
    archive.temp_prefix = temp_prefix(os.getpid())
    listen_socket = socket.socket(fileno=int(header["fd"]))
    server = start_receiver(settings, archive, listen_socket=listen_socket)

    def watch_parent() -> None:
        while os.read(0, 4096):  # b"" at end of file: the parent is gone
            pass
        stop.set()

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    gc.freeze()  # as ProcessRunner does: keep what lives as long as the process out of the GC
    sys.stdout.write(READY + "\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # nothing more goes to the parent's pipe
    while not stop.wait(1.0):
        pass
    server.shutdown()
    archive.engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
