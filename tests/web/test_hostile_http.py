"""The web app against a hostile network (issue 15): every attack over loopback on a real WebServer.

Clients bind their own source address in 127.0.0.0/8 (all of it is loopback on Linux), so
one test's "attacker" does not share an address, a lockout or a connection cap with
another's "real user".
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import selectors
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pipeline.archive import Archive
from pipeline.config import Settings
from pipeline.index.db import migrate, session_scope
from pipeline.index.triage import AIStatus
from pipeline.web import WebServer
from pipeline.web.auth import Authenticator, LockedOut, create_user

from .seed import Seeded, seed_study

pytestmark = pytest.mark.slow  # web servers

PASSWORD = "correct horse battery"
MAX_FAILURES = 3
HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5
PER_CLIENT = 40
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Hostile:
    settings: Settings
    archive: Archive
    server: WebServer
    study: Seeded
    folder: Path

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def authenticator(self) -> Authenticator:
        return self.server.app.state.ctx.authenticator  # type: ignore[no-any-return]

    def client(self, source: str = "127.0.0.1", **kwargs: object) -> httpx.Client:
        """An HTTP client whose connections come from ``source``."""
        transport = httpx.HTTPTransport(local_address=source)
        return httpx.Client(base_url=self.url, transport=transport, timeout=10, **kwargs)  # type: ignore[arg-type]

    def audit(self, **params: str) -> list[dict[str, object]]:
        with self.client("127.0.0.1", auth=("root", PASSWORD)) as admin:
            response = admin.get("/api/audit", params=params)
            assert response.status_code == 200, response.text
            return response.json()["events"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    folder = tmp_path_factory.mktemp("hostile")
    settings = Settings(
        storage={"data_dir": folder / "data"},
        web={
            "bind": "127.0.0.1",
            "port": 0,
            "login_max_failures": MAX_FAILURES,
            "login_lockout_seconds": 120,
            "request_header_timeout_seconds": HEADER_TIMEOUT,
            "request_body_timeout_seconds": BODY_TIMEOUT,
            "max_connections_per_client": PER_CLIENT,
            "max_connections": 2000,
        },
    )
    migrate(settings.index_url)
    archive = Archive(settings)
    with session_scope(archive.session_factory) as session:
        for name in ("erin", "frank", "poller", "gina"):
            create_user(session, name, PASSWORD, "radiologist")
        create_user(session, "root", PASSWORD, "admin")
    study = seed_study(
        archive, folder, seed=31, name="Quispe^Zyxwvut", accession="ACC3101", bleed=True, ai_status=AIStatus.done,
        minutes_ago=5,
    )  # fmt: skip
    server = WebServer(settings, archive.session_factory, archive)
    server.start()
    try:
        yield Hostile(settings, archive, server, study, folder)
    finally:
        server.stop()
        archive.engine.dispose()


def _connect(hostile: Hostile, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", hostile.server.port))
    return sock


def _wait_closed(socks: list[socket.socket], deadline: float) -> dict[socket.socket, bytes]:
    """Read every socket until the server closes it or ``deadline``; what each received."""
    got = {s: b"" for s in socks}
    selector = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        selector.register(s, selectors.EVENT_READ)
    open_ = set(socks)
    while open_ and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.2):
            sock = key.fileobj
            try:
                data = sock.recv(4096)  # type: ignore[union-attr]
            except (ConnectionResetError, BlockingIOError):
                data = b""
            if data:
                got[sock] += data  # type: ignore[index]
            else:
                selector.unregister(sock)
                open_.discard(sock)  # type: ignore[arg-type]
    selector.close()
    assert not open_, f"{len(open_)} of {len(socks)} stalled connections still open"
    return got


# Row 5: partial requests are closed within the timeouts; others are served meanwhile.


def test_stalled_requests_are_closed_in_time_and_others_served(hostile: Hostile) -> None:
    stalled: list[socket.socket] = []
    bodies: list[socket.socket] = []
    try:
        for i in range(5):  # 5 addresses x 36 connections, under the per-address cap
            for _ in range(PER_CLIENT - 4):
                sock = _connect(hostile, f"127.0.1.{i + 1}")
                sock.sendall(b"GET /worklist HTTP/1.1\r\nHost: radtriage\r\nUser-Agent: slow")
                stalled.append(sock)
        for _ in range(20):  # headers complete, body never finished
            sock = _connect(hostile, "127.0.1.9")
            sock.sendall(
                b"POST /login HTTP/1.1\r\nHost: radtriage\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: 200\r\n\r\nusername=erin&pass"
            )
            bodies.append(sock)
        flood_at = time.monotonic()
        with hostile.client("127.0.0.1") as client:  # a normal client during the flood
            assert client.get("/health").status_code == 200
            assert client.get("/login").status_code == 200
        got = _wait_closed(stalled + bodies, flood_at + max(HEADER_TIMEOUT, BODY_TIMEOUT) + 10)
        closed_after = time.monotonic() - flood_at
        assert all(got[s].startswith(b"HTTP/1.1 408") for s in stalled), "a stalled request was not told 408"
        assert closed_after < max(HEADER_TIMEOUT, BODY_TIMEOUT) + 10
        with hostile.client("127.0.0.1") as client:
            assert client.get("/health").status_code == 200
    finally:
        for sock in stalled + bodies:
            sock.close()


def test_a_slow_request_on_a_kept_alive_connection_is_closed(hostile: Hostile) -> None:
    sock = _connect(hostile, "127.0.1.20")
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: radtriage\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        # The next request trickles in a byte every 0.3 s: each byte within uvicorn's keep-alive.
        started, answer = time.monotonic(), b""
        for byte in b"GET /health HTTP/1.1\r\nHost: radtriage\r\nUser-Agent: slower-and-slower\r\n":
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            if _readable(sock, 0.3):
                answer = sock.recv(4096)
                break
        took = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408") or answer == b"", answer
        assert took < HEADER_TIMEOUT + 3, f"a request sent a byte at a time held the connection {took:.1f} s"
    finally:
        sock.close()


def _read_response(sock: socket.socket) -> bytes:
    """One whole response (headers and a Content-Length body), however it is split into segments."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed mid-body: {data!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def _readable(sock: socket.socket, seconds: float) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        return bool(selector.select(timeout=seconds))


