"""DICOMweb benchmark: QIDO-RS, WADO-RS metadata and frames, STOW-RS against radtriage
and Orthanc's DICOMweb plugin, both holding the same data, side by side in one run.

* Data, sent to both by dcmtk ``storescu`` as ``benchmarks/query_retrieve.py`` does it
  (``--load-associations`` parallel associations per server, both at once): ``--studies``
  one-instance studies (names ``SURNAME^GIVEN``, dates over ten years; cached under
  ``.cache/qr-bench/``) and one synthetic CT series of ``--images`` 512x512 slices.
* radtriage: ``radtriage serve`` as its own process (fsync on, triage off), its web app on
  127.0.0.1; requests carry an API token (``radtriage token create``), as programs should.
  Orthanc: the Debian package with ``libOrthancDicomWeb.so`` (Debian's orthanc-dicomweb),
  ``SyncStorageArea`` on, no compression, no authentication, keep-alive and TCP_NODELAY.
* Clients: httpx, one keep-alive connection per thread, ``Accept-Encoding: identity``
  (neither server spends time on gzip). Every measurement alternates the servers.

Measured:

(a) QIDO-RS ``/studies``, default attributes, ``limit=100`` on both: ``--queries``
    PatientName wildcards (``SURNAME*``, 1 % of the studies) and as many one-month
    StudyDate ranges; median and p95 latency; the matches must be the same from both;
(b) series metadata of the CT series: the first request, then the median of
    ``--metadata-requests`` more;
(c) frames per second, one request per frame the way OHIF asks
    (``Accept: multipart/related; type="application/octet-stream"; transfer-syntax=*``),
    ``--threads`` concurrent clients, ``--runs`` runs, median;
(d) STOW-RS images per second: a new ``--images`` series per run posted in requests of
    ``--stow-batch`` instances (multipart bodies built before the clock starts).

Ratios are radtriage's speed over Orthanc's: > 1 means radtriage is faster. As root the
benchmark re-executes itself in a private network namespace (see ``benchmarks/netns.py``);
everything goes to 127.0.0.1. ``--max-seconds`` bounds the whole run.

Usage: ``python benchmarks/dicomweb.py [--studies 10000] [--images 300] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from netns import maybe_enter_netns  # noqa: E402 - the benchmarks' own helper, beside this file

from benchmarks.ingest import ENV, HOST, start_orthanc, start_radtriage, stop, wait_echo, wait_log  # noqa: E402
from benchmarks.query_retrieve import find_queries, find_study_files, load, p95  # noqa: E402
from pipeline.triage.prefect_server import free_port  # noqa: E402
from tests.peers.orthanc import DICOMWEB_PLUGIN  # noqa: E402

OHIF_FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
LIMIT = 100
NAMES = ("radtriage", "orthanc")


@dataclass
class Server:
    """One DICOMweb server under test: its root URL and the headers every request carries."""

    name: str
    url: str
    headers: dict[str, str]

    def client(self) -> httpx.Client:
        headers = {"Accept-Encoding": "identity", **self.headers}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server of {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def start_servers(work: Path, stack: list[subprocess.Popen[bytes]]) -> tuple[dict[str, Server], dict[str, int]]:
    """Both servers started and answering; their DICOMweb roots and DICOM ports."""
    dicom = {name: free_port() for name in NAMES}
    web = {name: free_port() for name in NAMES}
    for name in NAMES:
        (work / name).mkdir()
    orthanc = start_orthanc(
        work / "orthanc",
        dicom["orthanc"],
        {
            "HttpPort": web["orthanc"],
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpCompressionEnabled": False,
            "KeepAlive": True,
            "TcpNoDelay": True,
        },
    )
    stack.append(orthanc)
    radtriage = start_radtriage(work / "radtriage", dicom["radtriage"], web["radtriage"])
    stack.append(radtriage)
    wait_echo(dicom["orthanc"], "ORTHANC", orthanc)
    wait_http(f"http://{HOST}:{web['orthanc']}/system", orthanc)
    wait_log(work / "radtriage" / "log.txt", "radtriage running", radtriage)
    wait_http(f"http://{HOST}:{web['radtriage']}/health", radtriage)
    made = subprocess.run(
        [sys.executable, "-m", "pipeline", "--config", str(work / "radtriage" / "radtriage.toml")]
        + ["token", "create", "bench", "--role", "admin"],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if made.returncode != 0:
        raise RuntimeError(f"radtriage token create failed: {made.stderr[-600:]}")
    servers = {
        "radtriage": Server(
            "radtriage",
            f"http://{HOST}:{web['radtriage']}/dicom-web",
            {"Authorization": f"Bearer {made.stdout.strip()}"},
        ),
        "orthanc": Server("orthanc", f"http://{HOST}:{web['orthanc']}/dicom-web", {}),
    }
    return servers, dicom


# -- (a) QIDO-RS ---------------------------------------------------------------------------


def qido(servers: dict[str, Server], queries: int) -> dict[str, dict[str, list[float]]]:
    """Latencies per query kind and server; raises when the servers disagree on a match."""
    latencies: dict[str, dict[str, list[float]]] = {}
    clients = {name: s.client() for name, s in servers.items()}
    try:
        for kind, keys_list in find_queries(queries).items():
            per = latencies.setdefault(kind, {name: [] for name in servers})
            for keys in keys_list:
                params = {k: v for k, v in keys.items() if v} | {"limit": str(LIMIT)}
                # Written out, not percent-encoded: Orthanc 1.10 does not decode %2A to '*'.
                url = "/studies?" + "&".join(f"{k}={v}" for k, v in params.items())
                found: dict[str, set[str]] = {}
                for name, client in clients.items():
                    t0 = time.perf_counter()
                    r = client.get(url, headers={"Accept": "application/dicom+json"})
                    per[name].append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        raise RuntimeError(f"QIDO {params} to {name}: HTTP {r.status_code} {r.text[:300]}")
                    found[name] = {s["0020000D"]["Value"][0] for s in r.json()}
                per.setdefault("matches", []).append(float(len(found["radtriage"])))
                if len(found["radtriage"]) != len(found["orthanc"]) or (
                    len(found["radtriage"]) < LIMIT and found["radtriage"] != found["orthanc"]
                ):
                    raise RuntimeError(
                        f"QIDO {params}: radtriage found {len(found['radtriage'])}, Orthanc {len(found['orthanc'])}"
                    )

    finally:
        for client in clients.values():
            client.close()
    return latencies


# -- (b) series metadata -------------------------------------------------------------------


def metadata(servers: dict[str, Server], study: str, series: str, n: int, more: int) -> dict[str, list[float]]:
    """Per server: the first request's seconds, then ``more`` warm ones."""
    out: dict[str, list[float]] = {name: [] for name in servers}
    clients = {name: s.client() for name, s in servers.items()}
    try:
        for _ in range(more + 1):
            for name, client in clients.items():
                t0 = time.perf_counter()
                r = client.get(
                    f"/studies/{study}/series/{series}/metadata", headers={"Accept": "application/dicom+json"}
                )
                out[name].append(time.perf_counter() - t0)
                items = r.json() if r.status_code == 200 else []
                if len(items) != n or not all("BulkDataURI" in i.get("7FE00010", {}) for i in items):
                    raise RuntimeError(f"{name} series metadata: HTTP {r.status_code}, {len(items)} of {n} instances")
    finally:
        for client in clients.values():
            client.close()
    return out


