"""OHIF 3 under ``/viewer/``: the prebuilt bundle from npm, served behind the login.

Where the files come from
    ``config/ohif.lock`` pins one ``@ohif/app`` release (version, tarball, SHA-256,
    npm integrity). ``scripts/fetch_ohif.py`` (``make viewer``, run by ``make run`` and
    ``make test``) packs it from the npm registry, verifies both checksums and unpacks
    its ``dist/`` unchanged into ``.cache/ohif/<version>/dist`` (or
    ``$RADTRIAGE_OHIF_DIST``). Upgrading is a version bump plus the checksums in the
    lock file. Without the files ``/viewer/`` answers 503 saying what to run.

Why the bundle is rewritten when served
    OHIF's build bakes its public path in: ``index.html`` references ``/app.bundle….js``,
    ``/assets/…`` and sets ``window.PUBLIC_URL="/"`` in inline scripts, webpack's
    runtime in each entry and worker bundle says ``__webpack_require__.p = "/"``, the
    CSS loads its font from ``url(/…)``. OHIF's way to move it (``PUBLIC_URL=… yarn
    build``) needs a source build; we serve the prebuilt files and rewrite those
    references to :data:`MOUNT` when serving, once per file and process
    (:class:`ViewerFiles`). The cache stays byte-identical to the verified tarball and
    the mount path lives in one place. ``index.html``'s inline scripts are moved to
    :data:`BOOT_SCRIPT` so the viewer's CSP needs no ``'unsafe-inline'`` for scripts.

The configuration is radtriage's, not the bundle's
    ``/viewer/app-config.js`` is generated (:func:`app_config`): one DICOMweb source on
    this server's own ``/dicom-web`` (same origin: the session cookie goes with every
    request, no CORS), ``routerBasename`` :data:`MOUNT`, the bundled modes, no dynamic
    config, no URL-loaded customisations, no investigational-use dialog.

The AI results open with the study
    OHIF draws a SEG only when its display set is hung in a viewport, and an SR only in
    its own SR viewport; the bundled protocols hang one image series. The generated
    config therefore adds one small extension with one hanging protocol,
    :data:`AI_PROTOCOL_ID`, and makes it the longitudinal ("viewer") mode's protocol
    (``modesConfiguration``): left, the image series the URL names on its key image
    with the SEG over it; right, the SR's key image with the finding outlined and its
    values. A study without AI results gets the image series alone (selectors that
    match nothing are skipped). ``disableConfirmationPrompts`` loads the SEG without
    OHIF's "open this segmentation?" question.

Nothing from outside
    :data:`VIEWER_CSP` allows this origin only (plus ``blob:``/``data:`` that OHIF
    makes itself): the few remote URLs in the bundle (the itk-wasm CDN for contour
    interpolation, the locize i18n backend, which OHIF does not enable) cannot load.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from pipeline.errors import ConfigError
from pipeline.web.auth import csrf_token

log = logging.getLogger(__name__)

MOUNT = "/viewer"
ROOT = Path(__file__).resolve().parents[2]
LOCK_FILE = ROOT / "config" / "ohif.lock"
CACHE_DIR = ROOT / ".cache" / "ohif"
DIST_ENV = "RADTRIAGE_OHIF_DIST"
DICOMWEB_ROOT = "/dicom-web"
BOOT_SCRIPT = "radtriage-boot.js"
# The viewer route that opens one study (OHIF's longitudinal mode, routeName "viewer").
STUDY_ROUTE = f"{MOUNT}/viewer"
# The hanging protocol that opens a study with its AI results (:func:`ai_protocol`).
AI_PROTOCOL_ID = "radtriage-ai-results"

# Scripts are this server's files only (no 'unsafe-inline'), and no other origin is
# reachable for anything. OHIF needs WebAssembly compilation (image codecs, SEG surface
# tools), 'unsafe-eval' (measured: its SEG reader, through the ndarray package, builds
# classes with new Function(); without it no SEG loads), inline <style> elements
# (measured: refused without 'unsafe-inline'), data: images, and blob:/data: URLs it
# makes itself for workers, media and downloads: local schemes, not a way out of the page.
VIEWER_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-eval' 'wasm-unsafe-eval'; worker-src 'self' blob:; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
    "connect-src 'self' data: blob:; media-src 'self' blob:; object-src 'none'; base-uri 'self'; "
    "frame-ancestors 'none'; form-action 'self'"
)
# Webpack names its outputs by content hash: those never change under one name.
_HASHED = re.compile(r"(?:^|[./])[0-9a-f]{16,}\.(?:bundle\.)?(?:js|css|wasm|woff2?|ttf|png|svg)$")
IMMUTABLE = "private, max-age=31536000, immutable"
REVALIDATE = "private, no-cache"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".webapp": "application/x-web-app-manifest+json",
    ".wasm": "application/wasm",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".otf": "font/otf",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".gif": "image/gif",
    ".ico": "image/x-icon",
    ".xml": "application/xml",
    ".txt": "text/plain; charset=utf-8",
    ".onnx": "application/octet-stream",
}
# A last path segment with an extension (letters first: UIDs are digits and dots) names
# a file: when it is missing that is a 404, never the app's index page.
_FILE_LIKE = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,9}$")


@dataclass(frozen=True)
class OhifPin:
    """One ``@ohif/app`` release as ``config/ohif.lock`` pins it."""

    package: str
    version: str
    tarball: str
    sha256: str
    integrity: str


def read_pin(path: Path = LOCK_FILE) -> OhifPin:
    """The pinned release; :class:`ConfigError` naming the file and key when it is unusable."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read the OHIF pin {path}: {err}") from None
    try:
        pin = OhifPin(**{key: str(data[key]) for key in ("package", "version", "tarball", "sha256", "integrity")})
    except KeyError as err:
        raise ConfigError(f"{path} lacks the key {err.args[0]!r}") from None
    if not re.fullmatch(r"[0-9a-f]{64}", pin.sha256):
        raise ConfigError(f"{path}: sha256 must be 64 lowercase hex digits, got {pin.sha256!r}")
    if not re.fullmatch(r"\d+\.\d+\.\d+", pin.version):
        raise ConfigError(f"{path}: version must be a release like 3.13.2, got {pin.version!r}")
    return pin


