"""Run the Debian DICOM checkers the way a user would and collect what they report."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Verdict:
    iod: str  # the IOD dciodvfy recognised, e.g. "Segmentation"
    errors: list[str]
    warnings: list[str]
    output: str


def dciodvfy(path: Path) -> Verdict:
    """Validate ``path`` with dicom3tools' dciodvfy; its messages start with Error/Warning."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    lines = [line.strip() for line in output.splitlines()]
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    iods = [line for line in lines if line and not line.startswith(("Error", "Warning"))]
    return Verdict(iods[0] if iods else "", errors, warnings, output)


def dsrdump(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
