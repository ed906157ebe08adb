"""OHIF under /viewer/: the pinned bundle fetched and verified, served behind the login, rewritten for its mount."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from pipeline.errors import PermanentError
from pipeline.web import WebServer
from pipeline.web.app import CONTENT_SECURITY_POLICY
from pipeline.web.viewer import (
    DIST_ENV,
    VIEWER_CSP,
    OhifPin,
    app_config_js,
    dist_dir,
    read_pin,
    rewrite_asset,
    rewrite_index,
)
from scripts.fetch_ohif import install, installed, unpack_dist

from .conftest import PASSWORD, WebEnv

# The shape of OHIF 3.13's dist/index.html, reduced: inline scripts, rooted links.
INDEX = (
    '<!doctype html><html lang="en"><head><meta name="msapplication-TileImage" content="/assets/mstile.png">'
    '<script>console.time("scriptToView"),window.PUBLIC_URL="/"</script>'
    '<link rel="manifest" href="/manifest.json"><link rel="icon" href="/assets/favicon.ico">'
    '<script rel="preload" as="script" src="/app-config.js"></script><title>OHIF Viewer</title>'
    '<script>function browserImportFunction(n){return import(n)}window.PUBLIC_URL="/"</script>'
    '<script defer src="/app.bundle.0f6159c501addfe9.js"></script><link href="/app.bundle.css" rel="stylesheet">'
    '<a href="//elsewhere.example/x">x</a></head><body><div id="root"></div></body></html>'
)
BUNDLE = (
    '(() => { __webpack_require__.p = "/"; })();\n'
    "const x = await window.browserImportFunction('/dicom-microscopy-viewer/dicomMicroscopyViewer.min.js');\n"
)
CSS = "@font-face{src:url(/a34f9d1faa5f3315.woff2) format('woff2')}.b{background:url(//cdn.example/x.png)}"


def _fake_dist(folder: Path) -> Path:
    """A dist/ laid out like OHIF's, small enough to write per test run."""
    dist = folder / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text(INDEX)
    (dist / "app.bundle.0f6159c501addfe9.js").write_text(BUNDLE)
    (dist / "app.bundle.css").write_text(CSS)
    (dist / "app-config.js").write_text("window.config = {dataSources: ['the bundled demo server']};")
    (dist / "0ddf166f7a343eda.wasm").write_bytes(b"\x00asm\x01\x00\x00\x00")
    (dist / "a34f9d1faa5f3315.woff2").write_bytes(b"wOF2")
    (dist / "assets" / "favicon.ico").write_bytes(b"\x00\x00\x01\x00")
    (dist / "manifest.json").write_text("{}")
    return dist


def _tarball(folder: Path, files: dict[str, bytes]) -> Path:
    path = folder / "ohif-app-0.0.0.tgz"
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _pin_for(tarball: Path) -> OhifPin:
    from scripts.fetch_ohif import _digests

    sha256, integrity = _digests(tarball)
    return OhifPin("@ohif/app", "0.0.0", "file:" + tarball.name, sha256, integrity)


def _config(js: str) -> dict[str, object]:
    match = re.search(r"window\.config = (\{.*?\n\});\n", js, re.DOTALL)
    assert match, js[:200]
    return json.loads(match.group(1))  # type: ignore[no-any-return]


# ---- fetch_ohif: checksums, only dist/, idempotent --------------------------------------------


def test_a_corrupt_tarball_is_refused_and_nothing_installed(tmp_path: Path) -> None:
    good = _tarball(tmp_path, {"package/dist/index.html": b"<html></html>", "package/package.json": b"{}"})
    pin = _pin_for(good)
    corrupt = tmp_path / "corrupt.tgz"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(PermanentError, match="SHA-256 .* refusing it"):
        install(pin, cache, tarball=corrupt)
    assert not (cache / "0.0.0" / "dist").exists() and not installed(pin, cache)
    # The right bytes install; a second run finds them and never reaches npm (tarball=None).
    assert install(pin, cache, tarball=good) is True
    assert (cache / "0.0.0" / "dist" / "index.html").read_bytes() == b"<html></html>"
    assert not (cache / "0.0.0" / "dist" / "package.json").exists()
    assert install(pin, cache) is False


