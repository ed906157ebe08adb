"""QIDO-RS and WADO-RS against the running web server, with httpx and with the real
``dicomweb-client`` package (nobody here wrote it)."""

from __future__ import annotations

import io
import re
import time

import httpx
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import select

from pipeline.index.accounts import AuditEvent
from pipeline.index.db import session_scope

from .conftest import PASSWORD, WebEnv

pytestmark = pytest.mark.slow

OHIF_FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


@pytest.fixture(scope="module")
def http(web: WebEnv) -> httpx.Client:
    with httpx.Client(base_url=web.url + "/dicom-web", auth=("alice", PASSWORD), timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def dicomweb(web: WebEnv) -> DICOMwebClient:
    session = requests.Session()
    session.auth = ("alice", PASSWORD)
    return DICOMwebClient(url=web.url + "/dicom-web", session=session)


def _value(item: dict, tag: str) -> object:
    return item.get(tag, {}).get("Value", [None])[0]


def parts_of(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart/related body the strict way: it must start with the boundary."""
    boundary = re.search(r"boundary=\"?([^\";]+)", response.headers["content-type"]).group(1).encode()
    body = response.content
    assert body.startswith(b"--" + boundary + b"\r\n"), body[:80]
    assert body.rstrip().endswith(b"--" + boundary + b"--")
    parts = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, content = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        parts.append(({k.lower(): v for k, v in headers.items()}, content[:-2]))
    return parts


# -- QIDO-RS -------------------------------------------------------------------------------


def test_study_search_returns_the_archive_with_default_attributes(web: WebEnv, http: httpx.Client) -> None:
    r = http.get("/studies", headers={"Accept": "application/dicom+json"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    studies = {_value(s, "0020000D"): s for s in r.json()}
    assert web.bleed.StudyInstanceUID in studies and web.routine.StudyInstanceUID in studies
    bleed = studies[web.bleed.StudyInstanceUID]
    assert bleed["00100010"]["Value"] == [{"Alphabetic": "Garcia^Maria"}]
    assert _value(bleed, "00080050") == "ACC1003"
    assert set(bleed["00080061"]["Value"]) >= {"CT", "SEG", "SR"}
    assert _value(bleed, "00201208") == len(web.bleed.sop_uids) + 2  # + SEG + SR
    assert _value(bleed, "00081190") == f"{web.url}/dicom-web/studies/{web.bleed.StudyInstanceUID}"


def test_matching_is_the_c_find_engine(web: WebEnv, http: httpx.Client) -> None:
    by_name = http.get("/studies", params={"PatientName": "garc*"}).json()
    assert [_value(s, "0020000D") for s in by_name] == [web.bleed.StudyInstanceUID]
    by_tag = http.get("/studies", params={"00100010": "GARCIA^MARIA"}).json()
    assert len(by_tag) == 1
    uids = f"{web.bleed.StudyInstanceUID},{web.routine.StudyInstanceUID}"
    assert len(http.get("/studies", params={"StudyInstanceUID": uids}).json()) == 2
    date = _value(by_name[0], "00080020")
    assert len(http.get("/studies", params={"StudyDate": f"{date}-"}).json()) >= 1
    assert http.get("/studies", params={"StudyDate": "-19000101"}).json() == []
    with_seg = http.get("/studies", params={"ModalitiesInStudy": "SEG"}).json()
    assert web.bleed.StudyInstanceUID in {_value(s, "0020000D") for s in with_seg}
    assert web.pending.StudyInstanceUID not in {_value(s, "0020000D") for s in with_seg}


def test_includefield_limit_offset_and_fuzzymatching(http: httpx.Client) -> None:
    everything = http.get("/studies").json()
    first = http.get("/studies", params={"limit": 1}).json()
    second = http.get("/studies", params={"limit": 1, "offset": 1}).json()
    assert first == everything[:1] and second == everything[1:2]
    assert "00080080" not in everything[0]
    institution = http.get("/studies", params={"includefield": "InstitutionName,00081030"}).json()
    assert "00080080" in institution[0] and "00081030" in institution[0]
    assert "00080080" in http.get("/studies", params={"includefield": "all"}).json()[0]
    r = http.get("/studies", params={"fuzzymatching": "true", "PatientName": "novak*"})
    assert r.status_code == 200 and len(r.json()) == 1
    assert "fuzzymatching" in r.headers["warning"] and r.headers["warning"].startswith("299 ")


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"limit": "ten"}, "limit"),
        ({"NoSuchKeyword": "x"}, "NoSuchKeyword"),
        ({"StudyDate": "2024-13"}, "StudyDate"),
        ({"SOPInstanceUID": "1.2.3"}, "below the study"),
        ({"00081032.00080100": "x"}, "sequences"),
        ({"fuzzymatching": "maybe"}, "fuzzymatching"),
    ],
)
def test_bad_parameters_get_400_with_a_reason(http: httpx.Client, params: dict[str, str], says: str) -> None:
    r = http.get("/studies", params=params)
    assert r.status_code == 400, r.text
    assert says in r.json()["detail"]


def test_series_and_instance_searches(web: WebEnv, http: httpx.Client) -> None:
    study = web.bleed.StudyInstanceUID
    series = http.get(f"/studies/{study}/series").json()
    modalities = sorted(_value(s, "00080060") for s in series)
    assert modalities == ["CT", "SEG", "SR"]
    ct = next(s for s in series if _value(s, "00080060") == "CT")
    assert _value(ct, "0020000E") == web.bleed.SeriesInstanceUID
    assert _value(ct, "00201209") == len(web.bleed.sop_uids)
    instances = http.get(f"/studies/{study}/series/{web.bleed.SeriesInstanceUID}/instances").json()
    assert sorted(_value(i, "00080018") for i in instances) == sorted(web.bleed.sop_uids)
    assert _value(instances[0], "00081190").endswith(f"/instances/{_value(instances[0], '00080018')}")
    across = http.get("/instances", params={"SOPInstanceUID": web.bleed.seg_uid}).json()
    assert [_value(i, "0020000D") for i in across] == [study]  # relational: the study comes along
    all_segs = http.get("/series", params={"Modality": "SEG"}).json()
    assert {_value(s, "0020000D") for s in all_segs} >= {study, web.routine.StudyInstanceUID}


def test_search_needs_a_login_and_json(web: WebEnv) -> None:
    r = httpx.get(web.url + "/dicom-web/studies")
    assert r.status_code == 401 and "Basic" in r.headers["www-authenticate"]
    r = httpx.get(web.url + "/dicom-web/studies", auth=("alice", "wrong password"))
    assert r.status_code == 401
    r = httpx.get(web.url + "/dicom-web/studies", auth=("alice", PASSWORD), headers={"Accept": "application/dicom+xml"})
    assert r.status_code == 406


# -- WADO-RS -------------------------------------------------------------------------------


def test_instance_retrieval_is_the_stored_file(web: WebEnv, http: httpx.Client) -> None:
    sop = web.bleed.sop_uids[3]
    url = f"/studies/{web.bleed.StudyInstanceUID}/series/{web.bleed.SeriesInstanceUID}/instances/{sop}"
    r = http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert r.status_code == 200, r.text
    [(headers, content)] = parts_of(r)
    assert headers["content-type"].startswith("application/dicom")
    assert content == web.archive.path_of(sop).read_bytes()


def test_study_retrieval_has_every_instance(web: WebEnv, http: httpx.Client) -> None:
    r = http.get(
        f"/studies/{web.bleed.StudyInstanceUID}", headers={"Accept": "multipart/related; type=application/dicom"}
    )
    assert r.status_code == 200
    got = {pydicom.dcmread(io.BytesIO(c)).SOPInstanceUID for _, c in parts_of(r)}
    assert got == {*web.bleed.sop_uids, web.bleed.seg_uid, web.bleed.sr_uid}


def test_a_compressed_syntax_we_cannot_produce_is_406(web: WebEnv, http: httpx.Client) -> None:
    r = http.get(
        f"/studies/{web.bleed.StudyInstanceUID}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'},
    )
    assert r.status_code == 406 and "transfer-syntax=*" in r.json()["detail"]
    assert (
        http.get(
            "/studies/1.2.3.4.5.6.7.8.9", headers={"Accept": "multipart/related; type=application/dicom"}
        ).status_code
        == 404
    )


def test_implicit_little_endian_on_request(web: WebEnv, http: httpx.Client) -> None:
    sop = web.bleed.sop_uids[0]
    url = f"/studies/{web.bleed.StudyInstanceUID}/series/{web.bleed.SeriesInstanceUID}/instances/{sop}"
    r = http.get(
        url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2'}
    )
    [(headers, content)] = parts_of(r)
    assert "1.2.840.10008.1.2" in headers["content-type"]
    sent, stored = pydicom.dcmread(io.BytesIO(content)), pydicom.dcmread(web.archive.path_of(sop))
    assert sent.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert np.array_equal(sent.pixel_array, stored.pixel_array) and sent.PatientName == stored.PatientName


def test_series_metadata_has_bulk_data_uris_and_is_cached(web: WebEnv, http: httpx.Client) -> None:
    url = f"/studies/{web.bleed.StudyInstanceUID}/series/{web.bleed.SeriesInstanceUID}/metadata"
    r = http.get(url, headers={"Accept": "application/dicom+json"})
    assert r.status_code == 200
    items = r.json()
    assert len(items) == len(web.bleed.sop_uids)
    assert "InlineBinary" not in r.text
    pixel = items[0]["7FE00010"]
    assert set(pixel) == {"vr", "BulkDataURI"}
    assert pixel["BulkDataURI"].startswith(web.url + "/dicom-web/studies/")
    folder = web.settings.storage.data_dir / "cache" / "dicomweb-metadata" / web.bleed.SeriesInstanceUID
    cached = [p for p in folder.glob("*.json") if not p.name.endswith(".frames.json")]
    assert len(cached) == 1
    assert http.get(url).json() == items
    # The bulk data URI gives the pixels back.
    sop = _value(items[0], "00080018")
    bulk = http.get(pixel["BulkDataURI"], headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    [(_, content)] = parts_of(bulk)
    assert content == pydicom.dcmread(web.archive.path_of(sop)).PixelData


def test_study_metadata_covers_seg_and_sr(web: WebEnv, http: httpx.Client) -> None:
    items = http.get(f"/studies/{web.bleed.StudyInstanceUID}/metadata").json()
    assert {_value(i, "00080060") for i in items} == {"CT", "SEG", "SR"}
    sr = next(i for i in items if _value(i, "00080060") == "SR")
    assert "0040A730" in sr  # the content tree is inline, not bulk data


def test_frames_as_ohif_asks(web: WebEnv, http: httpx.Client) -> None:
    sop = web.bleed.sop_uids[5]
    base = f"/studies/{web.bleed.StudyInstanceUID}/series/{web.bleed.SeriesInstanceUID}/instances/{sop}"
    r = http.get(base + "/frames/1", headers={"Accept": OHIF_FRAMES})
    assert r.status_code == 200, r.text
    [(headers, content)] = parts_of(r)
    assert headers["content-type"].startswith("application/octet-stream")
    assert content == pydicom.dcmread(web.archive.path_of(sop)).PixelData
    assert http.get(base + "/frames/2", headers={"Accept": OHIF_FRAMES}).status_code == 404
    assert http.get(base + "/frames/x", headers={"Accept": OHIF_FRAMES}).status_code == 400


def test_seg_frames_are_bit_exact(web: WebEnv, http: httpx.Client) -> None:
    seg = pydicom.dcmread(web.archive.path_of(web.bleed.seg_uid))
    series = seg.SeriesInstanceUID
    url = f"/studies/{web.bleed.StudyInstanceUID}/series/{series}/instances/{web.bleed.seg_uid}/frames/1,2"
    parts = parts_of(http.get(url, headers={"Accept": OHIF_FRAMES}))
    frames = seg.pixel_array if int(seg.NumberOfFrames) > 1 else seg.pixel_array[np.newaxis]
    for (_, content), frame in zip(parts, frames[:2], strict=True):
        bits = np.unpackbits(np.frombuffer(content, np.uint8), bitorder="little")[: frame.size]
        assert np.array_equal(bits.reshape(frame.shape), frame)


def test_rendered_and_thumbnail(web: WebEnv, http: httpx.Client) -> None:
    from PIL import Image

    sop = web.bleed.sop_uids[5]
    base = f"/studies/{web.bleed.StudyInstanceUID}/series/{web.bleed.SeriesInstanceUID}/instances/{sop}"
    png = http.get(base + "/rendered", params={"window": "40,80,linear"}, headers={"Accept": "image/png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    ds = pydicom.dcmread(web.archive.path_of(sop))
    assert Image.open(io.BytesIO(png.content)).size == (ds.Columns, ds.Rows)
    jpeg = http.get(base + "/frames/1/rendered", params={"viewport": "56,56"}, headers={"Accept": "image/jpeg"})
    assert jpeg.headers["content-type"] == "image/jpeg" and max(Image.open(io.BytesIO(jpeg.content)).size) == 56
    thumb = http.get(f"/studies/{web.bleed.StudyInstanceUID}/thumbnail", headers={"Accept": "image/jpeg"})
    assert thumb.status_code == 200 and max(Image.open(io.BytesIO(thumb.content)).size) <= 128
    assert http.get(base + "/rendered", params={"window": "40"}).status_code == 400
    sr = f"/studies/{web.bleed.StudyInstanceUID}/series/{pydicom.dcmread(web.archive.path_of(web.bleed.sr_uid)).SeriesInstanceUID}/instances/{web.bleed.sr_uid}"
    assert http.get(sr + "/rendered", headers={"Accept": "image/png"}).status_code == 406


def test_every_access_is_audited_with_its_study(web: WebEnv, http: httpx.Client) -> None:
    http.get(f"/studies/{web.routine.StudyInstanceUID}/metadata")
    with session_scope(web.archive.session_factory, readonly=True) as session:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.StudyInstanceUID == web.routine.StudyInstanceUID)
        ).all()
    assert any(r.username == "alice" and r.action == "wado metadata" and r.status_code == 200 for r in rows)


# -- dicomweb-client -----------------------------------------------------------------------


def test_dicomweb_client_finds_and_retrieves(web: WebEnv, dicomweb: DICOMwebClient) -> None:
    studies = dicomweb.search_for_studies(search_filters={"PatientName": "Garcia*"})
    assert [s["0020000D"]["Value"][0] for s in studies] == [web.bleed.StudyInstanceUID]
    series = dicomweb.search_for_series(web.bleed.StudyInstanceUID)
    assert {s["00080060"]["Value"][0] for s in series} == {"CT", "SEG", "SR"}
    instances = dicomweb.search_for_instances(web.bleed.StudyInstanceUID, web.bleed.SeriesInstanceUID)
    assert len(instances) == len(web.bleed.sop_uids)
    metadata = dicomweb.retrieve_series_metadata(web.bleed.StudyInstanceUID, web.bleed.SeriesInstanceUID)
    assert len(metadata) == len(web.bleed.sop_uids)
    sop = web.bleed.sop_uids[2]
    ds = dicomweb.retrieve_instance(web.bleed.StudyInstanceUID, web.bleed.SeriesInstanceUID, sop)
    stored = pydicom.dcmread(web.archive.path_of(sop))
    assert ds.PixelData == stored.PixelData
    assert {e.tag: e.value for e in ds} == {e.tag: e.value for e in stored}
    [frame] = dicomweb.retrieve_instance_frames(
        web.bleed.StudyInstanceUID, web.bleed.SeriesInstanceUID, sop, frame_numbers=[1]
    )
    assert frame == stored.PixelData
    retrieved = dicomweb.retrieve_series(web.bleed.StudyInstanceUID, web.bleed.SeriesInstanceUID)
    assert sorted(d.SOPInstanceUID for d in retrieved) == sorted(web.bleed.sop_uids)


def test_public_url_is_used_for_the_links(web: WebEnv) -> None:
    from pipeline.web import WebServer

    settings = web.settings.model_copy(deep=True)
    settings.web.public_url = "https://pacs.example.org/radtriage"
    server = WebServer(settings, web.archive.session_factory, web.archive)
    server.start()
    try:
        study = web.bleed.StudyInstanceUID
        r = httpx.get(f"{server.url}/dicom-web/studies", params={"StudyInstanceUID": study}, auth=("alice", PASSWORD))
        assert _value(r.json()[0], "00081190") == f"https://pacs.example.org/radtriage/dicom-web/studies/{study}"
        meta = httpx.get(
            f"{server.url}/dicom-web/studies/{study}/series/{web.bleed.SeriesInstanceUID}/metadata",
            auth=("alice", PASSWORD),
        ).json()
        assert meta[0]["7FE00010"]["BulkDataURI"].startswith("https://pacs.example.org/radtriage/dicom-web/studies/")
    finally:
        server.stop()


def test_our_dicom_json_is_pydicoms_without_the_bulk(web: WebEnv) -> None:
    """The fast encoder (dicomjson._fast) gives what pydicom's to_json_dict gives, for the
    CT, the SEG and the SR (sequences, PN, DS/IS, multi-valued US/UL/FL, empty values)."""
    from pipeline.web.dicomweb.dicomjson import dataset_json

    for sop in (web.bleed.sop_uids[0], web.bleed.seg_uid, web.bleed.sr_uid):
        ds = pydicom.dcmread(web.archive.path_of(sop), stop_before_pixels=True)
        ours = dataset_json(ds, lambda path: "bulk/" + path)
        reference = pydicom.dcmread(web.archive.path_of(sop), stop_before_pixels=True).to_json_dict(1024, lambda e: "")
        for tag, value in reference.items():
            if not tag.endswith("0000") and "BulkDataURI" not in value and "InlineBinary" not in value:
                assert ours[tag] == value, tag


def test_frames_after_the_metadata_come_from_the_recorded_pixel_offsets(web: WebEnv, http: httpx.Client) -> None:
    import json

    study, series = web.routine.StudyInstanceUID, web.routine.SeriesInstanceUID
    assert http.get(f"/studies/{study}/series/{series}/metadata").status_code == 200
    folder = web.settings.storage.data_dir / "cache" / "dicomweb-metadata" / series
    [sidecar] = folder.glob("*.frames.json")
    locations = json.loads(sidecar.read_text())
    assert set(locations) == set(web.routine.sop_uids)
    for sop in (web.routine.sop_uids[0], web.routine.sop_uids[-1]):
        r = http.get(f"/studies/{study}/series/{series}/instances/{sop}/frames/1", headers={"Accept": OHIF_FRAMES})
        [(headers, content)] = parts_of(r)
        assert content == pydicom.dcmread(web.archive.path_of(sop)).PixelData
        assert headers["content-type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    # The recorded location answers only under the instance's own study and series.
    sop = web.routine.sop_uids[0]
    other = f"/studies/{web.bleed.StudyInstanceUID}/series/{series}/instances/{sop}/frames/1"
    assert http.get(other, headers={"Accept": OHIF_FRAMES}).status_code == 404
    assert http.get(f"/studies/{study}/series/{series}/instances/{sop}/frames/2").status_code == 404


def test_the_warmer_builds_a_stable_studys_metadata_before_anyone_asks(web: WebEnv, http: httpx.Client) -> None:
    from pipeline.web.dicomweb.warmer import MetadataWarmer

    study = web.failed.StudyInstanceUID  # no test asks for its metadata otherwise
    root = web.settings.storage.data_dir.resolve()
    folder = root / "cache" / "dicomweb-metadata" / web.failed.SeriesInstanceUID
    assert not folder.exists()
    warmer = MetadataWarmer(root, web.archive.session_factory, interval=60)
    warmer.start()
    try:
        warmer.warm([study])
        deadline = time.monotonic() + 20
        while not any(folder.glob("*.frames.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        warmer.stop()
    built = [p for p in folder.glob("*.json") if not p.name.endswith(".frames.json")]
    assert len(built) == 1
    served = http.get(f"/studies/{study}/series/{web.failed.SeriesInstanceUID}/metadata").json()
    assert len(served) == len(web.failed.sop_uids)
    assert [p for p in folder.glob("*.json") if not p.name.endswith(".frames.json")] == built  # served from it


def test_every_path_the_viewer_calls_needs_a_login(web: WebEnv) -> None:
    study, series, sop = web.bleed.StudyInstanceUID, web.bleed.SeriesInstanceUID, web.bleed.sop_uids[0]
    instance = f"/studies/{study}/series/{series}/instances/{sop}"
    paths = [
        "/studies?limit=101&offset=0&fuzzymatching=false&includefield=00081030,00080060",
        f"/studies/{study}/series",
        f"/studies/{study}/series/{series}/metadata",
        f"/studies/{study}/metadata",
        instance,
        instance + "/frames/1",
        instance + "/bulkdata/7FE00010",
        instance + "/rendered",
        f"/studies/{study}/thumbnail",
    ]
    for path in paths:
        r = httpx.get(web.url + "/dicom-web" + path, headers={"Accept": OHIF_FRAMES})
        assert r.status_code == 401, path
        assert sop not in r.text and "Garcia" not in r.text
    assert httpx.post(web.url + "/dicom-web/studies", content=b"x").status_code == 401
