"""QIDO-RS (PS3.18 10.6): search the archive for studies, series and instances.

The query parameters become a :class:`pipeline.index.query.Query`, the engine C-FIND
uses, so matching is the same over both (wildcards, DA/TM ranges, UID lists, PN case
folding) and runs in the index's SQL. Each match is returned as DICOM JSON with the
default attributes of PS3.18 Table 10.6.3-3 to -5 for its level, the ``includefield``
ones, the computed counts and ``ModalitiesInStudy``, and its ``RetrieveURL``.

=======================  =============================================================
no match                 ``200`` and ``[]`` (PS3.18 CP-2473: 204 contradicts RFC 9110)
more than the limit      the first :data:`MAX_RESULTS` and a ``Warning: 299`` header
                         saying more can be requested with ``offset``
``fuzzymatching=true``   literal matching, and the ``Warning: 299`` PS3.18 8.3.4.1 gives
bad parameter            ``400`` with a message that names it
XML only accepted        ``406``
=======================  =============================================================
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from starlette.concurrency import run_in_threadpool

from pipeline.index import query as engine
from pipeline.index.query import InformationModel, Level, Query, QueryError
from pipeline.web.context import WebContext
from pipeline.web.dicomweb import base_url, resource_path
from pipeline.web.dicomweb.media import DICOM_JSON, parse_accept, wants_json

router = APIRouter()

MAX_RESULTS = 1000
RESERVED = {"limit", "offset", "includefield", "fuzzymatching"}
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")

# PS3.18 Table 10.6.3-3/-4/-5: the attributes returned without includefield.
STUDY_DEFAULTS = [
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
]
SERIES_DEFAULTS = [
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesInstanceUID",
    "NumberOfSeriesRelatedInstances",
    "SeriesDate",
    "SeriesTime",
]
INSTANCE_DEFAULTS = ["SOPClassUID", "SOPInstanceUID", "InstanceNumber"]
DEFAULTS = {Level.STUDY: STUDY_DEFAULTS, Level.SERIES: SERIES_DEFAULTS, Level.IMAGE: INSTANCE_DEFAULTS}


class BadParameter(QueryError):
    """A QIDO-RS query parameter that cannot be understood (HTTP 400)."""


def _ctx(request: Request) -> WebContext:
    return request.app.state.ctx  # type: ignore[no-any-return]


def attribute_keyword(name: str) -> str:
    """``PatientName`` or ``00100010`` as the keyword; :class:`BadParameter` otherwise."""
    if "." in name:
        raise BadParameter(f"{name}: matching inside sequences is not supported")
    if _TAG.match(name):
        keyword = keyword_for_tag(int(name, 16))
        if not keyword:
            raise BadParameter(f"{name} is not a tag of the DICOM dictionary")
        return keyword
    if tag_for_keyword(name) is None:
        raise BadParameter(f"{name!r} is neither a DICOM keyword nor an 8-digit hex tag")
    return name


def _vr(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    return dictionary_VR(tag) if tag is not None else "UN"


def _number(name: str, text: str) -> int:
    if not text.isdigit():
        raise BadParameter(f"{name} must be a whole number ≥ 0, not {text!r}")
    return int(text)


class Search:
    """One QIDO-RS request turned into a query of the engine, with its paging."""

    def __init__(self, request: Request, level: Level, path_keys: dict[str, str]) -> None:
        self.level = level
        self.limit = MAX_RESULTS
        self.offset = 0
        self.fuzzy = False
        self.limited = False
        match: dict[str, str] = {}
        include: set[str] = set()
        include_all = False
        for name, value in request.query_params.multi_items():
            lowered = name.lower()
            if lowered == "limit":
                self.limit = _number(name, value)
                if self.limit > MAX_RESULTS:
                    self.limit, self.limited = MAX_RESULTS, True
            elif lowered == "offset":
                self.offset = _number(name, value)
            elif lowered == "fuzzymatching":
                if value.lower() not in ("true", "false"):
                    raise BadParameter(f"fuzzymatching must be true or false, not {value!r}")
                self.fuzzy = value.lower() == "true"
            elif lowered == "includefield":
                for item in (v.strip() for v in value.split(",")):
                    if item.lower() == "all":
                        include_all = True
                    elif item:
                        include.add(attribute_keyword(item))
            else:
                keyword = attribute_keyword(name)
                if not engine.is_known(keyword):
                    raise BadParameter(f"{keyword} cannot be matched on; search on the attributes QIDO-RS returns")
                # Lists: PS3.18 separates values by commas; C-FIND (and the engine) by backslashes.
                match[keyword] = value.replace(",", "\\") if _vr(keyword) in ("UI", "CS") else value
        for keyword, value in path_keys.items():
            if keyword in match and match[keyword] not in ("", value):
                raise BadParameter(f"{keyword} is given by the path; the query cannot ask for another")
            match[keyword] = value
        keys: dict[str, str] = {kw: "" for kw in self._returned(include, include_all, path_keys)}
        keys.update(match)
        for keyword in list(keys):
            below = engine.level_of(keyword, InformationModel.STUDY_ROOT)
            if below is not None and below.depth > level.depth:
                if keyword in match:
                    raise BadParameter(f"{keyword} belongs below the {_level_name(level)} level")
                del keys[keyword]  # an includefield of a lower level: nothing to return
        self.query = Query(level=level, model=InformationModel.STUDY_ROOT, keys=keys, relational=True)

    def _returned(self, include: set[str], include_all: bool, path_keys: dict[str, str]) -> list[str]:
        level = self.level
        names = list(DEFAULTS[level])
        # /series and /instances across studies add the study's attributes (PS3.18
        # 10.6.3.3.1), /studies/{uid}/instances the series'; the parents' UIDs always.
        if level is not Level.STUDY and "StudyInstanceUID" not in path_keys:
            names += STUDY_DEFAULTS
        if level is Level.IMAGE and "SeriesInstanceUID" not in path_keys:
            names += SERIES_DEFAULTS
        names += ["StudyInstanceUID"] + (["SeriesInstanceUID"] if level is Level.IMAGE else [])
        if include_all:
            names += engine.returnable_keys(level)
        names += sorted(include)
        return list(dict.fromkeys(names))

    def warnings(self, host: str, more: bool) -> list[str]:
        out = []
        if self.fuzzy:
            out.append(
                f'299 {host} "The fuzzymatching parameter is not supported. Only literal matching has been performed."'
            )
        if more or self.limited:
            out.append(
                f'299 {host} "There are additional results that can be requested (offset; limit at most {MAX_RESULTS})."'
            )
        return out


def _level_name(level: Level) -> str:
    return {Level.STUDY: "study", Level.SERIES: "series", Level.IMAGE: "instance"}[level]


def element(keyword: str, value: Any) -> dict[str, Any]:
    """One attribute's DICOM JSON from an index value (``None``/``""``: present, empty)."""
    vr = _vr(keyword)
    if value is None or value == "":
        return {"vr": vr}
    if vr == "PN":
        groups = str(value).split("=")
        name = {k: g for k, g in zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False) if g}
        return {"vr": vr, "Value": [name]}
    if vr in ("IS", "SL", "SS", "UL", "US", "SV", "UV"):
        return {"vr": vr, "Value": [int(value)]}
    if vr in ("DS", "FL", "FD"):
        return {"vr": vr, "Value": [float(value)]}
    return {"vr": vr, "Value": [v for v in str(value).split("\\")]}