def test_connections_per_address_are_capped(hostile: Hostile) -> None:
    held = [_connect(hostile, "127.0.1.30") for _ in range(PER_CLIENT)]
    try:
        extra = [_connect(hostile, "127.0.1.30") for _ in range(5)]
        got = _wait_closed(extra, time.monotonic() + 5)  # refused at once, not after a timeout
        assert all(g.startswith(b"HTTP/1.1 503") for g in got.values())
        with hostile.client("127.0.0.1") as client:  # another address is not affected
            assert client.get("/health").status_code == 200
    finally:
        for sock in held:
            sock.close()


def test_at_the_total_cap_a_new_client_displaces_a_stalled_one(hostile: Hostile) -> None:
    web = hostile.settings.web.model_copy(update={"max_connections": 30, "request_header_timeout_seconds": 60.0})
    settings = hostile.settings.model_copy(update={"web": web})
    with WebServer(settings, hostile.archive.session_factory, hostile.archive) as small:
        stalled = []
        try:
            for i in range(30):  # the whole cap, from 3 addresses, each far from its own cap
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind((f"127.0.1.{50 + i % 3}", 0))
                sock.connect(("127.0.0.1", small.port))
                sock.sendall(b"GET /worklist HTTP/1.1\r\nHost: radtriage\r\n")
                stalled.append(sock)
            time.sleep(0.3)
            transport = httpx.HTTPTransport(local_address="127.0.0.1")
            with httpx.Client(base_url=small.url, transport=transport, timeout=5) as client:
                for _ in range(3):  # long before the 60 s header timeout
                    assert client.get("/health").status_code == 200
            assert small.limits is not None and small.limits.evicted >= 1
            assert small.limits.open <= 30
            got = _wait_closed(stalled[:1], time.monotonic() + 5)  # the longest waiting went first
            assert got[stalled[0]].startswith(b"HTTP/1.1 503")
        finally:
            for sock in stalled:
                sock.close()