def install_dir(pin: OhifPin, cache: Path = CACHE_DIR) -> Path:
    """``.cache/ohif/<version>``: the unpacked ``dist/`` and the checksum it was verified with."""
    return cache / pin.version


def dist_dir() -> Path:
    """Where the viewer's files are served from: ``$RADTRIAGE_OHIF_DIST`` or the pinned cache."""
    override = os.environ.get(DIST_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return install_dir(read_pin()) / "dist"


def viewer_url(study_uid: str, series_uid: str = "", sop_uid: str = "") -> str:
    """The viewer on one study, opened on the given series and instance when known.

    OHIF (3.8 and later) reads ``initialSeriesInstanceUID`` and ``initialSOPInstanceUID``
    from the URL and lets the hanging protocol start on that display set and image.
    """
    from urllib.parse import urlencode

    query = {"StudyInstanceUIDs": study_uid}
    if series_uid:
        query["initialSeriesInstanceUID"] = series_uid
    if sop_uid:
        query["initialSOPInstanceUID"] = sop_uid
    return f"{STUDY_ROUTE}?{urlencode(query)}"


def app_config(mount: str = MOUNT, dicomweb_root: str = DICOMWEB_ROOT) -> dict[str, object]:
    """OHIF's ``window.config``: this server's DICOMweb, nothing dynamic, nothing remote."""
    return {
        "name": "radtriage",
        "routerBasename": mount,
        "extensions": [],  # the bundled ones
        "modes": [],  # the bundled ones: longitudinal (basic viewer), segmentation, ...
        # OHIF's guided tour of the viewer ("Scrolling Through Images 1/11") is off.
        "customizationService": {"ohif.tours": {"$set": []}},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,  # everything is same-origin
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "groupEnabledModesFirst": True,
        "allowMultiSelectExport": False,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        # Error details can quote patient data: only in OHIF's development builds.
        "showErrorDetails": "dev",
        "investigationalUseDialog": {"option": "never"},
        # The AI SEG is opened without asking (see the module docstring).
        "disableConfirmationPrompts": True,
        "modesConfiguration": {"@ohif/mode-longitudinal": {"hangingProtocol": {"$set": AI_PROTOCOL_ID}}},
        "dangerouslyUseDynamicConfig": {"enabled": False},
        # No customizationUrlPrefixes: OHIF then refuses every ?customization= value.
        "defaultDataSourceName": "dicomweb",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "dicomweb",
                "configuration": {
                    "friendlyName": "radtriage archive",
                    "name": "radtriage",
                    "qidoRoot": dicomweb_root,
                    "wadoRoot": dicomweb_root,
                    "wadoUriRoot": dicomweb_root,
                    "qidoSupportsIncludeField": True,
                    "supportsReject": False,
                    "dicomUploadEnabled": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": True,
                    "supportsWildcard": True,
                    "omitQuotationForMultipartRequest": True,
                    "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
                },
            }
        ],
    }