def test_only_dist_is_unpacked_and_no_path_escapes(tmp_path: Path) -> None:
    ok = _tarball(tmp_path, {"package/dist/index.html": b"i", "package/dist/a/b.js": b"b", "package/README.md": b"r"})
    assert unpack_dist(ok, tmp_path / "ok") == 2
    assert sorted(p.name for p in (tmp_path / "ok").rglob("*") if p.is_file()) == ["b.js", "index.html"]
    bad = _tarball(tmp_path, {"package/dist/index.html": b"i", "package/dist/../../evil.js": b"e"})
    with pytest.raises(PermanentError, match="unsafe path"):
        unpack_dist(bad, tmp_path / "bad")
    assert not (tmp_path / "evil.js").exists()


def test_the_lock_file_pins_a_release() -> None:
    pin = read_pin()
    assert pin.package == "@ohif/app" and pin.version.startswith("3.")
    assert pin.tarball.endswith(f"/app-{pin.version}.tgz") and pin.integrity.startswith("sha512-")


# ---- the rewrite for the mount, and the generated config ---------------------------------------


def test_index_moves_under_the_mount_without_inline_scripts() -> None:
    page, boot = rewrite_index(INDEX)
    assert "<script>" not in page
    assert page.count('<script src="/viewer/radtriage-boot.js"></script>') == 1
    assert 'src="/viewer/app-config.js"' in page and 'src="/viewer/app.bundle.0f6159c501addfe9.js"' in page
    assert 'href="/viewer/manifest.json"' in page and 'content="/viewer/assets/mstile.png"' in page
    assert 'href="//elsewhere.example/x"' in page  # protocol-relative: not a local path, left alone
    assert re.findall(r'(?:href|src|content)="/(?!viewer/|/)', page) == []
    # The boot script runs where the first inline one was: before app-config.js and the bundle.
    assert page.index("radtriage-boot.js") < page.index("app-config.js") < page.index("app.bundle")
    assert 'window.PUBLIC_URL="/viewer/"' in boot and "function browserImportFunction(n)" in boot
    assert 'PUBLIC_URL="/"' not in boot


def test_bundles_and_styles_load_their_chunks_from_the_mount() -> None:
    js = rewrite_asset(BUNDLE, ".js")
    assert '__webpack_require__.p = "/viewer/"' in js
    assert "browserImportFunction('/viewer/dicom-microscopy-viewer/" in js
    css = rewrite_asset(CSS, ".css")
    assert "url(/viewer/a34f9d1faa5f3315.woff2)" in css and "url(//cdn.example/x.png)" in css


def test_app_config_reads_this_servers_dicomweb_and_nothing_dynamic() -> None:
    config = _config(app_config_js())
    assert config["routerBasename"] == "/viewer" and config["showStudyList"] is True
    assert config["dangerouslyUseDynamicConfig"] == {"enabled": False}
    assert config["investigationalUseDialog"] == {"option": "never"}
    assert "customizationUrlPrefixes" not in config  # OHIF refuses ?customization= without it
    (source,) = config["dataSources"]  # type: ignore[misc]
    assert config["defaultDataSourceName"] == source["sourceName"] == "dicomweb"
    dicomweb = source["configuration"]
    assert dicomweb["qidoRoot"] == dicomweb["wadoRoot"] == dicomweb["wadoUriRoot"] == "/dicom-web"
    for key in ("qidoSupportsIncludeField", "supportsFuzzyMatching", "enableStudyLazyLoad", "supportsWildcard"):
        assert dicomweb[key] is True, key
    assert dicomweb["omitQuotationForMultipartRequest"] is True and dicomweb["dicomUploadEnabled"] is False
    assert dicomweb["imageRendering"] == dicomweb["thumbnailRendering"] == "wadors"
    assert dicomweb["bulkDataURI"]["enabled"] is True
    assert "http" not in app_config_js()  # no remote server of any kind