def test_oversized_headers_are_refused(hostile: Hostile) -> None:
    sock = _connect(hostile, "127.0.1.40")
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: radtriage\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        got = _wait_closed([sock], time.monotonic() + 5)
        assert got[sock].startswith(b"HTTP/1.1 431")
    finally:
        sock.close()


# Row 8: failures slow the attacker without locking the real user out; X-Forwarded-For.


def test_attacker_failures_do_not_lock_the_real_user_out(hostile: Hostile) -> None:
    with hostile.client("127.0.2.1", follow_redirects=False) as attacker:
        for _ in range(MAX_FAILURES):
            assert attacker.post("/login", data={"username": "erin", "password": "guess-guess"}).status_code == 401
        answers = [
            attacker.post("/login", data={"username": f"user{i}", "password": "guess-guess"}).status_code
            for i in range(20)
        ]
        assert answers.count(429) >= 20 - MAX_FAILURES * 4, answers  # the address is refused after 4x the limit
        # The attacker's address stays refused, even with erin's right password.
        assert attacker.post("/login", data={"username": "erin", "password": PASSWORD}).status_code == 429
        assert attacker.get("/api/worklist", auth=("erin", PASSWORD)).status_code == 429
    with hostile.client("127.0.2.2", follow_redirects=False) as erin:
        ok = erin.post("/login", data={"username": "erin", "password": PASSWORD})
        assert ok.status_code == 303 and "radtriage_session" in ok.cookies
        assert erin.get("/api/worklist", auth=("erin", PASSWORD)).status_code == 200


def test_lockout_doubles_with_each_further_failure(hostile: Hostile) -> None:
    auth = Authenticator(max_failures=2, lockout_seconds=0.4)
    factory = hostile.archive.session_factory
    for _ in range(2):
        with session_scope(factory) as session:
            assert auth.verify(session, "gina", "nope-nope", "10.7.7.7") is None
    with pytest.raises(LockedOut) as first, session_scope(factory) as session:
        auth.verify(session, "gina", PASSWORD, "10.7.7.7")
    assert 0 < first.value.retry_after <= 0.4
    time.sleep(first.value.retry_after + 0.05)
    with session_scope(factory) as session:
        assert auth.verify(session, "gina", "still-wrong", "10.7.7.7") is None
    with pytest.raises(LockedOut) as second, session_scope(factory) as session:
        auth.verify(session, "gina", PASSWORD, "10.7.7.7")
    assert 0.4 < second.value.retry_after <= 0.8
    with session_scope(factory) as session:  # another address: not refused
        assert auth.verify(session, "gina", PASSWORD, "10.7.7.8") is not None


def test_forwarded_for_is_believed_only_from_trusted_proxies(hostile: Hostile) -> None:
    with hostile.client("127.0.2.10", follow_redirects=False) as client:
        for i in range(MAX_FAILURES):
            spoofed = {"X-Forwarded-For": f"203.0.113.{i + 1}"}
            wrong = client.post("/login", data={"username": "xff-probe", "password": "wrong-one"}, headers=spoofed)
            assert wrong.status_code == 401
        # A new spoofed address each time does not escape the lockout of the real one.
        again = client.post(
            "/login", data={"username": "xff-probe", "password": "x" * 9}, headers={"X-Forwarded-For": "198.51.100.9"}
        )
        assert again.status_code == 429
    addresses = {e["remote_addr"] for e in hostile.audit(username="xff-probe")}
    assert addresses == {"127.0.2.10"}
    # Configured as a trusted proxy, the same peer's header is what is recorded.
    trusted = hostile.settings.model_copy(
        update={"web": hostile.settings.web.model_copy(update={"trusted_proxies": ["127.0.2.0/24"]})}
    )
    with WebServer(trusted, hostile.archive.session_factory, hostile.archive) as proxied:
        transport = httpx.HTTPTransport(local_address="127.0.2.11")
        with httpx.Client(base_url=proxied.url, transport=transport) as proxy:
            sent = proxy.post(
                "/login",
                data={"username": "xff-trusted", "password": "wrong-one"},
                headers={"X-Forwarded-For": "192.0.2.44"},
            )
            assert sent.status_code == 401
    assert {e["remote_addr"] for e in hostile.audit(username="xff-trusted")} == {"192.0.2.44"}