def match_json(match: dict[str, Any], level: Level, base: str) -> dict[str, Any]:
    """One match as DICOM JSON, with its RetrieveURL and InstanceAvailability."""
    out: dict[str, Any] = {}
    for keyword, value in match.items():
        if keyword == "SpecificCharacterSet":
            continue  # the JSON is UTF-8, whatever the files hold
        tag = tag_for_keyword(keyword)
        if tag is not None:
            out[f"{tag:08X}"] = element(keyword, value)
    url = base + resource_path(
        match["StudyInstanceUID"],
        match["SeriesInstanceUID"] if level is not Level.STUDY else None,
        match["SOPInstanceUID"] if level is Level.IMAGE else None,
    )
    out["00081190"] = {"vr": "UR", "Value": [url]}
    out["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
    return dict(sorted(out.items()))


def _run(ctx: WebContext, search: Search) -> tuple[list[dict[str, Any]], bool]:
    found: Iterator[dict[str, Any]] = engine.find(
        ctx.session_factory,
        search.query,
        offset=search.offset,
        page_size=min(engine.PAGE_SIZE, search.limit + 1),
        newest_first=search.level is Level.STUDY,
    )
    matches: list[dict[str, Any]] = []
    for match in found:
        if len(matches) == search.limit:
            return matches, True
        matches.append(match)
    return matches, False


async def _search(request: Request, level: Level, **path_keys: str) -> Response:
    accept = parse_accept(request.headers.get("accept"))
    name = {Level.STUDY: "studies", Level.SERIES: "series", Level.IMAGE: "instances"}[level]
    request.state.audit_action = f"qido {name}"
    if path_keys.get("StudyInstanceUID"):
        request.state.audit_study = path_keys["StudyInstanceUID"]
    if not wants_json(accept):
        return JSONResponse({"detail": f"search results are served as {DICOM_JSON} only"}, status_code=406)
    try:
        search = Search(request, level, path_keys)
        ctx = _ctx(request)
        matches, more = await run_in_threadpool(_run, ctx, search)
    except QueryError as err:
        request.state.audit_action = f"qido {name}: bad request"
        return JSONResponse({"detail": str(err)}, status_code=400)
    request.state.audit_action = f"qido {name}: {len(matches)} match(es)"
    base = base_url(request)
    body = json.dumps([match_json(m, level, base) for m in matches], separators=(",", ":"), ensure_ascii=False)
    headers = {}
    warnings = search.warnings(request.url.hostname or "radtriage", more)
    if warnings:
        headers["Warning"] = ", ".join(warnings)
    return Response(body.encode("utf-8"), media_type=DICOM_JSON, headers=headers)


@router.get("/studies")
async def search_studies(request: Request) -> Response:
    return await _search(request, Level.STUDY)


@router.get("/series")
async def search_series(request: Request) -> Response:
    return await _search(request, Level.SERIES)


@router.get("/instances")
async def search_instances(request: Request) -> Response:
    return await _search(request, Level.IMAGE)


@router.get("/studies/{study_uid}/series")
async def search_study_series(request: Request, study_uid: str) -> Response:
    return await _search(request, Level.SERIES, StudyInstanceUID=study_uid)


@router.get("/studies/{study_uid}/instances")
async def search_study_instances(request: Request, study_uid: str) -> Response:
    return await _search(request, Level.IMAGE, StudyInstanceUID=study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances")
async def search_series_instances(request: Request, study_uid: str, series_uid: str) -> Response:
    return await _search(request, Level.IMAGE, StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
