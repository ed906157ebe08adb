"""Query/Retrieve benchmark: C-FIND, C-MOVE and C-GET against radtriage and Orthanc.

Both servers hold the same data, sent to each by dcmtk ``storescu`` (``--load-associations``
parallel associations per server, both servers loaded at the same time):

* ``--studies`` (10,000) tiny studies for C-FIND: one 8x8 CT instance each (header and a
  128-byte pixel matrix), one patient per study, names ``SURNAME^GIVEN`` from 100
  surnames x 100 given names (so ``SURNAME*`` matches 1 % of the studies), StudyDate
  spread over ten years (about 2.7 studies a day). The files are written once by
  pydicom and cached under ``.cache/qr-bench/`` (``--cache``);
* one synthetic CT study of ``--images`` 512x512 slices for C-MOVE and C-GET.

Then, interleaved (radtriage, Orthanc, radtriage, ...):

* C-FIND at STUDY level, Study Root, by dcmtk ``findscu -S`` (a new process and
  association per query, the same for both): ``--finds`` PatientName wildcards
  (``SURNAME*``, a different surname each time) and as many StudyDate ranges (one
  calendar month each), each asking for PatientName, PatientID, StudyInstanceUID,
  StudyDate, AccessionNumber, StudyDescription, ModalitiesInStudy and
  NumberOfStudyRelatedInstances; median and p95 latency, and the number of matches,
  which must be the same from both;
* C-MOVE: dcmtk ``movescu -S`` of the study to a dcmtk ``storescp`` (``+B``, no fsync);
* C-GET: dcmtk ``getscu -S`` of the study (getscu stores what comes back itself).

radtriage runs as its own process (:func:`pipeline.dicom.receiver.start_receiver`, with the
retrieve contexts and handlers, the way ``radtriage serve`` composes them: :data:`SERVE`);
Orthanc is the Debian package with synced storage, no compression, no plugins. Everything
goes to 127.0.0.1 with ``TCP_NODELAY=1``; as root the benchmark re-executes itself in a
private network namespace (see ``benchmarks/ingest.py``). Beside images/s, the server
CPU per retrieve (user + system of the server process, from ``/proc``) is printed.

``--baseline DIR`` adds the radtriage of another source tree (e.g. ``git worktree add
/tmp/base HEAD``) to the same interleaved runs: on a shared, loaded machine only such
side-by-side figures say whether a change helped. ``--profile DIR`` then records one more
C-MOVE and C-GET of each radtriage with ``py-spy`` (collapsed stacks, ``--nonblocking``).

Usage: ``python benchmarks/query_retrieve.py [--studies 10000] [--finds 40] [--images 300] [--runs 3]
[--baseline DIR] [--profile DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date, timedelta
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ingest  # noqa: E402 - the ingest benchmark's Orthanc, beside this file
from netns import maybe_enter_netns  # noqa: E402 - the benchmarks' own helper, beside this file

from benchmarks.ingest import ENV, HOST, count_files, start_storescp, stop, wait_echo  # noqa: E402
from pipeline.triage.prefect_server import free_port  # noqa: E402

# The radtriage server of a source tree (argv: tree, storage, storescp port), in its own
# process so that its CPU can be read and a baseline tree can run beside it: that tree's
# own start_radtriage, its port on stdout; then for each line on stdin its CPU seconds so
# far (getrusage: exact, and with the threads that have ended), until stdin closes.
SERVE = """
import logging, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1] + "/benchmarks")
import query_retrieve
logging.basicConfig(level=logging.ERROR)
server, archive = query_retrieve.start_radtriage(Path(sys.argv[2]), int(sys.argv[3]))
print(server.server_address[1], flush=True)
for _ in sys.stdin:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(usage.ru_utime, usage.ru_stime, flush=True)
server.shutdown()
archive.engine.dispose()
"""


def serve(tree: Path, storage: Path, store_port: int) -> tuple[subprocess.Popen[str], int]:
    """:data:`SERVE` for ``tree``: the process and the DICOM port it listens on."""
    storage.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(tree), str(storage), str(store_port)],
        env=ENV,
        cwd=tree,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(storage / "log.txt").open("wb"),
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.strip().isdigit():
        raise RuntimeError(f"radtriage of {tree} did not start: see {storage / 'log.txt'}")
    return proc, int(line)


def cpu_seconds(proc: subprocess.Popen[str]) -> tuple[float, float]:
    """User and system CPU seconds of a :data:`SERVE` process so far."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    user, system = proc.stdout.readline().split()
    return float(user), float(system)


