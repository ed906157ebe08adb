"""Ingest benchmark: the same synthetic CT slices sent by dcmtk ``storescu`` (one
association, TCP_NODELAY=1) to radtriage, Orthanc and dcmtk ``storescp``.

* radtriage: ``radtriage serve`` as its own process (receiver, archive, index, sweep,
  forwarder, web app; triage off, so no Prefect server competes for the CPUs); fsync of
  every file and of its folder before Success.
* Orthanc (Debian package): ``SyncStorageArea`` on (fsync), no compression, no plugins.
* storescp: ``+B`` (bytes written as received); it never fsyncs: the upper bound.

Runs are interleaved (radtriage, Orthanc, storescp, radtriage, ...), each on fresh
storage. Orthanc 1.10 cannot bind to loopback only, so when run as root the whole
benchmark re-executes itself in a private network namespace (``unshare --net``) where
only ``lo`` exists; otherwise all traffic still goes to 127.0.0.1 only.

Usage: ``python benchmarks/ingest.py [--images 320] [--runs 3]`` (``make bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from netns import maybe_enter_netns  # noqa: E402 - the benchmarks' own helper, beside this file

from pipeline.triage.prefect_server import free_port  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}
HOST = "127.0.0.1"


def wait_echo(port: int, aec: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{aec} exited with {proc.returncode} before answering C-ECHO")
        ok = (
            subprocess.run(
                ["echoscu", "-aet", "STORESCU", "-aec", aec, HOST, str(port)], env=ENV, capture_output=True
            ).returncode
            == 0
        )
        if ok:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{aec} on port {port} did not answer C-ECHO within {timeout}s")


def wait_log(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server never logged {text!r}; see {log}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_radtriage(storage: Path, port: int, web_port: int = 0) -> subprocess.Popen[bytes]:
    """``radtriage serve`` on ``storage`` (config in ``radtriage.toml`` there), its web app on
    ``web_port`` (0: any free port; ``benchmarks/dicomweb.py`` gives its own)."""
    cfg = storage / "radtriage.toml"
    cfg.write_text(
        f'[dicom]\nae_title = "RADTRIAGE"\nbind = "{HOST}"\nport = {port}\nallowed_aes = ["*"]\n'
        f'[storage]\ndata_dir = "{storage / "data"}"\nfsync = true\n'
        f"[triage]\nenabled = false\nstable_age_seconds = 3600\n"  # ingest only: no Prefect server
        f'[web]\nbind = "{HOST}"\nport = {web_port or free_port()}\n'
    )
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--config", str(cfg), "serve"],
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=(storage / "log.txt").open("wb"),
    )


def start_orthanc(storage: Path, port: int, extra: dict[str, object] | None = None) -> subprocess.Popen[bytes]:
    """Orthanc with synced storage, no compression, no plugins; ``extra`` adds or overrides
    configuration keys (``benchmarks/query_retrieve.py`` adds its Q/R rights and modalities)."""
    cfg = storage / "orthanc.json"
    cfg.write_text(
        json.dumps(
            {
                "Name": "bench",
                "StorageDirectory": str(storage / "db"),
                "IndexDirectory": str(storage / "db"),
                "DicomAet": "ORTHANC",
                "DicomPort": port,
                "HttpPort": free_port(),
                "RemoteAccessAllowed": False,
                "HttpServerEnabled": True,
                "DicomServerEnabled": True,
                "DicomCheckCalledAet": False,
                "DicomAlwaysAllowStore": True,
                "DicomAlwaysAllowEcho": True,
                "SyncStorageArea": True,
                "StorageCompression": False,
                "Plugins": [],
                "OverwriteInstances": False,
                "AuthenticationEnabled": False,
                **(extra or {}),
            }
        )
    )
    return subprocess.Popen(
        ["Orthanc", str(cfg)], env=ENV, stdout=subprocess.DEVNULL, stderr=(storage / "log.txt").open("wb")
    )


def start_storescp(storage: Path, port: int) -> subprocess.Popen[bytes]:
    out = storage / "out"
    out.mkdir()
    return subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "+B", "-pdu", "131072", "-od", str(out), str(port)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=(storage / "log.txt").open("wb"),
    )


def count_files(folder: Path, suffix: str = "") -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and p.name.endswith(suffix) and not p.name.startswith("."))


TARGETS: dict[str, tuple[str, Callable[[Path, int], subprocess.Popen[bytes]], Callable[[Path], int]]] = {
    "radtriage": ("RADTRIAGE", start_radtriage, lambda s: count_files(s / "data" / "files", ".dcm")),
    "orthanc": ("ORTHANC", start_orthanc, lambda s: count_files(s / "db") - 1),  # minus the SQLite index
    "storescp": ("STORESCP", start_storescp, lambda s: count_files(s / "out")),
}


def one_run(name: str, images: Path, n: int, workdir: Path) -> float:
    aec, start, counter = TARGETS[name]
    storage = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
    port = free_port()
    proc = start(storage, port)
    try:
        wait_echo(port, aec, proc)
        if name == "radtriage":  # the receiver answers first; wait until every component is up
            wait_log(storage / "log.txt", "radtriage running", proc)
        t0 = time.perf_counter()
        sent = subprocess.run(
            ["storescu", "-aet", "STORESCU", "-aec", aec, "--scan-directories", HOST, str(port), str(images)],
            env=ENV,
            capture_output=True,
            text=True,
        )
        elapsed = time.perf_counter() - t0
        if sent.returncode != 0:
            raise RuntimeError(f"storescu to {name} failed: {sent.stderr[-400:]}")
    finally:
        stop(proc)
    stored = counter(storage)
    if name == "orthanc":
        stored = len([p for p in (storage / "db").rglob("*") if p.is_file() and len(p.name) == 36])
    if stored != n:
        raise RuntimeError(f"{name} stored {stored} of {n} images (see {storage}/log.txt)")
    shutil.rmtree(storage, ignore_errors=True)
    return n / elapsed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    maybe_enter_netns(__file__, argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=320, help="512x512 CT slices per run (default 320)")
    parser.add_argument("--runs", type=int, default=3, help="runs per target, interleaved (default 3)")
    parser.add_argument("--targets", default="radtriage,orthanc,storescp")
    parser.add_argument("--no-netns", action="store_true", help="do not enter a private network namespace")
    args = parser.parse_args(argv)
    from pipeline.lab.synth import synth_study

    targets = args.targets.split(",")
    with tempfile.TemporaryDirectory(prefix="radtriage-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        images = work / "images"
        synth_study(images, seed=2024, slices=args.images)
        mb = sum(p.stat().st_size for p in images.iterdir()) / 1e6
        print(
            f"{args.images} CT images 512x512 ({mb:.0f} MB), storescu one association, TCP_NODELAY=1, "
            f"{args.runs} interleaved runs, netns={'yes' if os.environ.get('RADTRIAGE_BENCH_NETNS') else 'no'}"
        )
        results: dict[str, list[float]] = {t: [] for t in targets}
        for run in range(args.runs):
            for name in targets:
                rate = one_run(name, images, args.images, work)
                results[name].append(rate)
                print(f"run {run + 1} {name:<10} {rate:8.1f} images/s", flush=True)
    med = {t: statistics.median(v) for t, v in results.items()}
    print("\nmedian images/s: " + ", ".join(f"{t} {m:.1f}" for t, m in med.items()))
    if "radtriage" in med:
        for other in ("orthanc", "storescp"):
            if other in med:
                print(f"radtriage/{other} = {med['radtriage'] / med[other]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