# -- (c) frames ----------------------------------------------------------------------------


def first_part(r: httpx.Response) -> bytes:
    """The content of the first part of a multipart/related answer."""
    match = re.search(r'boundary="?([^";]+)', r.headers.get("content-type", ""))
    if match is None:
        raise RuntimeError(f"not multipart: {r.headers.get('content-type')!r}")
    delimiter = b"--" + match.group(1).encode()
    chunk = r.content.split(delimiter)[1]
    content = chunk.partition(b"\r\n\r\n")[2]
    return content[:-2] if content.endswith(b"\r\n") else content


def frames_per_second(server: Server, urls: list[str], threads: int, frame_bytes: int) -> float:
    """All ``urls`` fetched once, by ``threads`` clients, each with its own connection."""
    local = threading.local()
    made: list[httpx.Client] = []

    def fetch(url: str) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = server.client()
            made.append(client)
        r = client.get(url, headers={"Accept": OHIF_FRAMES})
        if r.status_code != 200 or len(first_part(r)) != frame_bytes:
            raise RuntimeError(f"{server.name} {url}: HTTP {r.status_code}, {len(r.content)} bytes")

    try:
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(fetch, urls[:threads]):  # open the connections before the clock
                pass
            t0 = time.perf_counter()
            for _ in pool.map(fetch, urls):
                pass
            return len(urls) / (time.perf_counter() - t0)
    finally:
        for client in made:
            client.close()


