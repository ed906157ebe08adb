#!/usr/bin/env python
"""Fetch the pinned OHIF viewer (``config/ohif.lock``) into ``.cache/ohif/<version>/dist``.

Usage: ``python scripts/fetch_ohif.py [--force] [--tarball FILE]``. ``npm pack`` takes
``@ohif/app@<version>`` from the npm registry; the tarball's SHA-256 and its npm
integrity (SHA-512) must both match the lock file, then only its ``dist/`` is unpacked
(no links, nothing outside the folder) and moved into place in one rename. A second
run finds the verified copy and downloads nothing. ``--tarball`` installs a tarball
already on disk (checked the same way). The bundle is never committed: ``.cache/`` is
git-ignored. ``pipeline/web/viewer.py`` serves it under ``/viewer/``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.errors import PermanentError, RadtriageError, TransientError
from pipeline.web.viewer import CACHE_DIR, LOCK_FILE, OhifPin, install_dir, read_pin

log = logging.getLogger("fetch_ohif")
MARKER = "verified-sha256"
NPM_TIMEOUT_S = 600


def _digests(path: Path) -> tuple[str, str]:
    """``(sha256 hex, npm integrity "sha512-<base64>")`` of one file."""
    sha256, sha512 = hashlib.sha256(), hashlib.sha512()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha256.update(block)
            sha512.update(block)
    return sha256.hexdigest(), "sha512-" + base64.b64encode(sha512.digest()).decode("ascii")


def verify(tarball: Path, pin: OhifPin) -> None:
    """Refuse a tarball whose SHA-256 or npm integrity is not the pinned one."""
    sha256, integrity = _digests(tarball)
    if sha256 != pin.sha256:
        raise PermanentError(
            f"{tarball.name} has SHA-256 {sha256}, the lock file pins {pin.sha256} for "
            f"{pin.package}@{pin.version}: refusing it (a corrupt download, or the lock file needs updating)"
        )
    if integrity != pin.integrity:
        raise PermanentError(f"{tarball.name} has npm integrity {integrity}, the lock file pins {pin.integrity}")


def npm_pack(pin: OhifPin, folder: Path) -> Path:
    """``npm pack <package>@<version>`` into ``folder``; the tarball's path."""
    npm = shutil.which("npm")
    if npm is None:
        raise PermanentError("npm is not installed: install Debian's npm (apt-get install npm), then run this again")
    cmd = [npm, "pack", f"{pin.package}@{pin.version}", "--pack-destination", str(folder), "--silent"]
    log.info("downloading %s@%s with npm pack", pin.package, pin.version)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise TransientError(f"npm pack did not finish in {NPM_TIMEOUT_S} s; check the registry connection") from None
    if proc.returncode != 0:
        raise TransientError(
            f"npm pack {pin.package}@{pin.version} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}; "
            "check the connection to the npm registry and run scripts/fetch_ohif.py again"
        )
    tarballs = list(folder.glob("*.tgz"))
    if len(tarballs) != 1:
        raise PermanentError(f"npm pack left {[t.name for t in tarballs]} in {folder}, expected one .tgz")
    return tarballs[0]


def unpack_dist(tarball: Path, target: Path) -> int:
    """Extract ``package/dist/`` alone into ``target``; the number of files.

    Only regular files and folders are taken, and only below ``dist/`` (npm tarballs
    hold ``package/...``); anything else in the tarball is skipped.
    """
    count = 0
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:
            parts = member.name.split("/")
            if len(parts) < 3 or parts[1] != "dist" or not (member.isfile() or member.isdir()):
                continue
            relative = Path(*parts[2:])
            if relative.is_absolute() or ".." in relative.parts:
                raise PermanentError(f"{tarball.name} holds the unsafe path {member.name!r}: refusing it")
            destination = target / relative
            if member.isdir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None  # a regular file always has content
            with source, destination.open("wb") as out:
                shutil.copyfileobj(source, out)
            count += 1
    if not (target / "index.html").is_file():
        raise PermanentError(f"{tarball.name} has no dist/index.html: not a prebuilt OHIF app")
    return count


def installed(pin: OhifPin, cache: Path = CACHE_DIR) -> bool:
    """Whether the pinned release is unpacked and was verified against this lock file."""
    folder = install_dir(pin, cache)
    marker = folder / MARKER
    return (folder / "dist" / "index.html").is_file() and marker.is_file() and marker.read_text().strip() == pin.sha256


def install(pin: OhifPin, cache: Path = CACHE_DIR, *, tarball: Path | None = None, force: bool = False) -> bool:
    """Make ``<cache>/<version>/dist`` the verified release; ``False`` when it already was.

    Raises
    ------
    PermanentError
        A checksum mismatch or a tarball that is not OHIF's: nothing is changed.
    TransientError
        npm could not reach the registry: run again later.
    """
    if not force and installed(pin, cache):
        return False
    folder = install_dir(pin, cache)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        work = Path(tmp)
        packed = tarball if tarball is not None else npm_pack(pin, work)
        verify(packed, pin)
        staged = work / "dist"
        count = unpack_dist(packed, staged)
        old = folder / "dist"
        if old.exists():
            os.replace(old, work / "old-dist")  # removed with the temporary folder
        os.replace(staged, old)
        (folder / MARKER).write_text(pin.sha256 + "\n")
    log.info("installed %s@%s (%d files) in %s", pin.package, pin.version, count, folder / "dist")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="download and unpack again even when installed")
    parser.add_argument("--tarball", type=Path, help="install this .tgz instead of downloading it")
    parser.add_argument("--lock", type=Path, default=LOCK_FILE, help="the pin file (default config/ohif.lock)")
    parser.add_argument("--cache", type=Path, default=CACHE_DIR, help="where releases are unpacked")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        pin = read_pin(args.lock)
        changed = install(pin, args.cache, tarball=args.tarball, force=args.force)
    except RadtriageError as err:
        print(f"fetch_ohif: error: {err}", file=sys.stderr)
        return 1
    state = "installed" if changed else "already installed"
    print(f"{pin.package}@{pin.version}: {state} in {install_dir(pin, args.cache) / 'dist'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
