"""``radtriage serve`` as a real child process, for tests, benchmarks and screenshots.

:class:`ServeProcess` runs it with a config file (the archive tests); :class:`RadtriageServer`
is a whole installation configured by ``RADTRIAGE_*`` variables over
``config/default.toml``: its own data folder, free DICOM and web ports on 127.0.0.1, a
web user, and the Prefect API the caller gives (so a test session shares one server).
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.triage.prefect_server import free_port

REPO = Path(__file__).resolve().parents[2]
RADTRIAGE = [sys.executable, "-m", "pipeline"]


def index_url(data_dir: Path) -> str:
    """The index an installation with ``data_dir`` and no ``[index] url`` uses, as
    radtriage itself works it out: SQLite in ``data_dir``, or the test's PostgreSQL
    database under ``RADTRIAGE_TEST_INDEX=postgresql`` (``RADTRIAGE_INDEX__URL``)."""
    from pipeline.config import Settings

    return Settings(storage={"data_dir": Path(data_dir)}).index_url


class ServeProcess:
    """``radtriage serve`` as a real child process, optionally inside a prefix command.

    Its output goes to ``log_file``, which :meth:`wait_log` reads from the start each
    time: no line is ever lost in a pipe's buffer.

    Parameters
    ----------
    config
        ``--config`` for ``radtriage``; ``None`` leaves it to ``$RADTRIAGE_CONFIG``.
    folder
        Where the log file goes (default: beside ``config``).
    env
        The child's environment (default: ours with ``TCP_NODELAY=1``).
    wrap
        Turns the command into the one to run (e.g. inside ``unshare``).
    cwd
        The child's working folder (default: the repository).
    """

    subcommand = "serve"

    def __init__(
        self,
        config: Path | None = None,
        *,
        folder: Path | None = None,
        env: dict[str, str] | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
        cwd: Path | None = None,
    ) -> None:
        if folder is None and config is None:
            raise ValueError("give the folder for the log, or a config file beside which it goes")
        self.folder = Path(folder) if folder is not None else Path(config).parent  # type: ignore[arg-type]
        self.config = config
        self.env = env if env is not None else {**os.environ, "TCP_NODELAY": "1"}
        self.wrap = wrap
        self.cwd = cwd or REPO
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._read = 0
        self._log_start = 0  # the log file may hold an earlier run's lines (a restart)

    @property
    def log_file(self) -> Path:
        return self.folder / f"{self.subcommand}.log"

    def command(self) -> list[str]:
        cmd = [*RADTRIAGE, *(["--config", str(self.config)] if self.config else []), self.subcommand]
        return self.wrap(cmd) if self.wrap is not None else cmd

    def start(self, timeout: float = 60.0) -> ServeProcess:
        """Start and return once the DICOM receiver listens (its port is in :attr:`port`)."""
        self.launch()
        match = re.search(r"listening on [\d.]+:(\d+)", self.wait_log(r"listening on [\d.]+:\d+", timeout))
        assert match is not None
        self.port = int(match.group(1))
        return self

    def launch(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        self._read = 0
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def log_text(self) -> str:
        """What this run of the server logged so far."""
        if not self.log_file.exists():
            return ""
        with open(self.log_file, "rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")

    def drain(self) -> str:
        """What the server logged since the last call."""
        text = self.log_text()
        new, self._read = text[self._read :], len(text)
        return new

    def wait_log(self, pattern: str, timeout: float = 30.0) -> str:
        """Block until the server has logged a line matching ``pattern``; return the log."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            if re.search(pattern, text):
                return text
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"radtriage serve exited ({self.proc.returncode}) before logging {pattern!r}:\n{text}"
                )
            assert time.monotonic() < deadline, f"server never logged {pattern!r}:\n{text}"
            time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to the server (only the server, not the group); return its exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        return self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the whole process group (the server and its children), then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class RadtriageServer(ServeProcess):
    """One radtriage installation in ``folder``, run as ``radtriage serve``.

    Configured entirely by ``RADTRIAGE_*`` variables; ``prefect_api_url`` None lets it
    start its own embedded Prefect server. :meth:`start` returns when the deployment is
    registered and the web app answers.
    """

    ae_title = "RADTRIAGE"

    def __init__(
        self,
        folder: Path,
        *,
        prefect_api_url: str | None,
        env: dict[str, str] | None = None,
        user: tuple[str, str] = ("alice", "correct horse battery"),
    ) -> None:
        super().__init__(folder=folder)
        self.dicom_port = free_port()
        self.web_port = free_port()
        self.user = user
        self.env.update(
            RADTRIAGE_CONFIG=str(REPO / "config" / "default.toml"),
            RADTRIAGE_STORAGE__DATA_DIR=str(self.folder / "data"),
            RADTRIAGE_DICOM__BIND="127.0.0.1",
            RADTRIAGE_DICOM__PORT=str(self.dicom_port),
            RADTRIAGE_WEB__BIND="127.0.0.1",
            RADTRIAGE_WEB__PORT=str(self.web_port),
            RADTRIAGE_TRIAGE__STABLE_AGE_SECONDS="1",
            RADTRIAGE_TRIAGE__SWEEP_INTERVAL_SECONDS="0.2",
            RADTRIAGE_MODELS__DIR=str(REPO / "models"),
        )
        if prefect_api_url:
            self.env["PREFECT_API_URL"] = prefect_api_url
        else:  # radtriage serve starts its embedded Prefect server, as `make run` does
            self.env.pop("PREFECT_API_URL", None)
            self.env["RADTRIAGE_TRIAGE__EMBEDDED_PREFECT_PORT"] = "0"
        self.env.update(env or {})

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def index_url(self) -> str:
        """This installation's index: the one its environment names, else SQLite in its
        data folder (what the server itself works out)."""
        return self.env.get("RADTRIAGE_INDEX__URL") or f"sqlite:///{(self.data_dir / 'index.sqlite').resolve()}"

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a ``radtriage`` command against this installation."""
        return subprocess.run(
            [*RADTRIAGE, *args],
            env=self.env,
            cwd=REPO,
            input=stdin,
            text=True,
            capture_output=True,
            timeout=120,
            check=False,
        )

    def start(self, timeout: float = 120.0) -> RadtriageServer:
        added = self.cli(
            "user", "add", self.user[0], "--role", "radiologist", "--password-stdin", stdin=self.user[1] + "\n"
        )
        assert added.returncode == 0, added.stderr
        self.launch()
        self.port = self.dicom_port
        deadline = time.monotonic() + timeout
        self.wait_log("triage-study/triage-study", timeout)
        while not self._healthy():
            if time.monotonic() > deadline:
                raise RuntimeError(f"radtriage serve did not come up in {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.3)
        return self

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str) -> Any:
        """GET a JSON API path with HTTP Basic as the test user."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.web_port}{path}")
        token = base64.b64encode(f"{self.user[0]}:{self.user[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def worklist(self) -> list[dict[str, Any]]:
        return list(self.api("/api/worklist")["studies"])

    def wait_for(self, predicate, timeout: float = 240.0, what: str = "condition") -> list[dict[str, Any]]:
        """Poll the worklist until ``predicate(worklist)`` holds; return that worklist."""
        deadline = time.monotonic() + timeout
        studies: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            studies = self.worklist()
            if predicate(studies):
                return studies
            time.sleep(0.5)
        raise AssertionError(
            f"timed out waiting for {what}; worklist: {json.dumps(studies, indent=1)[:3000]}\n"
            f"serve log:\n{self.log_tail()}"
        )

    def __enter__(self) -> RadtriageServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerProcess(ServeProcess):
    """``radtriage worker`` as a real child process: a worker "host" of its own.

    It runs in ``folder`` (its working folder, log and ``PREFECT_HOME``) with the
    environment ``env`` (the shared index URL, archive folder and Prefect API);
    :meth:`start` returns once it polls the work pool under ``name``.
    """

    subcommand = "worker"

    def __init__(self, folder: Path, name: str, env: dict[str, str]) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(folder=folder, cwd=folder, env={**os.environ, "TCP_NODELAY": "1", **env})
        self.name = name
        self.env.update(
            RADTRIAGE_TRIAGE__WORKER_NAME=name,
            PREFECT_HOME=str(folder / "prefect"),
            # One inference limit per host: workers on one machine would otherwise share it.
            RADTRIAGE_INFERENCE_LIMIT=f"radtriage-inference-{name}",
        )

    def start(self, timeout: float = 120.0) -> WorkerProcess:
        self.launch()
        return self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 120.0) -> WorkerProcess:
        """Wait until the launched worker polls the work pool."""
        self.wait_log(rf"triage worker {re.escape(self.name)} polling", timeout)
        return self