def test_login_form_needs_its_token_from_a_browser(hostile: Hostile) -> None:
    origin = {"Origin": hostile.url}
    with hostile.client("127.0.2.20", follow_redirects=False) as browser:
        forged = browser.post("/login", data={"username": "erin", "password": PASSWORD}, headers=origin)
        assert forged.status_code == 403 and "radtriage_session" not in forged.cookies
        page = browser.get("/login")
        token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text)
        assert token is not None
        data = {"username": "erin", "password": PASSWORD, "csrf_token": token.group(1)}
        ok = browser.post("/login", data=data, headers=origin)
        assert ok.status_code == 303 and "radtriage_session" in ok.cookies
    with hostile.client("127.0.2.21", follow_redirects=False) as other:  # the token is bound to its cookie
        assert other.post("/login", data=data, headers=origin).status_code == 403


# Row 9: HTTP Basic polling costs one argon2 hash, not one per request.


def test_basic_polling_hashes_once(hostile: Hostile) -> None:
    auth = hostile.authenticator
    before = auth.hash_verifications
    with hostile.client("127.0.3.1", auth=("poller", PASSWORD)) as client:
        for _ in range(50):
            assert client.get("/api/worklist").status_code == 200
    assert auth.hash_verifications - before == 1
    # A wrong password is never a cache hit.
    with hostile.client("127.0.3.1", auth=("poller", "not-the-password")) as wrong:
        assert wrong.get("/api/worklist").status_code == 401
    assert auth.hash_verifications - before == 2


# Row 10: a new password ends the sessions (and the Basic cache) of the old one.


def test_password_change_ends_old_sessions(hostile: Hostile, tmp_path: Path) -> None:
    with hostile.client("127.0.4.1", follow_redirects=False) as browser:
        assert browser.post("/login", data={"username": "frank", "password": PASSWORD}).status_code == 303
        assert browser.get("/worklist").status_code == 200
        with hostile.client("127.0.4.1", auth=("frank", PASSWORD)) as script:
            assert script.get("/api/worklist").status_code == 200  # now cached
        config = tmp_path / "radtriage.toml"
        config.write_text("")
        env = {**os.environ, "RADTRIAGE_STORAGE__DATA_DIR": str(hostile.settings.storage.data_dir)}
        env["RADTRIAGE_INDEX__URL"] = hostile.settings.index_url  # the module's installation
        env.pop("RADTRIAGE_CONFIG", None)
        changed = subprocess.run(
            [sys.executable, "-m", "pipeline", "--config", str(config), "user", "add", "frank", "--password-stdin"],
            input="a-brand-new-password\n",
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=120,
        )
        assert changed.returncode == 0, changed.stderr
        page = browser.get("/worklist")
        assert page.status_code == 303 and page.headers["location"].startswith("/login")
        assert browser.get("/api/worklist").status_code == 401
    with hostile.client("127.0.4.1", auth=("frank", PASSWORD)) as script:
        assert script.get("/api/worklist").status_code == 401  # the cached old password is dead too
    with hostile.client("127.0.4.2", auth=("frank", "a-brand-new-password")) as script:
        assert script.get("/api/worklist").status_code == 200


# Row 11: input faults are 4xx, audited; server errors are audited; no patient data in the log.


