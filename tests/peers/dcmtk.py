"""Reading what dcmtk's tools say they did."""

from __future__ import annotations

import re
from pathlib import Path


def acknowledged(storescu_output: str) -> list[Path]:
    """The files ``storescu -v`` got a Success response for, from its log."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        sending = re.search(r"Sending file: (.+)$", line)
        if sending:
            current = sending.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acked.append(Path(current))
            current = None
    return acked