def ai_protocol() -> dict[str, object]:
    """The hanging protocol :data:`AI_PROTOCOL_ID`: image + SEG on the key image | SR."""
    image = {
        "seriesMatchingRules": [
            # As OHIF's default protocol: a series with images, the one the URL names first.
            {"weight": 10, "attribute": "numImageFrames", "constraint": {"greaterThan": {"value": 0}}},
            {"weight": 20, "attribute": "isDisplaySetFromUrl", "constraint": {"equals": True}},
            {"attribute": "Modality", "constraint": {"doesNotEqual": "SEG"}, "required": True},
            {"attribute": "Modality", "constraint": {"doesNotEqual": "SR"}, "required": True},
        ]
    }
    return {
        "id": AI_PROTOCOL_ID,
        "name": "Images with the AI results",
        "locked": True,
        "protocolMatchingRules": [],
        "toolGroupIds": ["default"],
        "numberOfPriorsReferenced": 0,
        "defaultViewport": {
            "viewportOptions": {"viewportType": "stack", "toolGroupId": "default", "allowUnmatchedView": True},
            "displaySets": [{"id": "imageDisplaySetId", "matchedDisplaySetsIndex": -1}],
        },
        "displaySetSelectors": {
            "imageDisplaySetId": image,
            "segDisplaySetId": {
                "seriesMatchingRules": [{"attribute": "Modality", "constraint": {"equals": "SEG"}, "required": True}]
            },
            "srDisplaySetId": {
                "seriesMatchingRules": [{"attribute": "Modality", "constraint": {"equals": "SR"}, "required": True}]
            },
        },
        "stages": [
            {
                "name": "AI results",
                "viewportStructure": {"layoutType": "grid", "properties": {"rows": 1, "columns": 2}},
                "viewports": [
                    {
                        "viewportOptions": {
                            "viewportType": "stack",
                            "viewportId": "default",
                            "toolGroupId": "default",
                            "allowUnmatchedView": True,
                            # The slice the URL's initialSOPInstanceUID names: the key image.
                            "initialImageOptions": {"custom": "sopInstanceLocation"},
                        },
                        "displaySets": [{"id": "imageDisplaySetId"}, {"id": "segDisplaySetId"}],
                    },
                    {
                        "viewportOptions": {
                            "viewportId": "aiReport",
                            "toolGroupId": "default",
                            "allowUnmatchedView": True,
                        },
                        "displaySets": [{"id": "srDisplaySetId"}],
                    },
                ],
            }
        ],
    }


# An extension needs a function (getHangingProtocolModule), which JSON cannot hold.
_EXTENSION_JS = """(function () {
  var protocol = %s;
  window.config.extensions.push({
    id: "radtriage",
    getHangingProtocolModule: function () { return [{ name: protocol.id, protocol: protocol }]; }
  });
})();
"""


