"""A real Orthanc, with Debian's DICOMweb plugin, using radtriage as its DICOMweb server.

Orthanc is configured with radtriage under ``DicomWeb.Servers`` (HTTP Basic as alice) and
is driven through its own REST API: it retrieves the bleed study, CT with its SEG and SR,
over WADO-RS, and searches radtriage over QIDO-RS. What arrived is checked through
Orthanc's REST, as an administrator of that Orthanc would check it. Orthanc 1.10 binds
every interface; everything here talks to it on 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from pipeline.index.accounts import AuditEvent
from pipeline.index.db import session_scope
from tests.peers.orthanc import DICOMWEB_PLUGIN, OrthancPeer

from .conftest import PASSWORD, WebEnv

pytestmark = pytest.mark.slow

SERVER = "radtriage"


@pytest.fixture(scope="module")
def orthanc(web: WebEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    dicomweb = {
        "Enable": True,
        "Root": "/dicom-web/",
        "Servers": {SERVER: {"Url": web.url + "/dicom-web/", "Username": "alice", "Password": PASSWORD}},
    }
    peer = OrthancPeer(
        tmp_path_factory.mktemp("orthanc-dicomweb"),
        extra={"Plugins": [DICOMWEB_PLUGIN], "DicomWeb": dicomweb},
    )
    with peer:
        yield peer


def _tag(item: dict[str, Any], tag: str) -> Any:
    """A tag's first value in DICOM JSON (``/get``)."""
    return item.get(tag, {}).get("Value", [None])[0]


def _found(item: dict[str, Any], tag: str) -> Any:
    """A tag's value as Orthanc's ``/qido`` re-encodes an answer (``{"Name", "Value": str}``)."""
    return item.get(tag, {}).get("Value")


def test_orthanc_knows_radtriage_as_a_dicomweb_server(orthanc: OrthancPeer) -> None:
    assert SERVER in orthanc.get("/dicom-web/servers")


def test_orthanc_retrieves_the_study_with_its_seg_and_sr(web: WebEnv, orthanc: OrthancPeer) -> None:
    study_uid = web.bleed.StudyInstanceUID
    orthanc.post(f"/dicom-web/servers/{SERVER}/retrieve", {"Resources": [{"Study": study_uid}]}, timeout=120)

    expected = {*web.bleed.sop_uids, web.bleed.seg_uid, web.bleed.sr_uid}
    stored = {i["MainDicomTags"]["SOPInstanceUID"]: i for i in orthanc.instances()}
    assert set(stored) == expected, f"missing {expected - set(stored)}, unexpected {set(stored) - expected}"

    (study,) = orthanc.get("/studies?expand")
    assert study["MainDicomTags"]["StudyInstanceUID"] == study_uid
    assert study["MainDicomTags"]["AccessionNumber"] == "ACC1003"
    assert study["PatientMainDicomTags"]["PatientName"] == "Garcia^Maria"
    modalities = {orthanc.get(f"/series/{s}")["MainDicomTags"]["Modality"] for s in study["Series"]}
    assert modalities == {"CT", "SEG", "SR"}

    # Byte for byte what radtriage archived: the SEG's bit-packed frames and the SR's
    # content tree survived the trip, not merely their UIDs.
    for sop_uid in (web.bleed.seg_uid, web.bleed.sr_uid, web.bleed.sop_uids[0]):
        path = web.archive.path_of(sop_uid)
        received = orthanc.get_bytes(f"/instances/{stored[sop_uid]['ID']}/file")
        assert hashlib.sha256(received).hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest(), sop_uid
    seg = orthanc.get(f"/instances/{stored[web.bleed.seg_uid]['ID']}/simplified-tags")
    assert seg["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg["SeriesInstanceUID"] == str(pydicom.dcmread(web.archive.path_of(web.bleed.seg_uid)).SeriesInstanceUID)

    with session_scope(web.archive.session_factory, readonly=True) as session:
        actions = set(
            session.scalars(
                select(AuditEvent.action).where(
                    AuditEvent.StudyInstanceUID == study_uid, AuditEvent.username == "alice"
                )
            )
        )
    assert any(a.startswith("wado") for a in actions), actions


def test_orthanc_searches_radtriage_over_qido(web: WebEnv, orthanc: OrthancPeer) -> None:
    found = orthanc.post(
        f"/dicom-web/servers/{SERVER}/qido", {"Uri": "/studies", "Arguments": {"PatientName": "Garcia*"}}
    )
    assert [_found(s, "0020000D") for s in found] == [web.bleed.StudyInstanceUID]
    assert _found(found[0], "00080050") == "ACC1003"
    assert _found(found[0], "00100010") == "Garcia^Maria"
    # Orthanc's /qido keeps only string values (numbers such as the IS counts come back
    # null, and only the first of several values); /get hands back radtriage's JSON as is.
    raw = orthanc.post(f"/dicom-web/servers/{SERVER}/get", {"Uri": "/studies", "Arguments": {"PatientName": "Garcia*"}})
    assert _tag(raw[0], "00201208") == len(web.bleed.sop_uids) + 2
    assert raw[0]["00080061"]["Value"] == ["CT", "SEG", "SR"]

    series = orthanc.post(f"/dicom-web/servers/{SERVER}/qido", {"Uri": f"/studies/{web.bleed.StudyInstanceUID}/series"})
    assert sorted(_found(s, "00080060") for s in series) == ["CT", "SEG", "SR"]

    nobody = orthanc.post(f"/dicom-web/servers/{SERVER}/qido", {"Uri": "/studies", "Arguments": {"PatientName": "Zz*"}})
    assert nobody == []


def test_orthanc_gets_series_metadata_through_radtriage(web: WebEnv, orthanc: OrthancPeer) -> None:
    uri = f"/studies/{web.bleed.StudyInstanceUID}/series/{web.bleed.SeriesInstanceUID}/metadata"
    metadata = orthanc.post(f"/dicom-web/servers/{SERVER}/get", {"Uri": uri})
    assert sorted(_tag(m, "00080018") for m in metadata) == sorted(web.bleed.sop_uids)
    assert all("BulkDataURI" in m["7FE00010"] for m in metadata)