def _server_log(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> str:
    """What the server logged (records and stderr), less the test client's own request lines."""
    records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    text = "\n".join(logging.Formatter("%(name)s %(message)s").format(r) for r in records)
    return text + "\n" + "".join(capfd.readouterr())


def test_bad_input_is_4xx_audited_and_not_logged(
    hostile: Hostile, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    study = hostile.study
    words = " ".join(["Zyxwvut"] + [f"w{i}" for i in range(999)])
    with hostile.client("127.0.5.1", auth=("erin", PASSWORD)) as client:
        long = client.get("/api/worklist", params={"q": words})
        nine = client.get("/api/worklist", params={"q": "a b c d e f g h i"})
        assert client.get("/api/worklist", params={"q": "zyxwvut acc3101"}).json()["count"] == 1
    with hostile.client("127.0.5.1", follow_redirects=False) as browser:  # pages: a session
        assert browser.post("/login", data={"username": "erin", "password": PASSWORD}).status_code == 303
        page = browser.get("/worklist", params={"q": words})
        rows = browser.get("/worklist/rows", params={"q": words})
        sr = browser.get(f"/studies/{study.StudyInstanceUID}/image/{study.sr_uid}.png")
        seg = browser.get(f"/studies/{study.StudyInstanceUID}/image/{study.seg_uid}.png")
        ct = browser.get(f"/studies/{study.StudyInstanceUID}/image/{study.sop_uids[1]}.png")
    assert sr.status_code == 415 and "not an image" in sr.text
    assert seg.status_code == 415 and ct.status_code == 200
    assert long.status_code == 400 and "at most 8 words" in long.json()["detail"]
    assert nine.status_code == 400
    assert page.status_code == 400 and "at most 8 words" in page.text
    assert rows.status_code == 400
    events = hostile.audit(username="erin")
    statuses = {(e["path"].partition("?")[0], e["status_code"]) for e in events}  # type: ignore[union-attr]
    assert (f"/studies/{study.StudyInstanceUID}/image/{study.sr_uid}.png", 415) in statuses
    assert ("/api/worklist", 400) in statuses and ("/worklist", 400) in statuses
    logged = _server_log(caplog, capfd)
    assert "Zyxwvut" not in logged and "w998" not in logged
    assert "Traceback" not in logged


def test_server_errors_are_audited_with_a_request_id_and_no_data(
    hostile: Hostile, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    study = hostile.study
    lost = study.sop_uids[0]
    hostile.archive.path_of(lost).unlink()  # the index names a file the archive lost
    with hostile.client("127.0.5.2", follow_redirects=False) as client:
        assert client.post("/login", data={"username": "erin", "password": PASSWORD}).status_code == 303
        response = client.get(f"/studies/{study.StudyInstanceUID}/objects/{lost}.dcm")
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    assert request_id in response.text
    [event] = [e for e in hostile.audit(username="erin") if e["status_code"] == 500]
    assert event["action"] == "server error"
    logged = _server_log(caplog, capfd)
    assert request_id in logged and "FileNotFoundError" in logged
    assert lost not in logged and "Quispe" not in logged  # no message, no path, no names


# Headers, cookies and HTTPS.


def test_security_headers_over_http(hostile: Hostile) -> None:
    with hostile.client("127.0.6.1") as client:
        login = client.get("/login")
        static = client.get("/static/worklist.js")
    for response in (login, static):
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "same-origin"
        assert "strict-transport-security" not in response.headers
    assert "secure" not in login.headers["set-cookie"].lower()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "radtriage test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "web.crt", folder / "web.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_https_sends_hsts_and_secure_cookies(hostile: Hostile, tmp_path: Path) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    web = hostile.settings.web.model_copy(update={"tls_cert_file": cert_file, "tls_key_file": key_file})
    settings = hostile.settings.model_copy(update={"web": web})
    with WebServer(settings, hostile.archive.session_factory, hostile.archive) as server:
        assert server.url.startswith("https://")
        trust = ssl.create_default_context(cafile=str(cert_file))
        with httpx.Client(base_url=server.url, verify=trust, follow_redirects=False) as client:
            page = client.get("/login")
            assert page.headers["strict-transport-security"].startswith("max-age=")
            assert "secure" in page.headers["set-cookie"].lower()
            login = client.post("/login", data={"username": "erin", "password": PASSWORD})
            assert login.status_code == 303
            session_cookie = [c for c in login.headers.get_list("set-cookie") if c.startswith("radtriage_session=")]
            assert session_cookie and "secure" in session_cookie[0].lower()
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(server.url.replace("https://", "http://") + "/health", timeout=5).raise_for_status()