def app_config_js(mount: str = MOUNT) -> str:
    """:func:`app_config` as the script OHIF's ``index.html`` loads before its bundle,
    plus the extension that registers :func:`ai_protocol`."""
    body = json.dumps(app_config(mount), indent=2)
    extension = _EXTENSION_JS % json.dumps(ai_protocol())
    return (
        "/* Generated by radtriage (pipeline/web/viewer.py); OHIF's bundled app-config.js is not used. */\n"
        f"window.config = {body};\n{extension}"
    )


_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)
_ROOTED_ATTRIBUTE = re.compile(r'\b(href|src|content)="/(?!/)')
_PUBLIC_URL = re.compile(r"""(window\.PUBLIC_URL\s*=\s*)(["'])/\2""")
_WEBPACK_PUBLIC_PATH = re.compile(r"""(__webpack_require__\.p\s*=\s*)(["'])/\2""")
_BROWSER_IMPORT = re.compile(r"""(browserImportFunction\(\s*)(["'])/(?!/)""")
_CSS_ROOTED_URL = re.compile(r"""url\((["']?)/(?!/)""")


def rewrite_index(html: str, mount: str = MOUNT) -> tuple[str, str]:
    """OHIF's ``index.html`` for ``mount``: the page and its inline scripts as one file.

    Returns ``(page, boot_script)``. Every rooted ``href``/``src`` moves under the
    mount, ``window.PUBLIC_URL`` becomes ``mount/``, and the inline scripts are replaced
    by one ``<script src>`` at the place of the first (same order of execution).
    """
    scripts: list[str] = []

    def collect(match: re.Match[str]) -> str:
        scripts.append(_PUBLIC_URL.sub(rf'\1"{mount}/"', match.group(1)))
        return f'<script src="{mount}/{BOOT_SCRIPT}"></script>' if len(scripts) == 1 else ""

    page = _INLINE_SCRIPT.sub(collect, _ROOTED_ATTRIBUTE.sub(rf'\1="{mount}/', html))
    boot = ";\n".join(s.strip().rstrip(";") for s in scripts)
    if "window.PUBLIC_URL" not in boot:
        boot += f';\nwindow.PUBLIC_URL = "{mount}/"'
    return page, boot + ";\n"


def rewrite_asset(text: str, suffix: str, mount: str = MOUNT) -> str:
    """A script or style sheet with OHIF's rooted paths moved under ``mount``."""
    if suffix == ".css":
        return _CSS_ROOTED_URL.sub(rf"url(\1{mount}/", text)
    text = _WEBPACK_PUBLIC_PATH.sub(rf'\1"{mount}/"', text)
    return _BROWSER_IMPORT.sub(rf"\1\2{mount}/", text)


class ViewerFiles:
    """The unpacked ``dist/`` as served under ``mount``, rewritten where it names ``/``.

    Scripts and style sheets are read once and kept in memory only when the rewrite
    changed them (the entry bundle, the worker bundles, one style sheet: about 18 MB
    for OHIF 3.13); every other file is sent from disk.
    """

    def __init__(self, dist: Path, mount: str = MOUNT) -> None:
        self.dist = dist
        self.mount = mount
        self._rewritten: dict[Path, tuple[int, bytes | None]] = {}
        self._index: tuple[int, str, str] | None = None

    def available(self) -> bool:
        return (self.dist / "index.html").is_file()

    def index(self) -> tuple[str, str]:
        """``(index.html, boot script)`` for the mount, re-read when the file changes."""
        path = self.dist / "index.html"
        mtime = path.stat().st_mtime_ns
        if self._index is None or self._index[0] != mtime:
            page, boot = rewrite_index(path.read_text(encoding="utf-8"), self.mount)
            self._index = (mtime, page, boot)
        return self._index[1], self._index[2]

    def find(self, relative: str) -> Path | None:
        """The file at ``relative`` inside the dist, or ``None`` (also for anything outside it)."""
        if not relative or any(part.startswith(".") for part in relative.split("/")):
            return None
        path = (self.dist / relative).resolve()
        if not path.is_relative_to(self.dist.resolve()) or not path.is_file():
            return None
        return path

    def rewritten(self, path: Path) -> bytes | None:
        """The file's bytes after the mount rewrite, or ``None`` when it needs none."""
        if path.suffix not in (".js", ".mjs", ".css"):
            return None
        mtime = path.stat().st_mtime_ns
        cached = self._rewritten.get(path)
        if cached is None or cached[0] != mtime:
            original = path.read_text(encoding="utf-8", errors="surrogateescape")
            changed = rewrite_asset(original, path.suffix, self.mount)
            body = changed.encode("utf-8", errors="surrogateescape") if changed != original else None
            cached = self._rewritten[path] = (mtime, body)
        return cached[1]


