"""``radtriage serve`` as a real child process, for end-to-end tests and benchmarks.

Configured entirely by ``RADTRIAGE_*`` variables over ``config/default.toml``: its own
data folder, free DICOM and web ports on 127.0.0.1, and the Prefect API the caller
gives (so a test session shares one Prefect server).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RADTRIAGE = [sys.executable, "-m", "pipeline"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RadtriageServer:
    """One radtriage installation in ``folder``, run as ``radtriage serve``.

    ``prefect_api_url`` None lets it start its own embedded Prefect server.
    """

    ae_title = "RADTRIAGE"

    def __init__(self, folder: Path, *, prefect_api_url: str | None, env: dict[str, str] | None = None,
                 user: tuple[str, str] = ("alice", "correct horse battery")) -> None:
        self.folder = Path(folder)
        self.dicom_port = free_port()
        self.web_port = free_port()
        self.user = user
        self.env = dict(os.environ)
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
            TCP_NODELAY="1",
        )
        if prefect_api_url:
            self.env["PREFECT_API_URL"] = prefect_api_url
        else:  # radtriage serve starts its embedded Prefect server, as `make run` does
            self.env.pop("PREFECT_API_URL", None)
            self.env["RADTRIAGE_TRIAGE__EMBEDDED_PREFECT_PORT"] = "0"
        self.env.update(env or {})
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def log_file(self) -> Path:
        return self.folder / "serve.log"

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a ``radtriage`` command against this installation."""
        return subprocess.run([*RADTRIAGE, *args], env=self.env, cwd=REPO, input=stdin, text=True,
                              capture_output=True, timeout=120, check=False)

    def start(self, timeout: float = 120.0) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        added = self.cli("user", "add", self.user[0], "--role", "radiologist", "--password-stdin", stdin=self.user[1] + "\n")
        assert added.returncode == 0, added.stderr
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen([*RADTRIAGE, "serve"], env=self.env, cwd=REPO, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"radtriage serve exited ({self.process.returncode}):\n{self.log_tail()}")
            if "triage-study/triage-study" in self.log_file.read_text(errors="replace") and self._healthy():
                return
            time.sleep(0.3)
        raise RuntimeError(f"radtriage serve did not come up in {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

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
        raise AssertionError(f"timed out waiting for {what}; worklist: {json.dumps(studies, indent=1)[:3000]}\n"
                             f"serve log:\n{self.log_tail()}")

    def __enter__(self) -> RadtriageServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