# -- (d) STOW-RS ---------------------------------------------------------------------------


def stow_bodies(files: list[Path], batch: int) -> list[tuple[bytes, int]]:
    """multipart/related bodies of ``batch`` instances each, with their instance counts."""
    bodies = []
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        parts = [b"--stowbench\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes() + b"\r\n" for f in chunk]
        bodies.append((b"".join(parts) + b"--stowbench--\r\n", len(chunk)))
    return bodies


def stow(server: Server, bodies: list[tuple[bytes, int]]) -> float:
    content_type = 'multipart/related; type="application/dicom"; boundary=stowbench'
    with server.client() as client:
        t0 = time.perf_counter()
        for body, count in bodies:
            r = client.post(
                "/studies", content=body, headers={"Content-Type": content_type, "Accept": "application/dicom+json"}
            )
            stored = r.json().get("00081199", {}).get("Value", []) if r.status_code == 200 else []
            if len(stored) != count:
                raise RuntimeError(f"STOW to {server.name}: HTTP {r.status_code}, {len(stored)} of {count} stored")
        elapsed = time.perf_counter() - t0
    return sum(count for _, count in bodies) / elapsed


# -- the run -------------------------------------------------------------------------------


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:5.2f}x" if theirs else "  -  "


def _out_of_time(signum: int, frame: object) -> None:
    raise TimeoutError("the benchmark ran past --max-seconds; the servers are being stopped")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    maybe_enter_netns(__file__, argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10_000, help="one-instance studies for QIDO (10000)")
    parser.add_argument("--queries", type=int, default=50, help="QIDO queries of each kind per server (50)")
    parser.add_argument("--images", type=int, default=300, help="512x512 CT slices of the series (300)")
    parser.add_argument("--metadata-requests", type=int, default=10, help="warm metadata requests (10)")
    parser.add_argument("--threads", type=int, default=4, help="concurrent frame clients (4)")
    parser.add_argument("--runs", type=int, default=3, help="frame and STOW runs per server (3)")
    parser.add_argument("--stow-batch", type=int, default=50, help="instances per STOW-RS request (50)")
    parser.add_argument("--load-associations", type=int, default=4, help="parallel storescu per server to load")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "qr-bench", help="generated files")
    parser.add_argument("--max-seconds", type=int, default=1800, help="stop everything after this long")
    parser.add_argument("--no-netns", action="store_true", help="do not enter a private network namespace")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(args.max_seconds)
    import logging

    logging.basicConfig(level=logging.ERROR)
    import pydicom

    from pipeline.lab.synth import synth_study

    folders = find_study_files(args.cache, args.studies, args.load_associations)
    stack: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="radtriage-dicomweb-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        ct = synth_study(work / "ct", seed=2024, slices=args.images)
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct]
        study, series = str(headers[0].StudyInstanceUID), str(headers[0].SeriesInstanceUID)
        frame_bytes = int(headers[0].Rows) * int(headers[0].Columns) * int(headers[0].BitsAllocated) // 8
        base = f"/studies/{study}/series/{series}/instances/"
        urls = [base + f"{h.SOPInstanceUID}/frames/1" for h in headers]
        stow_series = [
            synth_study(work / f"stow{run}", seed=3000 + run, slices=args.images) for run in range(args.runs)
        ]
        try:
            servers, dicom = start_servers(work, stack)
            ports = {"radtriage": ("RADTRIAGE", dicom["radtriage"]), "orthanc": ("ORTHANC", dicom["orthanc"])}
            loaded = load(ports, [*folders, work / "ct"])
            q = qido(servers, args.queries)
            meta = metadata(servers, study, series, args.images, args.metadata_requests)
            fps: dict[str, list[float]] = {name: [] for name in servers}
            stows: dict[str, list[float]] = {name: [] for name in servers}
            for run in range(args.runs):
                for name, server in servers.items():
                    fps[name].append(frames_per_second(server, urls, args.threads, frame_bytes))
                bodies = stow_bodies(stow_series[run], args.stow_batch)
                for name, server in servers.items():
                    stows[name].append(stow(server, bodies))
                del bodies
            same = _same_frame(servers, urls[len(urls) // 2])
        finally:
            signal.alarm(0)
            for proc in reversed(stack):
                stop(proc)
    _report(args, loaded, q, meta, fps, stows, same)
    return 0


def _same_frame(servers: dict[str, Server], url: str) -> bool:
    frames = []
    for server in servers.values():
        with server.client() as client:
            frames.append(first_part(client.get(url, headers={"Accept": OHIF_FRAMES})))
    return frames[0] == frames[1]


def _report(
    args: argparse.Namespace,
    loaded: float,
    q: dict[str, dict[str, list[float]]],
    meta: dict[str, list[float]],
    fps: dict[str, list[float]],
    stows: dict[str, list[float]],
    same: bool,
) -> None:
    med: Callable[[list[float]], float] = statistics.median
    print(
        f"DICOMweb, radtriage (radtriage serve, API token) vs Orthanc 1.10 + DICOMweb plugin 1.7, loopback, "
        f"netns={'yes' if os.environ.get('RADTRIAGE_BENCH_NETNS') else 'no'}; {args.studies} one-instance studies "
        f"+ one {args.images}-slice 512x512 CT series, loaded into both by storescu in {loaded:.0f} s"
    )
    print("ratio = radtriage speed / Orthanc speed (> 1: radtriage faster)\n")
    print(f"(a) QIDO-RS /studies, default attributes, limit={LIMIT}, {args.queries} queries of each kind")
    print(f"{'query':22} {'matches':>7} {'radtriage ms':>19} {'orthanc ms':>19} {'ratio':>13}")
    print(f"{'':22} {'':7} {'median':>9} {'p95':>9} {'median':>9} {'p95':>9} {'median':>6} {'p95':>6}")
    for kind, per in q.items():
        ours, theirs = per["radtriage"], per["orthanc"]
        om, op, tm, tp = (1000 * v for v in (med(ours), p95(ours), med(theirs), p95(theirs)))
        print(
            f"{kind:22} {med(per['matches']):7.0f} {om:9.1f} {op:9.1f} {tm:9.1f} {tp:9.1f} "
            f"{ratio(tm, om)} {ratio(tp, op)}"
        )
    print(f"\n(b) series metadata, {args.images} instances")
    print(f"{'request':22} {'radtriage ms':>12} {'orthanc ms':>12} {'ratio':>7}")
    first = {n: 1000 * v[0] for n, v in meta.items()}
    warm = {n: 1000 * med(v[1:]) for n, v in meta.items()}
    print(
        f"{'first':22} {first['radtriage']:12.1f} {first['orthanc']:12.1f} {ratio(first['orthanc'], first['radtriage'])}"
    )
    label = f"warm, median of {args.metadata_requests}"
    print(f"{label:22} {warm['radtriage']:12.1f} {warm['orthanc']:12.1f} {ratio(warm['orthanc'], warm['radtriage'])}")
    print(f"\n(c, d) {args.runs} runs each, median (all runs)")
    print(f"{'operation':34} {'radtriage':>10} {'orthanc':>10} {'ratio':>7}")
    rows = [
        (f"frames/s, {args.threads} threads, 1 frame/request", fps),
        (f"STOW-RS images/s, {args.stow_batch} per request", stows),
    ]
    for label, values in rows:
        ours, theirs = med(values["radtriage"]), med(values["orthanc"])
        runs = (
            " ".join(f"{v:.0f}" for v in values["radtriage"]) + " | " + " ".join(f"{v:.0f}" for v in values["orthanc"])
        )
        print(f"{label:34} {ours:10.1f} {theirs:10.1f} {ratio(ours, theirs)}   ({runs})")
    print(f"\nthe same frame from both: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    sys.exit(main())