def media_type(path: Path) -> str:
    return MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")


def _headers(name: str, etag: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": VIEWER_CSP,
        "Cache-Control": IMMUTABLE if _HASHED.search(name) else REVALIDATE,
        "ETag": etag,
    }


def _text(request: Request, body: str | bytes, media: str, name: str) -> Response:
    import hashlib

    data = body.encode("utf-8") if isinstance(body, str) else body
    etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    headers = _headers(name, etag)
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media, headers=headers)


def _not_fetched(request: Request, files: ViewerFiles) -> Response:
    ctx = request.app.state.ctx
    user = getattr(request.state, "user", None)
    message = (
        f"The OHIF viewer's files are not installed here ({files.dist} has no index.html). "
        "Run `make viewer` (or `.venv/bin/python scripts/fetch_ohif.py`) on the server, then reload."
    )
    response: Response = ctx.templates.TemplateResponse(
        request,
        "message.html",
        {
            "title": "Viewer not installed",
            "message": message,
            "user": user,
            "csrf": csrf_token(ctx.secret, user.session_token) if user and user.session_token else "",
        },
        status_code=503,
    )
    response.headers["Retry-After"] = "60"
    return response


def build_router(dist: Path | None = None, mount: str = MOUNT) -> APIRouter:
    """``mount``, ``mount/`` and everything under it. ``dist`` defaults to :func:`dist_dir`."""
    files = ViewerFiles(dist if dist is not None else dist_dir(), mount)
    router = APIRouter(prefix=mount)

    @router.get("", include_in_schema=False)
    def viewer_root() -> Response:
        return RedirectResponse(f"{mount}/", status_code=308)

    @router.get("/app-config.js", include_in_schema=False)
    def viewer_config(request: Request) -> Response:
        return _text(request, app_config_js(mount), MEDIA_TYPES[".js"], "app-config.js")

    @router.get(f"/{BOOT_SCRIPT}", include_in_schema=False)
    def viewer_boot(request: Request) -> Response:
        if not files.available():
            return Response("the viewer is not installed: run `make viewer`", status_code=503, media_type="text/plain")
        return _text(request, files.index()[1], MEDIA_TYPES[".js"], BOOT_SCRIPT)

    @router.get("/{relative:path}", include_in_schema=False)
    def viewer_file(request: Request, relative: str) -> Response:
        if not files.available():
            return _not_fetched(request, files)
        path = files.find(relative) if relative != "index.html" else None
        if path is None:
            if _FILE_LIKE.search(relative) and relative != "index.html":
                return Response(f"no file {mount}/{relative} in the viewer", status_code=404, media_type="text/plain")
            # One of OHIF's own routes (/viewer/viewer?StudyInstanceUIDs=…): its index page.
            return _text(request, files.index()[0], MEDIA_TYPES[".html"], "index.html")
        body = files.rewritten(path)
        if body is not None:
            return _text(request, body, media_type(path), path.name)
        stat = path.stat()
        etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
        headers = _headers(path.name, etag)
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return FileResponse(path, media_type=media_type(path), headers=headers)

    return router