# ---- served by the web app ---------------------------------------------------------------------


@contextmanager
def _logged_in(url: str, next_path: str = "/worklist") -> Iterator[httpx.Client]:
    """A client with alice's session cookie, logged in through the form with ``next``."""
    with httpx.Client(base_url=url, follow_redirects=False) as client:
        form = client.get("/login", params={"next": next_path})
        csrf = form.text.split('name="csrf_token" value="')[1].split('"')[0]
        data = {"username": "alice", "password": PASSWORD, "csrf_token": csrf, "next": next_path}
        login = client.post("/login", data=data)
        assert login.status_code == 303 and login.headers["location"] == next_path, login.text
        yield client


@pytest.fixture(scope="module")
def fake_viewer(web: WebEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A second server on the same archive, serving a small OHIF-shaped dist."""
    dist = _fake_dist(tmp_path_factory.mktemp("ohif"))
    before = os.environ.get(DIST_ENV)
    os.environ[DIST_ENV] = str(dist)
    server = WebServer(web.settings, web.archive.session_factory, web.archive)
    try:
        server.start()
    finally:
        if before is None:
            del os.environ[DIST_ENV]
        else:
            os.environ[DIST_ENV] = before
    try:
        yield server.url, dist
    finally:
        server.stop()


@pytest.mark.slow  # the web server
def test_viewer_needs_a_login_and_comes_back_after_it(web: WebEnv) -> None:
    target = "/viewer/viewer?StudyInstanceUIDs=" + web.bleed.StudyInstanceUID
    with httpx.Client(base_url=web.url, follow_redirects=False) as anonymous:
        for path in ("/viewer", "/viewer/", target, "/viewer/app-config.js", "/viewer/radtriage-boot.js"):
            response = anonymous.get(path)
            assert response.status_code == 303 and response.headers["location"].startswith("/login?next="), path
        back = anonymous.get(target).headers["location"]
    assert back == "/login?next=%2Fviewer%2Fviewer%3FStudyInstanceUIDs%3D" + web.bleed.StudyInstanceUID
    form = httpx.get(web.url + back)
    assert f'name="next" value="{target}"' in form.text.replace("&amp;", "&").replace("&#61;", "=")
    # Logging in with that form sends the reader back to the viewer URL (checked in _logged_in).
    with _logged_in(web.url, target) as client:
        assert client.get(target).status_code in (200, 503)  # 503: OHIF not fetched here


@pytest.mark.slow  # the web server
def test_viewer_is_served_for_its_mount(fake_viewer: tuple[str, Path]) -> None:
    url, _dist = fake_viewer
    with _logged_in(url) as client:
        assert client.get("/viewer").headers["location"] == "/viewer/"
        index = client.get("/viewer/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assert 'src="/viewer/app.bundle.0f6159c501addfe9.js"' in index.text and "<script>" not in index.text
        assert index.headers["content-security-policy"] == VIEWER_CSP != CONTENT_SECURITY_POLICY
        assert "'unsafe-inline'" not in VIEWER_CSP.split("script-src")[1].split(";")[0]
        # SPA fallback: OHIF's routes answer its page, a missing file does not.
        for route in ("/viewer/viewer?StudyInstanceUIDs=1.2.3", "/viewer/segmentation", "/viewer/viewer/1.2.840.1"):
            spa = client.get(route)
            assert spa.status_code == 200 and spa.text == index.text, route
        assert client.get("/viewer/no-such-chunk.bundle.js").status_code == 404
        assert "[project]" not in client.get("/viewer/%2e%2e/%2e%2e/pyproject.toml").text
        boot = client.get("/viewer/radtriage-boot.js")
        assert boot.headers["content-type"].startswith("text/javascript") and 'PUBLIC_URL="/viewer/"' in boot.text
        # Our config, never the bundled one.
        config = client.get("/viewer/app-config.js")
        assert config.headers["content-type"].startswith("text/javascript")
        assert _config(config.text)["routerBasename"] == "/viewer" and "bundled demo" not in config.text
        bundle = client.get("/viewer/app.bundle.0f6159c501addfe9.js")
        assert '__webpack_require__.p = "/viewer/"' in bundle.text
        assert bundle.headers["cache-control"] == "private, max-age=31536000, immutable"
        assert client.get("/viewer/app.bundle.css").headers["cache-control"] == "private, no-cache"
        css = client.get("/viewer/app.bundle.css")
        assert "url(/viewer/a34f9d1faa5f3315.woff2)" in css.text
        assert client.get("/viewer/app.bundle.css", headers={"If-None-Match": css.headers["etag"]}).status_code == 304
        for path, media in (
            ("/viewer/0ddf166f7a343eda.wasm", "application/wasm"),
            ("/viewer/a34f9d1faa5f3315.woff2", "font/woff2"),
            ("/viewer/manifest.json", "application/json"),
            ("/viewer/assets/favicon.ico", "image/x-icon"),
        ):
            response = client.get(path)
            assert response.status_code == 200 and response.headers["content-type"] == media, path
            assert response.headers["content-security-policy"] == VIEWER_CSP
        assert client.get("/viewer/0ddf166f7a343eda.wasm").content.startswith(b"\x00asm")


@pytest.mark.slow  # the web server
def test_viewer_not_fetched_says_what_to_run(fake_viewer: tuple[str, Path]) -> None:
    url, dist = fake_viewer
    index = dist / "index.html"
    index.rename(dist / "index.html.away")
    try:
        with _logged_in(url) as client:
            for path in ("/viewer/", "/viewer/viewer?StudyInstanceUIDs=1.2.3"):
                response = client.get(path)
                assert response.status_code == 503 and "make viewer" in response.text, path
                assert "scripts/fetch_ohif.py" in response.text
    finally:
        (dist / "index.html.away").rename(index)


REAL_DIST = dist_dir()
needs_ohif = pytest.mark.skipif(
    not (REAL_DIST / "index.html").is_file(), reason=f"OHIF not fetched into {REAL_DIST}: run `make viewer`"
)


@needs_ohif
@pytest.mark.slow  # the web server
def test_the_pinned_bundle_is_rewritten_for_the_mount(web: WebEnv) -> None:
    with _logged_in(web.url) as client:
        index = client.get("/viewer/").text
        assert "<script>" not in index and re.findall(r'(?:href|src)="/(?!viewer/|/)', index) == []
        entry = re.search(r'src="/viewer/(app\.bundle\.[0-9a-f]+\.js)"', index)
        assert entry, index[:300]
        bundle = client.get(f"/viewer/{entry.group(1)}").text
        assert '__webpack_require__.p = "/viewer/"' in bundle and '__webpack_require__.p = "/"' not in bundle
        assert 'window.PUBLIC_URL="/viewer/"' in client.get("/viewer/radtriage-boot.js").text


# ---- in real headless Chromium: the worklist is the way in -------------------------------------

OHIF_LOAD_MS = 60_000  # first load on two cores with SwiftShader; a warm one takes about 5 s


def _watch(page: object, origin: str) -> dict[str, list[str]]:
    """Collect what a reader would never want: CSP refusals, page errors, requests off this server."""
    seen: dict[str, list[str]] = {"csp": [], "errors": [], "remote": []}
    page.add_init_script(  # type: ignore[attr-defined]
        "document.addEventListener('securitypolicyviolation', e => "
        "console.error('CSP refused ' + e.violatedDirective + ' ' + e.blockedURI))"
    )
    page.on(  # type: ignore[attr-defined]
        "console", lambda m: m.type == "error" and "CSP refused" in m.text and seen["csp"].append(m.text)
    )
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))  # type: ignore[attr-defined]
    page.on(  # type: ignore[attr-defined]
        "request",
        lambda r: (
            r.url.startswith(("http:", "https:", "ws:", "wss:"))
            and not r.url.startswith(origin + "/")
            and seen["remote"].append(r.url)
        ),
    )
    return seen


@needs_ohif
@pytest.mark.slow  # the web server and Chromium
def test_worklist_row_opens_study_then_viewer_on_the_key_image(page: object, web: WebEnv) -> None:
    import pydicom

    from .conftest import login

    seen = _watch(page, web.url)
    login(page)
    # A click anywhere on the row (here the description cell, not the name link) opens the study.
    page.click(f'#rows tr[data-uid="{web.bleed.StudyInstanceUID}"] td.desc')  # type: ignore[attr-defined]
    page.wait_for_url(f"**/studies/{web.bleed.StudyInstanceUID}")  # type: ignore[attr-defined]
    page.go_back()  # type: ignore[attr-defined]
    # So does Enter on a focused row.
    page.focus(f'#rows tr[data-uid="{web.routine.StudyInstanceUID}"]')  # type: ignore[attr-defined]
    page.keyboard.press("Enter")  # type: ignore[attr-defined]
    page.wait_for_url(f"**/studies/{web.routine.StudyInstanceUID}")  # type: ignore[attr-defined]
    page.goto(f"/studies/{web.bleed.StudyInstanceUID}")  # type: ignore[attr-defined]
    href = page.get_attribute("#open-viewer", "href")  # type: ignore[attr-defined]
    key_uid = web.bleed.sop_uids[web.bleed.key_index]
    assert href is not None and f"initialSOPInstanceUID={key_uid}" in href
    page.click("#open-viewer")  # type: ignore[attr-defined]
    page.wait_for_url("**/viewer/viewer?StudyInstanceUIDs=*")  # type: ignore[attr-defined]
    page.wait_for_selector(".viewport-element canvas.cornerstone-canvas", timeout=OHIF_LOAD_MS)  # type: ignore[attr-defined]
    # OHIF opens on the slice where the finding is largest, not on the first one.
    key_number = pydicom.dcmread(web.archive.path_of(key_uid), stop_before_pixels=True).InstanceNumber
    index = page.locator(".viewport-overlay.overlay-bottom.right-viewport-scrollbar").first  # type: ignore[attr-defined]
    index.get_by_text(re.compile(rf"^I:\s*{key_number}\s*\(")).wait_for(timeout=OHIF_LOAD_MS)
    assert seen == {"csp": [], "errors": [], "remote": []}


@needs_ohif
@pytest.mark.slow  # the web server and Chromium
def test_ohif_study_list_shows_the_archive_and_finds_a_patient(page: object, web: WebEnv) -> None:
    from .conftest import login

    seen = _watch(page, web.url)
    login(page)
    page.goto("/viewer/")  # type: ignore[attr-defined]
    for name in ("Garcia, Maria", "Novak, Jan", "Rossi, Elena", "Weber, Karl"):
        page.get_by_text(name).wait_for(timeout=OHIF_LOAD_MS)  # type: ignore[attr-defined]
    page.locator("input").first.fill("Garcia")  # type: ignore[attr-defined]  # the Patient column's filter
    page.get_by_text("Novak, Jan").wait_for(state="detached", timeout=10_000)  # type: ignore[attr-defined]
    assert page.get_by_text("Garcia, Maria").is_visible()  # type: ignore[attr-defined]
    assert seen == {"csp": [], "errors": [], "remote": []}


@pytest.mark.slow  # the web server
def test_viewer_files_are_not_audited_but_its_page_is(fake_viewer: tuple[str, Path], web: WebEnv) -> None:
    from sqlalchemy import select

    from pipeline.index.accounts import AuditEvent
    from pipeline.index.db import session_scope

    url, _dist = fake_viewer
    with _logged_in(url) as client:
        assert client.get("/viewer/app.bundle.css").status_code == 200
        assert client.get("/viewer/viewer?StudyInstanceUIDs=1.2.3.4.999").status_code == 200
    with session_scope(web.archive.session_factory, readonly=True) as session:
        paths = set(session.scalars(select(AuditEvent.path).where(AuditEvent.path.like("/viewer/%"))))
    assert "/viewer/viewer?StudyInstanceUIDs=1.2.3.4.999" in paths
    assert "/viewer/app.bundle.css" not in paths
