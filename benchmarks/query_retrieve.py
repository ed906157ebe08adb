"""Retrieve benchmark: C-MOVE and C-GET of one CT study from radtriage and from Orthanc.

Both hold the same synthetic study (``--images`` 512x512 CT slices, sent to each by
dcmtk ``storescu``). Then, interleaved per run:

* C-MOVE: dcmtk ``movescu -S`` of the study to a dcmtk ``storescp`` (``+B``, no fsync);
* C-GET: dcmtk ``getscu -S`` of the study (getscu stores what comes back itself).

radtriage runs in this process (:func:`pipeline.dicom.receiver.start_receiver`, with the
retrieve contexts and handlers, the way ``radtriage serve`` composes them); Orthanc is
the Debian package with synced storage, no compression, no plugins. Everything goes to
127.0.0.1 with ``TCP_NODELAY=1``; as root the benchmark re-executes itself in a private
network namespace (see ``benchmarks/ingest.py``).

C-FIND is not measured here yet: the C-FIND SCP is built separately.

Usage: ``python benchmarks/query_retrieve.py [--images 300] [--runs 3]``.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.ingest import ENV, HOST, count_files, start_storescp, stop, wait_echo  # noqa: E402
from pipeline.triage.prefect_server import free_port  # noqa: E402


def start_orthanc(storage: Path, port: int, store_port: int) -> subprocess.Popen[bytes]:
    """Orthanc as in ``benchmarks/ingest.py``, plus the storescp destination and the SCUs."""
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
                "DicomCheckCalledAet": False,
                "DicomAlwaysAllowStore": True,
                "DicomAlwaysAllowEcho": True,
                "DicomAlwaysAllowFind": True,
                "DicomAlwaysAllowMove": True,
                "DicomAlwaysAllowGet": True,
                "DicomModalities": {"storescp": ["STORESCP", HOST, store_port], "getscu": ["GETSCU", HOST, 104]},
                "SyncStorageArea": True,
                "StorageCompression": False,
                "Plugins": [],
                "AuthenticationEnabled": False,
            }
        )
    )
    return subprocess.Popen(
        ["Orthanc", str(cfg)], env=ENV, stdout=subprocess.DEVNULL, stderr=(storage / "log.txt").open("wb")
    )


def start_radtriage(storage: Path, store_port: int):  # type: ignore[no-untyped-def]
    from pipeline.archive import Archive
    from pipeline.config import Settings
    from pipeline.dicom.receiver import start_receiver
    from pipeline.index.db import migrate

    peers = [
        {"ae_title": "STORESCP", "host": HOST, "port": store_port, "allow": ["move_destination"]},
        {"ae_title": "MOVESCU", "host": HOST, "port": 104, "allow": ["retrieve", "store"]},
        {"ae_title": "GETSCU", "host": HOST, "port": 104, "allow": ["retrieve", "store"]},
    ]
    settings = Settings(
        storage={"data_dir": storage / "data", "fsync": True},
        dicom={"bind": HOST, "port": 0, "allowed_aes": ["*"], "peers": peers},
        triage={"enabled": False, "stable_age_seconds": 3600},
    )
    migrate(settings.index_url)
    archive = Archive(settings)
    server = start_receiver(settings, archive)  # the receiver as radtriage serve runs it
    return server, archive


def maybe_enter_netns(argv: list[str]) -> None:
    """As ``benchmarks/ingest.py`` does, but re-executing this file."""
    if os.environ.get("RADTRIAGE_BENCH_NETNS") or "--no-netns" in argv:
        return
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        print("not root: running in the host network namespace, traffic on 127.0.0.1 only", file=sys.stderr)
        return
    cmd = f"ip link set lo up && exec {sys.executable} {Path(__file__).resolve()} " + " ".join(argv)
    env = {**os.environ, "RADTRIAGE_BENCH_NETNS": "1"}
    sys.exit(subprocess.call(["unshare", "--net", "sh", "-c", cmd], env=env))


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {(done.stdout + done.stderr)[-600:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    maybe_enter_netns(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300, help="512x512 CT slices in the study (default 300)")
    parser.add_argument("--runs", type=int, default=3, help="runs per server and operation, interleaved")
    parser.add_argument("--no-netns", action="store_true", help="do not enter a private network namespace")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.ERROR)
    import pydicom

    from pipeline.lab.synth import synth_study

    with tempfile.TemporaryDirectory(prefix="radtriage-qr-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        images = work / "images"
        synth_study(images, seed=2024, slices=args.images)
        study_uid = str(pydicom.dcmread(next(images.iterdir()), stop_before_pixels=True).StudyInstanceUID)
        store_port = free_port()
        (work / "orthanc").mkdir()
        orthanc_port = free_port()
        orthanc = start_orthanc(work / "orthanc", orthanc_port, store_port)
        server, archive = start_radtriage(work / "radtriage", store_port)
        ports = {"radtriage": ("RADTRIAGE", int(server.server_address[1])), "orthanc": ("ORTHANC", orthanc_port)}
        results: dict[tuple[str, str], list[float]] = {}
        try:
            wait_echo(orthanc_port, "ORTHANC", orthanc)
            for aec, port in ports.values():
                timed(["storescu", "-aec", aec, "--scan-directories", HOST, str(port), str(images)])
            for run in range(args.runs):
                for name, (aec, port) in ports.items():
                    scp_dir = work / f"scp-{name}-{run}"
                    scp_dir.mkdir()
                    scp = start_storescp(scp_dir, store_port)
                    try:
                        wait_echo(store_port, "STORESCP", scp)
                        key = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]
                        s = timed(
                            ["movescu", "-S", "-aet", "MOVESCU", "-aec", aec, "-aem", "STORESCP", *key, HOST, str(port)]
                        )
                    finally:
                        stop(scp)
                    got = count_files(scp_dir / "out")
                    if got != args.images:
                        raise RuntimeError(f"C-MOVE from {name} delivered {got} of {args.images}")
                    results.setdefault((name, "C-MOVE"), []).append(args.images / s)
                    get_dir = work / f"get-{name}-{run}"
                    get_dir.mkdir()
                    s = timed(
                        ["getscu", "-S", "-aet", "GETSCU", "-aec", aec, "-od", str(get_dir), *key, HOST, str(port)]
                    )
                    got = count_files(get_dir)
                    if got != args.images:
                        raise RuntimeError(f"C-GET from {name} delivered {got} of {args.images}")
                    results.setdefault((name, "C-GET"), []).append(args.images / s)
                    shutil.rmtree(scp_dir, ignore_errors=True)
                    shutil.rmtree(get_dir, ignore_errors=True)
        finally:
            stop(orthanc)
            server.shutdown()
            archive.engine.dispose()
    print(f"{args.images} images of 512x512 CT, {args.runs} runs each, median images/s (all runs)")
    print(f"{'operation':10} {'radtriage':>10} {'orthanc':>10} {'ratio':>7}")
    for op in ("C-MOVE", "C-GET"):
        ours, theirs = (statistics.median(results[(n, op)]) for n in ("radtriage", "orthanc"))
        runs = (
            " ".join(f"{v:.0f}" for v in results[("radtriage", op)])
            + " | "
            + " ".join(f"{v:.0f}" for v in results[("orthanc", op)])
        )
        print(f"{op:10} {ours:10.0f} {theirs:10.0f} {ours / theirs:6.2f}x   ({runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
