"""Ingest benchmark: the same synthetic CT slices sent by dcmtk ``storescu``
(TCP_NODELAY=1) to radtriage, Orthanc and dcmtk ``storescp``, from one association
(``--senders 1``) or from several at once (``--senders 4``: one storescu per study,
distinct studies, the images split evenly among them).

* radtriage: ``radtriage serve`` as its own process (receiver, archive, index, sweep,
  forwarder, web app; triage off, so no Prefect server competes for the CPUs); fsync of
  every file and of its folder before Success. Twice: ``radtriage`` with ``[dicom]
  workers = "auto"`` (one receiver process per core) and ``radtriage-w1`` with one
  process.
* Orthanc (Debian package): ``SyncStorageArea`` on (fsync), no compression, no plugins.
* storescp: ``+B`` (bytes written as received); it never fsyncs: the upper bound.

Each server's CPU seconds per image (its process and its children, user + system, while
the senders run; radtriage's server and receiver processes) are printed beside its rate.

Runs are interleaved (radtriage, Orthanc, storescp, radtriage, ...), each on fresh
storage. Orthanc 1.10 cannot bind to loopback only, so when run as root the whole
benchmark re-executes itself in a private network namespace (``unshare --net``) where
only ``lo`` exists; otherwise all traffic still goes to 127.0.0.1 only.

Usage: ``python benchmarks/ingest.py [--senders 1] [--images 320] [--runs 3]`` (``make bench``
runs ``--senders 1`` and ``--senders 4``). ``--baseline DIR`` adds the ``radtriage serve`` of
another source tree (the tree before a change) to the same interleaved runs: on a shared,
loaded machine only such side-by-side figures say whether a change helped.
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
from dataclasses import dataclass
from functools import partial
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


def start_radtriage(
    storage: Path, port: int, web_port: int = 0, workers: int | str = "auto", checkout: Path = ROOT
) -> subprocess.Popen[bytes]:
    """``radtriage serve`` on ``storage`` (config in ``radtriage.toml`` there), its web app on
    ``web_port`` (0: any free port; ``benchmarks/dicomweb.py`` gives its own), with
    ``[dicom] workers`` receiver processes, from the source tree ``checkout``."""
    cfg = storage / "radtriage.toml"
    cfg.write_text(
        f'[dicom]\nae_title = "RADTRIAGE"\nbind = "{HOST}"\nport = {port}\nallowed_aes = ["*"]\n'
        f"workers = {json.dumps(workers)}\n"
        f'[storage]\ndata_dir = "{storage / "data"}"\nfsync = true\n'
        f"[triage]\nenabled = false\nstable_age_seconds = 3600\n"  # ingest only: no Prefect server
        f'[web]\nbind = "{HOST}"\nport = {web_port or free_port()}\n'
    )
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--config", str(cfg), "serve"],
        env=ENV,
        cwd=checkout,
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
    # Orthanc: its files are named by 36-character ids; the SQLite index lies beside them.
    "orthanc": ("ORTHANC", start_orthanc, lambda s: sum(1 for p in (s / "db").rglob("*") if len(p.name) == 36)),
    "storescp": ("STORESCP", start_storescp, lambda s: count_files(s / "out")),
}


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its children so far (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        # after the command: state ppid ... utime (14th field of stat) is fields[11]
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


@dataclass
class RunResult:
    images_per_second: float
    cpu_per_image: float | None  # the server's process tree, user + system


def one_run(name: str, folders: list[Path], n: int, workdir: Path) -> RunResult:
    """Start ``name`` on fresh storage, send every folder with its own storescu at once."""
    aec, start, counter = TARGETS[name]
    storage = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
    port = free_port()
    proc = start(storage, port)
    cpu = None
    try:
        wait_echo(port, aec, proc)
        if TARGETS[name][0] == "RADTRIAGE":  # the receiver answers first; wait until every component is up
            wait_log(storage / "log.txt", "radtriage running", proc)
        cpu0 = tree_cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        senders = [
            subprocess.Popen(
                ["storescu", "-aet", "STORESCU", "-aec", aec, "--scan-directories", HOST, str(port), str(folder)],
                env=ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for folder in folders
        ]
        failed = [(s.wait(), s.stderr.read() if s.stderr else "") for s in senders]
        elapsed = time.perf_counter() - t0
        cpu = (tree_cpu_seconds(proc.pid) - cpu0) / n
        bad = [err for code, err in failed if code != 0]
        if bad:
            raise RuntimeError(f"storescu to {name} failed: {bad[0][-400:]}")
    finally:
        stop(proc)
    stored = counter(storage)
    if stored != n:
        raise RuntimeError(f"{name} stored {stored} of {n} images (see {storage}/log.txt)")
    shutil.rmtree(storage, ignore_errors=True)
    return RunResult(n / elapsed, cpu)


def make_studies(folder: Path, images: int, senders: int) -> list[Path]:
    """``senders`` distinct studies (own seed, own UIDs) of ``images // senders`` slices each."""
    from pipeline.lab.synth import synth_study

    per = images // senders
    folders = [folder / f"study{i + 1}" for i in range(senders)]
    for i, out in enumerate(folders):
        synth_study(out, seed=2024 + i, slices=per)
    return folders


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    maybe_enter_netns(__file__, argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=320, help="512x512 CT slices per run, in all (default 320)")
    parser.add_argument("--senders", type=int, default=1, help="storescu associations at once, one study each")
    parser.add_argument("--runs", type=int, default=3, help="runs per target, interleaved (default 3)")
    parser.add_argument(
        "--targets",
        default="radtriage,radtriage-w1,orthanc,storescp",
        help="comma-separated; radtriage-w<N> runs N receiver processes",
    )
    parser.add_argument("--no-netns", action="store_true", help="do not enter a private network namespace")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another source tree (e.g. a checkout of the previous commit): adds target 'baseline', "
        "its radtriage serve with workers auto, to compare a change within one interleaved run",
    )
    args = parser.parse_args(argv)
    if args.baseline is not None:
        checkout = args.baseline.resolve()
        TARGETS["baseline"] = (
            "RADTRIAGE",
            lambda storage, port: start_radtriage(storage, port, checkout=checkout),
            TARGETS["radtriage"][2],
        )
        if "baseline" not in args.targets:
            args.targets = f"baseline,{args.targets}"
    targets = args.targets.split(",")
    for name in targets:  # radtriage-w<N>: N receiver processes
        if name.startswith("radtriage-w") and name[len("radtriage-w") :].isdigit() and name not in TARGETS:
            TARGETS[name] = (
                "RADTRIAGE",
                partial(start_radtriage, workers=int(name[len("radtriage-w") :])),
                TARGETS["radtriage"][2],
            )
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or args.senders < 1:
        parser.error(f"unknown target(s) {', '.join(unknown)}" if unknown else "--senders must be at least 1")
    with tempfile.TemporaryDirectory(prefix="radtriage-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        folders = make_studies(work / "images", args.images, args.senders)
        n = sum(1 for f in folders for _ in f.iterdir())
        mb = sum(p.stat().st_size for f in folders for p in f.iterdir()) / 1e6
        load = os.getloadavg()[0]
        print(
            f"{n} CT images 512x512 ({mb:.0f} MB), {args.senders} storescu association(s) at once "
            f"(distinct studies), TCP_NODELAY=1, {args.runs} interleaved runs, "
            f"netns={'yes' if os.environ.get('RADTRIAGE_BENCH_NETNS') else 'no'}, "
            f"{os.cpu_count()} cores, load average {load:.1f} at start"
        )
        results: dict[str, list[RunResult]] = {t: [] for t in targets}
        for run in range(args.runs):
            for name in targets:
                result = one_run(name, folders, n, work)
                results[name].append(result)
                cpu = f"  {result.cpu_per_image * 1000:6.2f} ms CPU/image" if result.cpu_per_image is not None else ""
                print(
                    f"run {run + 1} {name:<13} {result.images_per_second:8.1f} images/s{cpu}"
                    f"  (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    med = {t: statistics.median(r.images_per_second for r in v) for t, v in results.items()}
    print(f"\nsenders {args.senders}, median of {args.runs} runs (load average {os.getloadavg()[0]:.1f} at end):")
    for name, rate in med.items():
        cpus = [r.cpu_per_image for r in results[name] if r.cpu_per_image is not None]
        cpu = f"  {statistics.median(cpus) * 1000:6.2f} ms CPU/image" if cpus else ""
        print(f"  {name:<13} {rate:8.1f} images/s{cpu}")
    ours = [name for name in med if name.startswith("radtriage")]
    for mine in [*ours, "baseline"]:
        for other in ("orthanc", "storescp"):
            if mine in med and other in med:
                print(f"{mine}/{other} = {med[mine] / med[other]:.2f}")
    for mine in ours:
        if "baseline" in med:  # the change itself, within the same runs
            print(f"{mine}/baseline = {med[mine] / med['baseline']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
