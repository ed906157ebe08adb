"""A real Orthanc (Debian's ``Orthanc`` binary) as a DICOM peer for tests.

The peer gets its own folder (config, storage, log), free DICOM and HTTP ports, and
``TCP_NODELAY=1`` in its environment. Its DICOM server accepts C-STORE from any calling
AE (``DicomAlwaysAllowStore``) and any SOP class; its REST API needs no login. Orthanc
1.10 binds both servers to every interface, so tests must only send it traffic on
127.0.0.1 (``RemoteAccessAllowed`` is off: REST answers loopback only).

Example
-------
>>> with OrthancPeer(tmp_path) as orthanc:              # doctest: +SKIP
...     send_to("127.0.0.1", orthanc.dicom_port, orthanc.ae_title)
...     orthanc.wait_for_instances(1)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from pipeline.triage.prefect_server import free_port

ORTHANC_BINARY = "Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian's orthanc-dicomweb
LOOPBACK = "127.0.0.1"
ALL_INTERFACES = ""  # Orthanc binds 0.0.0.0: its ports must be free on every interface


class OrthancError(RuntimeError):
    """Orthanc did not start, or its REST API answered with an error."""


class OrthancPeer:
    """One Orthanc process on loopback, restartable on the same ports.

    Parameters
    ----------
    workdir
        A folder of its own (config, storage and log go there); created if missing.
    ae_title
        Orthanc's own AE title (``DicomAet``).
    modalities
        Known remote AEs as ``{name: (ae_title, host, port)}`` (``DicomModalities``),
        for tests that make Orthanc C-STORE or C-MOVE back. Not needed to store *to* it.
    lua
        Lua script text to load (``LuaScripts``), e.g. a ``ReceivedInstanceFilter`` that
        makes Orthanc refuse some C-STOREs with a failure status.
    extra
        More configuration keys, added last (they override the ones above), e.g.
        ``{"Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Servers": {...}}}``.
    startup_timeout
        Seconds to wait for the REST API to answer after the process starts.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        ae_title: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        lua: str = "",
        extra: dict[str, Any] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        if shutil.which(ORTHANC_BINARY) is None:
            raise OrthancError("the Orthanc binary is not on PATH: install the Debian package 'orthanc' (make apt)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.dicom_port = free_port(ALL_INTERFACES)
        self.http_port = free_port(ALL_INTERFACES)
        self.host = LOOPBACK
        self.modalities = dict(modalities or {})
        self.lua = lua
        self.extra = dict(extra or {})
        self.startup_timeout = startup_timeout
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def rest_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def config(self) -> dict[str, Any]:
        """The Orthanc configuration this peer runs with."""
        storage = str(self.workdir / "storage")
        return {
            "Name": f"radtriage-test-{self.ae_title}",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpCompressionEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "DicomScpTimeout": 30,
            "DicomModalities": {name: list(spec) for name, spec in self.modalities.items()},
            "LuaScripts": [str(self.workdir / "script.lua")] if self.lua else [],
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            **self.extra,
        }

    def start(self) -> None:
        """Start Orthanc (same ports as before on a restart) and wait until REST answers."""
        if self.running:
            return
        if self.lua:
            (self.workdir / "script.lua").write_text(self.lua)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        env = dict(os.environ, TCP_NODELAY="1")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [ORTHANC_BINARY, "--logfile=" + str(self.log_path), str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with {self._process.returncode} at start; see {self.log_path}:\n{self._log_tail()}"
                )
            if self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise OrthancError(
            f"Orthanc did not answer on {self.rest_url} within {self.startup_timeout} s; see {self.log_path}"
        )

    def stop(self, timeout: float = 15.0, *, graceful: bool = True) -> None:
        """Stop Orthanc; its storage is kept.

        ``graceful`` sends SIGTERM (Orthanc takes about 3 s to shut down) and SIGKILL
        after ``timeout``; ``graceful=False`` kills it at once, like a crashed node.
        """
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        if graceful:
            process.terminate()
        else:
            process.kill()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> OrthancPeer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- REST -------------------------------------------------------------------

    def get(self, path: str) -> Any:
        """GET ``path`` from the REST API and decode its JSON."""
        try:
            with urllib.request.urlopen(self.rest_url + path, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise OrthancError(f"GET {path}: HTTP {err.code}: {err.read()[:500]!r}") from err

    def get_bytes(self, path: str) -> bytes:
        """GET ``path`` from the REST API as bytes (e.g. ``/instances/{id}/file``)."""
        try:
            with urllib.request.urlopen(self.rest_url + path, timeout=10) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as err:
            raise OrthancError(f"GET {path}: HTTP {err.code}: {err.read()[:500]!r}") from err

    def post(self, path: str, body: Any, timeout: float = 90.0) -> Any:
        """POST ``body`` as JSON to ``path`` and decode the JSON answer (``None`` when empty)."""
        request = urllib.request.Request(
            self.rest_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as err:
            raise OrthancError(f"POST {path}: HTTP {err.code}: {err.read()[:500]!r}") from err
        return json.loads(text) if text.strip() else None

    def instances(self) -> list[dict[str, Any]]:
        """Every stored instance, with its main DICOM tags (``/instances?expand``)."""
        return list(self.get("/instances?expand"))

    def sop_instance_uids(self) -> set[str]:
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in self.instances()}

    def wait_for_instances(self, sop_instance_uids: set[str] | int, timeout: float = 20.0) -> set[str]:
        """Poll until these SOP instances (or this many) are stored; return what is stored.

        Raises
        ------
        AssertionError
            When they are not all there within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            stored = self.sop_instance_uids()
            done = (
                len(stored) >= sop_instance_uids if isinstance(sop_instance_uids, int) else sop_instance_uids <= stored
            )
            if done:
                return stored
            if time.monotonic() > deadline:
                raise AssertionError(f"Orthanc {self.ae_title} holds {sorted(stored)}, waited for {sop_instance_uids}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.rest_url + "/system", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
