"""An embedded Prefect API server for one-machine installs.

``radtriage serve`` starts one when ``PREFECT_API_URL`` is not set, so that a fresh
machine needs nothing but ``make run``. It runs ``prefect server start`` as a child
process (SQLite under ``<data_dir>/prefect``); this module does not import Prefect.

The server listens on 127.0.0.1 only, and its API requires credentials: Prefect's API
auth string (HTTP Basic ``radtriage:<secret>``), generated once and kept in
``<data_dir>/prefect/api-auth`` (0600). Without it any local process could create flow
runs, read their parameters (study UIDs) and the server's settings. Only ``/health``
answers without it.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.errors import RadtriageError

log = logging.getLogger(__name__)


AUTH_FILE = "api-auth"
AUTH_USER = "radtriage"


def load_auth_string(home: Path) -> str:
    """The embedded server's ``user:secret``, generated on first use (file mode 0600)."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = home / AUTH_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{AUTH_USER}:{secrets.token_urlsafe(32)}\n")
    return path.read_text().strip()


def _child_setup() -> None:
    """In the child: private files, and SIGTERM when the parent dies (even ``kill -9``)."""
    os.umask(0o077)  # prefect.db and its logs: radtriage's user alone
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def api_is_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True when the Prefect API at ``api_url`` answers its health check."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


class LocalPrefectServer:
    """A Prefect API server in a child process, bound to 127.0.0.1.

    Parameters
    ----------
    home
        ``PREFECT_HOME`` for the server: its SQLite database and logs live here.
    port
        TCP port; a free one when omitted.
    ui
        Serve the Prefect UI too (useful for ``make run``, not for tests).
    auth_string
        ``user:secret`` the API requires (HTTP Basic); ``None`` leaves it open (only for
        a throwaway server that nothing else can reach).
    task_history
        Record task runs (Prefect's task-run recorder service). On this server's SQLite
        database its batched writes hold the write lock long enough to stall the next
        API call by ~2 s (measured: a concurrency-slot request right after a flow run
        starts), which is most of a study's orchestration time. Flow runs, their states
        and logs are recorded either way.
    """

    def __init__(
        self,
        home: Path,
        port: int | None = None,
        *,
        ui: bool = True,
        task_history: bool = True,
        auth_string: str | None = None,
    ) -> None:
        self.home = Path(home)
        self.port = port or free_port()
        self.ui = ui
        self.task_history = task_history
        self.auth_string = auth_string
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def environment(self) -> dict[str, str]:
        """The server process's environment: ours, with its home, port and services set."""
        env = dict(os.environ)
        env.pop("PREFECT_API_URL", None)
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="true" if self.ui else "false",
            PREFECT_SERVER_API_HOST="127.0.0.1",
            PREFECT_SERVER_API_PORT=str(self.port),
            PREFECT_LOGGING_LEVEL="WARNING",
            PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED="true" if self.task_history else "false",
        )
        env.pop("PREFECT_SERVER_API_AUTH_STRING", None)
        if self.auth_string:
            env["PREFECT_SERVER_API_AUTH_STRING"] = self.auth_string
        return env

    def start(self, timeout: float = 90.0) -> str:
        """Start the server and wait until its API is healthy; return the API URL."""
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or shutil.which("prefect")
        if prefect is None:
            raise RadtriageError("the `prefect` command is not installed: run `make run` to set up .venv")
        env = self.environment()
        log_file = open(self.home / "server.log", "ab")  # noqa: SIM115 - kept open for the child
        self._process = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            # A server orphaned by a crashed radtriage would hold the port on the next start.
            preexec_fn=_child_setup if sys.platform.startswith("linux") else None,
        )
        log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RadtriageError(
                    f"the embedded Prefect server exited with code {self._process.returncode}; "
                    f"see {self.home / 'server.log'}"
                )
            if api_is_healthy(self.api_url, timeout=1.0):
                log.info("embedded Prefect server ready at %s", self.api_url)
                return self.api_url
            time.sleep(0.3)
        self.stop()
        raise RadtriageError(
            f"the embedded Prefect server did not start within {timeout:.0f} s; see {self.home / 'server.log'}"
        )

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``)."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> "LocalPrefectServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
