"""The web app as a service component: uvicorn in a thread, started by ``radtriage serve``."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.web.context import ArchiveFiles
from pipeline.web.protocol import ConnectionLimits

log = logging.getLogger(__name__)


class WebServer:
    """Serves :func:`pipeline.web.app.create_app` on ``[web] bind``:``port``.

    Parameters
    ----------
    settings, session_factory, archive
        As for :func:`~pipeline.web.app.create_app`.
    host, port
        Override ``[web] bind`` and ``port``; port 0 picks a free one (see :attr:`port`).
    """

    name = "web app"

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        archive: ArchiveFiles,
        *,
        host: str | None = None,
        port: int | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.archive = archive
        self.host = host if host is not None else settings.web.bind
        self._port = port if port is not None else settings.web.port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.app: Any = None  # the FastAPI application, once started
        self.limits: ConnectionLimits | None = None  # the connection bounds and counters, once started

    @property
    def port(self) -> int:
        """The port listened on (the real one once started, also when 0 was asked)."""
        if self._socket is not None:
            return int(self._socket.getsockname()[1])
        return self._port

    @property
    def tls(self) -> bool:
        """True when the web app serves HTTPS itself (``[web] tls_cert_file``)."""
        return self.settings.web.tls_cert_file is not None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("::1" if self.host == "::" else self.host)
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def _tls(self) -> dict[str, Any]:
        web = self.settings.web
        if web.tls_cert_file is None and web.tls_key_file is None:
            return {}
        if web.tls_cert_file is None or web.tls_key_file is None:
            raise ConfigError("set both [web] tls_cert_file and tls_key_file, or neither")
        for path in (web.tls_cert_file, web.tls_key_file):
            if not Path(path).is_file():
                raise ConfigError(f"[web] TLS file {path} does not exist; give a PEM file or remove the setting")
        return {"ssl_certfile": str(web.tls_cert_file), "ssl_keyfile": str(web.tls_key_file)}

    def start(self, timeout: float = 30.0) -> None:
        """Listen, then serve in a background thread; return once requests are answered.

        Raises
        ------
        ConfigError
            When the address cannot be bound (port in use, or not allowed).
        """
        from pipeline.web.app import create_app

        self._tls()  # a TLS setting that cannot work fails before anything listens
        app = create_app(self.settings, self.session_factory, self.archive)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._port))
            sock.listen(1024)
        except OSError as err:
            sock.close()
            raise ConfigError(
                f"web server could not listen on {self.host}:{self._port} ({err.strerror}); "
                "set [web] bind/port (or RADTRIAGE_WEB__PORT) to a free address"
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket = sock
        web = self.settings.web
        self.limits = ConnectionLimits(
            header_timeout=web.request_header_timeout_seconds,
            body_timeout=web.request_body_timeout_seconds,
            max_connections=web.max_connections,
            max_per_client=web.max_connections_per_client,
            max_header_bytes=web.max_header_bytes,
            uncapped=web.trusted_proxies,
        )
        config = uvicorn.Config(
            app,
            http=self.limits.protocol(),
            h11_max_incomplete_event_size=web.max_header_bytes,
            # X-Forwarded-For only from the configured proxies (uvicorn's default trusts any local peer).
            proxy_headers=bool(web.trusted_proxies),
            forwarded_allow_ips=list(web.trusted_proxies),
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
            server_header=False,
            lifespan="off",
            **self._tls(),
        )
        try:
            config.load()
        except (OSError, ssl.SSLError) as err:
            self.stop()
            raise ConfigError(
                f"web server cannot use [web] tls_cert_file/tls_key_file ({err}); "
                "give a PEM certificate and its unencrypted private key"
            ) from None
        self.app = app
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="radtriage-web", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"web server on {self.host}:{self.port} did not start; see the log above")
            time.sleep(0.02)
        log.info("worklist at %s", self.url)
        from pipeline.index.db import session_scope
        from pipeline.web.auth import users_exist

        with session_scope(self.session_factory, readonly=True) as session:
            if not users_exist(session):
                log.warning("no web users yet: create one with `radtriage user add NAME --role admin`")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and wait for the thread (open requests get a few seconds)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("web server thread did not stop within %.0f s", timeout)
        self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> WebServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
