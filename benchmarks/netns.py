"""Run a benchmark in a private network namespace, so that only its own traffic is on lo.

Orthanc 1.10 cannot bind to loopback alone; in a fresh namespace (``unshare --net``, as
root) nothing else can reach it or the other servers. Without root or ``unshare`` the
benchmark runs in the host namespace and sends to 127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def maybe_enter_netns(script: str | Path, argv: list[str]) -> None:
    """Re-execute ``script`` with ``argv`` inside a new network namespace (does not return),
    unless already inside one, ``--no-netns`` was given, or that is not possible here."""
    if os.environ.get("RADTRIAGE_BENCH_NETNS") or "--no-netns" in argv:
        return
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        print("not root: running in the host network namespace, traffic on 127.0.0.1 only", file=sys.stderr)
        return
    cmd = f"ip link set lo up && exec {sys.executable} {Path(script).resolve()} " + " ".join(argv)
    env = {**os.environ, "RADTRIAGE_BENCH_NETNS": "1"}
    sys.exit(subprocess.call(["unshare", "--net", "sh", "-c", cmd], env=env))
