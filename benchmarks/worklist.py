"""Worklist benchmark: the page, the live poll and the JSON API at 5,000 and 50,000 studies.

For each size a fresh SQLite index is seeded with index rows only (``tests/web/bulk.py``:
patient, study, one series, the flow's worklist entry; a department's mix of priorities,
read states, "not applicable" studies and a few in the AI queue; no image files) and
served by the web app in-process on 127.0.0.1 (uvicorn, as ``radtriage serve`` runs it).
One logged-in httpx client with a keep-alive connection asks, ``--loads`` times each
(median, and the size of the answer):

* ``GET /worklist``: the whole page, first page and a page deep in the list;
* ``GET /worklist/rows``: the fragment the page polls, when something changed (200);
* the same with ``If-None-Match`` when nothing changed (304): what each 3-second poll
  of every open worklist costs when the department is quiet;
* ``GET /api/worklist``: one page (``limit`` = ``[web] worklist_page_size``) and a deep
  ``offset``; and ``limit=1000``, about what one answer held before paging;
* in-process, without HTTP: :func:`worklist_version` (the 304's counter) and
  :func:`worklist_page` (one page's queries and rows).

Every request is authenticated and audited, as in production; the times include that.
Usage: ``python benchmarks/worklist.py [--sizes 5000 50000] [--loads 15]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from pipeline.archive import Archive  # noqa: E402
from pipeline.config import Settings  # noqa: E402
from pipeline.index.db import migrate, session_scope  # noqa: E402
from pipeline.web import WebServer  # noqa: E402
from pipeline.web.auth import create_user  # noqa: E402
from pipeline.web.worklist import WorklistFilter, worklist_page, worklist_version  # noqa: E402
from tests.web.bulk import mixed_specs, seed_rows  # noqa: E402

PASSWORD = "benchmark password 1"


def _median_ms(fn: Callable[[], object], loads: int) -> tuple[float, object]:
    fn()  # warm: templates compiled, pages in the cache
    times, last = [], None
    for _ in range(loads):
        start = time.perf_counter()
        last = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, last


def _bench_size(count: int, loads: int, folder: Path) -> list[tuple[str, float, int, str]]:
    settings = Settings(storage={"data_dir": folder / f"n{count}"}, web={"bind": "127.0.0.1", "port": 0})
    migrate(settings.index_url)
    archive = Archive(settings)
    with session_scope(archive.session_factory) as session:
        create_user(session, "bench", PASSWORD, "radiologist")
    started = time.perf_counter()
    seed_rows(archive.session_factory, mixed_specs(count), prefix="BW")
    print(f"  seeded {count:,} studies in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    server = WebServer(settings, archive.session_factory, archive)
    server.start()
    rows: list[tuple[str, float, int, str]] = []
    size = settings.web.worklist_page_size
    try:
        with httpx.Client(base_url=server.url, follow_redirects=False, timeout=60) as client:
            assert client.post("/login", data={"username": "bench", "password": PASSWORD}).status_code == 303
            deep = max(1, count // size // 2)

            def get(path: str, **headers: str) -> httpx.Response:
                response = client.get(path, headers=headers)
                assert response.status_code in (200, 304), (path, response.status_code)
                return response

            def measure(label: str, path: str, **headers: str) -> httpx.Response:
                ms, response = _median_ms(lambda: get(path, **headers), loads)
                assert isinstance(response, httpx.Response)
                note = str(response.status_code)
                if "x-total-count" in response.headers:
                    note += f", {response.headers['x-range-first']}-{response.headers['x-range-last']}"
                    note += f" of {int(response.headers['x-total-count']):,}"
                rows.append((label, ms, len(response.content), note))
                return response

            measure("page /worklist (page 1)", "/worklist")
            measure(f"page /worklist?page={deep}", f"/worklist?page={deep}")
            fragment = measure("rows, changed (200)", "/worklist/rows")
            measure("rows, unchanged (304)", "/worklist/rows", **{"If-None-Match": fragment.headers["etag"]})
            for label, path in (
                (f"api limit={size}", "/api/worklist"),
                (f"api limit={size} offset={deep * size}", f"/api/worklist?offset={deep * size}"),
                ("api limit=1000 (one answer before paging)", "/api/worklist?limit=1000"),
            ):
                response = measure(label, path)
                body = response.json()
                rows[-1] = (*rows[-1][:3], f"{body['count']} of {body['total']:,}")
        with session_scope(archive.session_factory, readonly=True) as session:
            ms, _ = _median_ms(lambda: worklist_version(session), loads)
            rows.append(("in-process worklist_version (ETag counter)", ms, 0, ""))
            ms, page = _median_ms(lambda: worklist_page(session, WorklistFilter(read="recent"), limit=size), loads)
            rows.append(("in-process worklist_page (page 1, default)", ms, 0, f"total {page.total:,}"))  # type: ignore[attr-defined]
    finally:
        server.stop()
        archive.engine.dispose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--loads", type=int, default=15, help="requests per measurement (median)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="worklist-bench-") as tmp:
        for count in args.sizes:
            print(f"{count:,} studies ...", file=sys.stderr)
            results[count] = _bench_size(count, args.loads, Path(tmp))
    width = max(len(label) for rows in results.values() for label, *_ in rows)
    header = f"{'':{width}}" + "".join(f" | {f'{n:,} studies':>28}" for n in results)
    print(header)
    print("-" * len(header))
    for i, (label, *_rest) in enumerate(next(iter(results.values()))):
        cells = []
        for rows in results.values():
            _, ms, size, _note = rows[i]
            cells.append(f" | {ms:9.2f} ms {size / 1024:9.1f} KB" if size else f" | {ms:9.3f} ms {'':12}")
        print(f"{label:{width}}" + "".join(cells))
    print()
    for n, rows in results.items():
        notes = "; ".join(f"{label}: {note}" for label, _, _, note in rows if note)
        print(f"{n:,}: {notes}")


if __name__ == "__main__":
    main()