def stat_cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` (``/proc``, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


Cpu = Callable[[], tuple[float, float]]


def end(proc: subprocess.Popen[str]) -> None:
    if proc.stdin:
        proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_orthanc(storage: Path, port: int, store_port: int) -> subprocess.Popen[bytes]:
    """Orthanc as in ``benchmarks/ingest.py``, plus the storescp destination and the SCUs."""
    return ingest.start_orthanc(
        storage,
        port,
        {
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "DicomModalities": {"storescp": ["STORESCP", HOST, store_port], "getscu": ["GETSCU", HOST, 104]},
        },
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
        {"ae_title": "FINDSCU", "host": HOST, "port": 104, "allow": ["query"]},
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


SURNAMES = [f"{a}{b}{c}" for a in "BCDFGHKLMN" for b in "AEIOU" for c in ("RN", "LT")]  # 100, none a prefix of another
GIVEN = [f"{a}{b}" for a in "ABCDEFGHIJ" for b in "AEIOUYLMNR"]  # 100
FIRST_DAY = date(2015, 1, 1)
DAYS = 3650
FIND_KEYS = [
    "PatientID",
    "StudyInstanceUID",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
]
GENERATOR_VERSION = 1  # bump when the generated studies change, so the cache is rebuilt


def find_study_files(cache: Path, n: int, shards: int) -> list[Path]:
    """``n`` one-instance studies in ``shards`` folders under ``cache`` (written once, then reused)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    root = cache / f"find-studies-v{GENERATOR_VERSION}-{n}-{shards}"
    done = root / "complete"
    folders = [root / f"shard{k}" for k in range(shards)]
    if done.exists():
        return folders
    shutil.rmtree(root, ignore_errors=True)
    for folder in folders:
        folder.mkdir(parents=True)
    pixels = np.zeros((8, 8), dtype=np.uint16).tobytes()
    for i in range(n):
        uid = {part: generate_uid(entropy_srcs=["qr-bench", str(i), part]) for part in ("sop", "study", "series")}
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid["sop"]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName = f"{SURNAMES[i % 100]}^{GIVEN[(i // 100) % 100]}"
        ds.PatientID = f"QRB{i:06d}"
        ds.PatientBirthDate = f"{1930 + i % 70}0101"
        ds.PatientSex = "MF"[i % 2]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uid["study"], uid["series"]
        ds.StudyDate = ds.SeriesDate = (FIRST_DAY + timedelta(days=(i * 37) % DAYS)).strftime("%Y%m%d")
        ds.StudyTime = f"{8 + i % 10:02d}{i % 60:02d}00"
        ds.AccessionNumber = f"ACC{i:07d}"
        ds.StudyID = str(i % 1000)
        ds.StudyDescription = "CT HEAD"
        ds.ReferringPhysicianName = "REF^DOCTOR"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, 1
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        ds.save_as(folders[i % shards] / f"{i:06d}.dcm", enforce_file_format=True)
    done.touch()
    return folders


def load(targets: dict[str, tuple[str, int]], folders: list[Path]) -> float:
    """Send every file in ``folders`` to every target, one storescu per (target, folder), all at once."""
    t0 = time.perf_counter()
    procs = [
        (
            name,
            subprocess.Popen(
                ["storescu", "-aec", aec, "--scan-directories", HOST, str(port), str(folder)],
                env=ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            ),
        )
        for name, (aec, port) in targets.items()
        for folder in folders
    ]
    for name, proc in procs:
        _, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"loading {name} failed: {err.decode(errors='replace')[-600:]}")
    return time.perf_counter() - t0


def findscu(aec: str, port: int, keys: dict[str, str]) -> tuple[float, int]:
    """One C-FIND at STUDY level (Study Root) by dcmtk findscu: seconds and number of matches."""
    cmd = ["findscu", "-v", "-S", "-aet", "FINDSCU", "-aec", aec, "-k", "QueryRetrieveLevel=STUDY"]
    for key, value in {**keys, **{k: "" for k in FIND_KEYS}}.items():
        cmd += ["-k", f"{key}={value}" if value else key]
    t0 = time.perf_counter()
    done = subprocess.run([*cmd, HOST, str(port)], env=ENV, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    out = done.stdout + done.stderr
    if done.returncode != 0 or "Success" not in out:
        raise RuntimeError(f"findscu to {aec} failed: {out[-600:]}")
    return elapsed, out.count("(Pending)")


def find_queries(n: int) -> dict[str, list[dict[str, str]]]:
    """``n`` PatientName wildcards and ``n`` one-month StudyDate ranges, each different."""
    months = [(FIRST_DAY.year + m // 12, m % 12 + 1) for m in range(0, 120, max(1, 120 // n))][:n]
    ranges = []
    for year, month in months:
        end = (date(year + month // 12, month % 12 + 1, 1) - timedelta(days=1)).strftime("%Y%m%d")
        ranges.append({"PatientName": "", "StudyDate": f"{year}{month:02d}01-{end}"})
    names = [{"PatientName": f"{SURNAMES[(k * 7) % 100]}*", "StudyDate": ""} for k in range(n)]
    return {"PatientName wildcard": names, "StudyDate range": ranges}


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {(done.stdout + done.stderr)[-600:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    maybe_enter_netns(__file__, argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300, help="512x512 CT slices in the study (default 300)")
    parser.add_argument("--runs", type=int, default=3, help="C-MOVE/C-GET runs per server, interleaved")
    parser.add_argument("--studies", type=int, default=10_000, help="one-instance studies for C-FIND (10000)")
    parser.add_argument("--finds", type=int, default=40, help="C-FIND queries of each kind per server (40)")
    parser.add_argument("--load-associations", type=int, default=4, help="parallel storescu per server to load")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "qr-bench", help="generated files")
    parser.add_argument("--no-netns", action="store_true", help="do not enter a private network namespace")
    parser.add_argument("--baseline", type=Path, help="another source tree: its radtriage runs beside, as 'baseline'")
    parser.add_argument("--profile", type=Path, help="py-spy stacks of one more C-MOVE and C-GET per radtriage")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.ERROR)
    import pydicom

    from pipeline.lab.synth import synth_study

    t0 = time.perf_counter()
    folders = find_study_files(args.cache, args.studies, args.load_associations)
    generated = time.perf_counter() - t0
    trees = {"radtriage": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="radtriage-qr-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        images = work / "images"
        synth_study(images, seed=2024, slices=args.images)
        study_uid = str(pydicom.dcmread(next(images.iterdir()), stop_before_pixels=True).StudyInstanceUID)
        store_port = free_port()
        (work / "orthanc").mkdir()
        orthanc_port = free_port()
        orthanc = start_orthanc(work / "orthanc", orthanc_port, store_port)
        servers = {name: serve(tree, work / name, store_port) for name, tree in trees.items()}
        ports = {name: ("RADTRIAGE", port) for name, (_, port) in servers.items()}
        ports["orthanc"] = ("ORTHANC", orthanc_port)
        pids = {**{name: proc.pid for name, (proc, _) in servers.items()}, "orthanc": orthanc.pid}
        cpus: dict[str, Cpu] = {name: partial(cpu_seconds, proc) for name, (proc, _) in servers.items()}
        cpus["orthanc"] = partial(stat_cpu_seconds, orthanc.pid)
        results: dict[tuple[str, str], list[float]] = {}
        matches: dict[tuple[str, str], list[int]] = {}
        try:
            wait_echo(orthanc_port, "ORTHANC", orthanc)
            loaded = load(ports, folders)
            for aec, port in ports.values():
                timed(["storescu", "-aec", aec, "--scan-directories", HOST, str(port), str(images)])
            for kind, queries in find_queries(args.finds).items():
                for keys in queries:
                    for name, (aec, port) in ports.items():
                        seconds, count = findscu(aec, port, keys)
                        results.setdefault((name, kind), []).append(seconds)
                        matches.setdefault((name, kind), []).append(count)
                for name in trees:
                    if matches[(name, kind)] != matches[("orthanc", kind)]:
                        raise RuntimeError(
                            f"{kind}: {name} and Orthanc disagree on the matches: "
                            f"{matches[(name, kind)]} vs {matches[('orthanc', kind)]}"
                        )
            retrieve = Retrieve(work, store_port, study_uid, args.images, results)
            for run in range(args.runs):
                for name, (aec, port) in ports.items():
                    retrieve.once(name, aec, port, pids[name], cpus[name], f"{run}")
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                for name in trees:
                    retrieve.once(name, *ports[name], pids[name], cpus[name], "profile", profile=args.profile / name)
        finally:
            stop(orthanc)
            for proc, _ in servers.values():
                end(proc)
    print(
        f"C-FIND over {args.studies} one-instance studies (+1 CT study), STUDY level, dcmtk findscu -S, "
        f"{args.finds} queries of each kind per server, interleaved; loaded into each by storescu "
        f"({args.load_associations} associations per server, all at once) in {loaded:.0f} s "
        f"(files generated or taken from the cache in {generated:.0f} s); "
        f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end, {os.cpu_count()} cores"
    )
    print(f"{'query':22} {'server':10} {'matches':>8} {'ms median':>10} {'p95':>8} {'ratio':>7} {'p95':>6}")
    for kind in find_queries(1):
        theirs = results[("orthanc", kind)]
        tm, tp = 1000 * statistics.median(theirs), 1000 * p95(theirs)
        for name in trees:
            ours = results[(name, kind)]
            n = statistics.median(matches[(name, kind)])
            om, op = 1000 * statistics.median(ours), 1000 * p95(ours)
            # ratio > 1: radtriage is faster (Orthanc's latency / radtriage's)
            print(f"{kind:22} {name:10} {n:8.0f} {om:10.1f} {op:8.1f} {tm / om:6.2f}x {tp / op:5.2f}x")
        print(f"{kind:22} {'orthanc':10} {n:8.0f} {tm:10.1f} {tp:8.1f}")
    print("(C-FIND ratio: Orthanc's latency / radtriage's, > 1 means radtriage is faster)")
    print()
    print(f"{args.images} images of 512x512 CT, {args.runs} runs each, interleaved; median (all runs)")
    print(
        f"{'operation':10} {'server':10} {'images/s':>9} {'ratio':>7} {'CPU ms':>7} {'of sys':>6} {'min':>5}   per run"
    )
    for op in ("C-MOVE", "C-GET"):
        theirs_s = statistics.median(results[("orthanc", op)])
        for name in (*trees, "orthanc"):
            rate, cpu = results[(name, op)], results[(name, op + " CPU")]
            system = 1000 * statistics.median(results[(name, op + " sys")])
            ratio = f"{statistics.median(rate) / theirs_s:6.2f}x" if name != "orthanc" else ""
            runs = " ".join(f"{v:.0f}" for v in rate) + " | " + " ".join(f"{1000 * v:.0f}" for v in cpu)
            print(
                f"{op:10} {name:10} {statistics.median(rate):9.0f} {ratio:>7} "
                f"{1000 * statistics.median(cpu):7.0f} {system:6.0f} {1000 * min(cpu):5.0f}   ({runs})"
            )
    print("(images/s ratio: radtriage's / Orthanc's, > 1: radtriage is faster. CPU: user + system CPU ms of the")
    print(" server process while the retrieve ran, median; 'of sys': its system part; min: the least CPU of a run,")
    print(" the figure a loaded machine disturbs least; Orthanc's in 10 ms ticks; per run: images/s | CPU ms)")
    return 0


class Retrieve:
    """C-MOVE to storescp and C-GET of the CT study, timed, with the server's CPU."""

    def __init__(
        self, work: Path, store_port: int, study_uid: str, images: int, results: dict[tuple[str, str], list[float]]
    ) -> None:
        self.work, self.store_port, self.study_uid, self.images = work, store_port, study_uid, images
        self.results = results

    def once(self, name: str, aec: str, port: int, pid: int, cpu: Cpu, run: str, profile: Path | None = None) -> None:
        """One C-MOVE and one C-GET from ``name`` (server process ``pid``); images/s and
        server CPU seconds into the results (not for a profiled run), or py-spy stacks
        into ``profile``-move.txt and ``profile``-get.txt."""
        key = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={self.study_uid}"]
        scp_dir = self.work / f"scp-{name}-{run}"
        scp_dir.mkdir()
        scp = start_storescp(scp_dir, self.store_port)
        try:
            wait_echo(self.store_port, "STORESCP", scp)
            move = ["movescu", "-S", "-aet", "MOVESCU", "-aec", aec, "-aem", "STORESCP", *key, HOST, str(port)]
            self._measure(name, "C-MOVE", move, pid, cpu, profile and profile.with_name(profile.name + "-move.txt"))
        finally:
            stop(scp)
        got = count_files(scp_dir / "out")
        if got != self.images:
            raise RuntimeError(f"C-MOVE from {name} delivered {got} of {self.images}")
        get_dir = self.work / f"get-{name}-{run}"
        get_dir.mkdir()
        get = ["getscu", "-S", "-aet", "GETSCU", "-aec", aec, "-od", str(get_dir), *key, HOST, str(port)]
        self._measure(name, "C-GET", get, pid, cpu, profile and profile.with_name(profile.name + "-get.txt"))
        got = count_files(get_dir)
        if got != self.images:
            raise RuntimeError(f"C-GET from {name} delivered {got} of {self.images}")
        shutil.rmtree(scp_dir, ignore_errors=True)
        shutil.rmtree(get_dir, ignore_errors=True)

    def _measure(self, name: str, op: str, cmd: list[str], pid: int, cpu: Cpu, profile: Path | None) -> None:
        spy = None
        if profile is not None:
            # --gil: only samples that hold the GIL, i.e. Python's CPU, not its waits
            spy_args = ["record", "--pid", str(pid), "--rate", "2000", "--threads", "--gil"]
            spy = subprocess.Popen(
                [str(Path(sys.executable).with_name("py-spy")), *spy_args, "--format", "raw", "--output", str(profile)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # attached
        before = cpu()
        seconds = timed(cmd)
        after = cpu()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            return
        self.results.setdefault((name, op), []).append(self.images / seconds)
        self.results.setdefault((name, op + " CPU"), []).append(sum(after) - sum(before))
        self.results.setdefault((name, op + " sys"), []).append(after[1] - before[1])


if __name__ == "__main__":
    sys.exit(main())
