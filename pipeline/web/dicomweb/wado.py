"""WADO-RS (PS3.18 10.4): instances, metadata, frames, bulk data, rendered images.

==========================================  ============================================
``/studies/{st}[/series/{se}[/instances/    ``multipart/related; type="application/
{sop}]]``                                   dicom"``: as stored with ``transfer-syntax=*``
                                            or the stored syntax; Explicit VR Little
                                            Endian when none is named (decompressed
                                            where needed); ``406`` for what cannot be
                                            served (radtriage never compresses)
``…/metadata``                              DICOM JSON, BulkDataURIs for bulk values;
                                            series arrays cached (:mod:`.metadata`)
``…/instances/{sop}/frames/{1,2,…}``        uncompressed frames as
                                            ``application/octet-stream``; compressed as
                                            stored (with ``transfer-syntax``) when the
                                            client accepts that, else decompressed
``…/instances/{sop}/bulkdata/{path}``       the bytes a BulkDataURI names
``…/rendered``, ``…/thumbnail``             ``image/jpeg`` or ``image/png``; ``window``
                                            (centre,width[,linear]), ``viewport`` (w,h)
==========================================  ============================================

Files are streamed from the archive in chunks; nothing holds a whole study in memory.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom.encaps import generate_frames
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from starlette.concurrency import run_in_threadpool

from pipeline.errors import PermanentError
from pipeline.index.db import session_scope
from pipeline.web.context import WebContext
from pipeline.web.dicomweb import base_url
from pipeline.web.dicomweb.dicomjson import NoSuchBulkData, bulk_value
from pipeline.web.dicomweb.media import (
    DICOM,
    DICOM_JSON,
    FRAME_MEDIA_TYPES,
    OCTET_STREAM,
    MediaRange,
    NotAcceptable,
    Part,
    choose_instance_syntax,
    file_chunks,
    multipart_body,
    multipart_content_type,
    new_boundary,
    parse_accept,
    wants_json,
)
from pipeline.web.dicomweb.metadata import (
    FrameLocation,
    MetadataCache,
    StoredInstance,
    instance_json,
    stored_instances,
    study_series,
    with_base,
)
from pipeline.web.imaging import NotAnImage, render_frame

log = logging.getLogger(__name__)
router = APIRouter()

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
THUMBNAIL_SIZE = (128, 128)


class NotFound(PermanentError):
    """Nothing in the archive at that path (HTTP 404)."""


class BadRequest(PermanentError):
    """A parameter or path segment that cannot be understood (HTTP 400)."""


def _ctx(request: Request) -> WebContext:
    return request.app.state.ctx  # type: ignore[no-any-return]


def _data_dir(ctx: WebContext) -> Path:
    return ctx.settings.storage.data_dir.resolve()


def _metadata_cache(request: Request) -> MetadataCache:
    """The app's one cache (made on first use; two made at once would share the folder)."""
    cache: MetadataCache | None = getattr(request.app.state, "dicomweb_metadata", None)
    if cache is None:
        ctx = _ctx(request)
        cache = request.app.state.dicomweb_metadata = MetadataCache(_data_dir(ctx), ctx.session_factory)
    return cache


def _instances(ctx: WebContext, study: str, series: str | None = None, sop: str | None = None) -> list[StoredInstance]:
    with session_scope(ctx.session_factory, readonly=True) as session:
        found = stored_instances(session, _data_dir(ctx), study, series, sop)
    if not found:
        what = f"instance {sop}" if sop else f"series {series}" if series else f"study {study}"
        raise NotFound(f"{what} is not in the archive")
    return found


def _error(status_code: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code)


async def _answer(request: Request, action: str, study: str, make: Any, *args: Any) -> Response:
    """Run ``make(*args)`` off the event loop; map our errors to their HTTP statuses."""
    request.state.audit_action = action
    request.state.audit_study = study
    try:
        return await run_in_threadpool(make, *args)  # type: ignore[no-any-return]
    except NotFound as err:
        return _error(404, str(err))
    except NotAcceptable as err:
        return _error(406, str(err))
    except (BadRequest, NoSuchBulkData) as err:
        return _error(400 if isinstance(err, BadRequest) else 404, str(err))
    except NotAnImage as err:
        return _error(406 if "no pixel data" in str(err) else 404, str(err))


# -- instances ---------------------------------------------------------------------------


def _transcoded(instance: StoredInstance, target: str) -> bytes:
    """The instance re-encoded in an uncompressed ``target`` syntax (decompressed if needed)."""
    ds = pydicom.dcmread(instance.path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = UID(target)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=target == ImplicitVRLittleEndian, little_endian=True)
    return buffer.getvalue()


def _instance_parts(instances: list[StoredInstance], syntax: str | None) -> Iterator[Part]:
    for instance in instances:
        stored = instance.TransferSyntaxUID
        if syntax in ("*", stored) or (syntax is None and stored == ExplicitVRLittleEndian):
            yield Part(f"{DICOM}; transfer-syntax={stored}", file_chunks(instance.path))
            continue
        target = syntax or ExplicitVRLittleEndian
        try:
            content = _transcoded(instance, target)
        except Exception as err:  # noqa: BLE001 - the response is under way; this part is left out, and logged
            log.error(
                "WADO-RS: %s could not be converted from %s to %s: %s", instance.SOPInstanceUID, stored, target, err
            )
            continue
        yield Part(f"{DICOM}; transfer-syntax={target}", content)


def _retrieve(ctx: WebContext, accept: list[MediaRange], study: str, series: str | None, sop: str | None) -> Response:
    syntax = choose_instance_syntax(accept)
    instances = _instances(ctx, study, series, sop)
    if syntax not in (None, "*") and syntax not in UNCOMPRESSED:
        cannot = [i for i in instances if i.TransferSyntaxUID != syntax]
        if cannot:
            raise NotAcceptable(
                f"{len(cannot)} instance(s) are stored as {UID(cannot[0].TransferSyntaxUID).name} and radtriage "
                f"does not compress; ask for transfer-syntax=* (as stored) or {ExplicitVRLittleEndian}"
            )
    boundary = new_boundary()
    return StreamingResponse(
        multipart_body(_instance_parts(instances, syntax), boundary),
        media_type=multipart_content_type(DICOM, boundary),
    )


@router.get("/studies/{study}")
async def retrieve_study(request: Request, study: str) -> Response:
    accept = parse_accept(request.headers.get("accept"))
    return await _answer(request, "wado study", study, _retrieve, _ctx(request), accept, study, None, None)


@router.get("/studies/{study}/series/{series}")
async def retrieve_series(request: Request, study: str, series: str) -> Response:
    accept = parse_accept(request.headers.get("accept"))
    return await _answer(request, "wado series", study, _retrieve, _ctx(request), accept, study, series, None)


@router.get("/studies/{study}/series/{series}/instances/{sop}")
async def retrieve_instance(request: Request, study: str, series: str, sop: str) -> Response:
    accept = parse_accept(request.headers.get("accept"))
    return await _answer(request, "wado instance", study, _retrieve, _ctx(request), accept, study, series, sop)


# -- metadata ----------------------------------------------------------------------------


def _metadata(
    ctx: WebContext, cache: MetadataCache, base: str, study: str, series: str | None, sop: str | None
) -> Response:
    if sop is not None:
        instance = _instances(ctx, study, series, sop)[0]
        body = json.dumps([instance_json(instance, base)], separators=(",", ":")).encode()
        return Response(body, media_type=DICOM_JSON)
    if series is not None:
        arrays = [cache.series(study, series)]
    else:
        with session_scope(ctx.session_factory, readonly=True) as session:
            uids = study_series(session, study)
        arrays = [cache.series(study, uid) for uid in uids]
    present = [a for a in arrays if a is not None and a != b"[]"]
    if not present:
        raise NotFound(f"{'series ' + series if series else 'study ' + study} is not in the archive")
    body = b"[" + b",".join(a[1:-1] for a in present) + b"]"
    return Response(with_base(body, base), media_type=DICOM_JSON)


async def _metadata_answer(request: Request, study: str, series: str | None, sop: str | None) -> Response:
    if not wants_json(parse_accept(request.headers.get("accept"))):
        return _error(406, f"metadata is served as {DICOM_JSON}")
    cache = _metadata_cache(request)
    return await _answer(
        request, "wado metadata", study, _metadata, _ctx(request), cache, base_url(request), study, series, sop
    )


@router.get("/studies/{study}/metadata")
async def study_metadata(request: Request, study: str) -> Response:
    return await _metadata_answer(request, study, None, None)


@router.get("/studies/{study}/series/{series}/metadata")
async def series_metadata(request: Request, study: str, series: str) -> Response:
    return await _metadata_answer(request, study, series, None)


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata")
async def instance_metadata(request: Request, study: str, series: str, sop: str) -> Response:
    return await _metadata_answer(request, study, series, sop)


# -- frames and bulk data ----------------------------------------------------------------


def frame_numbers(text: str) -> list[int]:
    """``"1,3,5"`` as ``[1, 3, 5]`` (1-based, as PS3.18 numbers frames)."""
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadRequest(f"frame list {text!r} must be numbers separated by commas, e.g. 1,2,3") from None
    if not numbers or min(numbers) < 1:
        raise BadRequest(f"frame list {text!r} must name frames from 1")
    return numbers


def _native_frame(ds: pydicom.Dataset, index: int, frames: int) -> bytes:
    """Frame ``index`` (0-based) of native little-endian pixel data, as stored."""
    data: bytes = ds.PixelData
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
    if bits == 1:  # bit-packed, frames not byte-aligned (binary SEG)
        count = rows * columns * samples
        unpacked = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
        return np.packbits(unpacked[index * count : (index + 1) * count], bitorder="little").tobytes()
    size = rows * columns * samples * bits // 8
    return data[index * size : (index + 1) * size]


def _frame_choice(accept: list[MediaRange], stored: UID) -> tuple[str, str]:
    """(media type, transfer syntax) of the frames to send, as stored when accepted."""
    compressed = stored.is_compressed
    for r in accept:
        part_type = r.part_type if r.media_type == "multipart/related" else ""
        ts = r.transfer_syntax
        if r.media_type in ("*/*", "multipart/*") or (r.media_type == "multipart/related" and part_type in ("", "*/*")):
            return (
                (FRAME_MEDIA_TYPES.get(stored, OCTET_STREAM), str(stored))
                if compressed
                else (OCTET_STREAM, ExplicitVRLittleEndian)
            )
        if part_type == OCTET_STREAM:
            if ts in ("*", str(stored)) and compressed:
                return OCTET_STREAM, str(stored)
            if ts in (None, "*", ExplicitVRLittleEndian):
                return OCTET_STREAM, ExplicitVRLittleEndian
        elif compressed and part_type == FRAME_MEDIA_TYPES.get(stored) and ts in (None, "*", str(stored)):
            return part_type, str(stored)
    raise NotAcceptable(
        f"the frames are stored as {stored.name}; accept "
        f'multipart/related; type="{OCTET_STREAM}" (uncompressed) or transfer-syntax=* (as stored)'
    )


def _located_frames(where: FrameLocation, accept: list[MediaRange], wanted: list[int]) -> Response | None:
    """Frames read straight from where the series metadata found the native pixels."""
    beyond = [n for n in wanted if n > where.frames]
    if beyond:
        return None  # the slow path says why
    media_type, syntax = _frame_choice(accept, UID(ExplicitVRLittleEndian))
    try:
        fd = os.open(where.path, os.O_RDONLY)
    except OSError:
        return None
    try:
        chunks = [os.pread(fd, where.frame_bytes, where.offset + (n - 1) * where.frame_bytes) for n in wanted]
    finally:
        os.close(fd)
    if any(len(c) != where.frame_bytes for c in chunks):
        return None
    parts = [Part(f"{media_type}; transfer-syntax={syntax}", c) for c in chunks]
    boundary = new_boundary()
    return Response(b"".join(multipart_body(parts, boundary)), media_type=multipart_content_type(media_type, boundary))


def _frames(
    ctx: WebContext, cache: MetadataCache, accept: list[MediaRange], study: str, series: str, sop: str, numbers: str
) -> Response:
    wanted = frame_numbers(numbers)
    where = cache.frame_location(sop)
    if where is not None and (where.StudyInstanceUID, where.SeriesInstanceUID) == (study, series):
        fast = _located_frames(where, accept, wanted)
        if fast is not None:
            return fast
    instance = _instances(ctx, study, series, sop)[0]
    ds = pydicom.dcmread(instance.path)
    if "PixelData" not in ds:
        raise NotAnImage(f"instance {sop} has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    beyond = [n for n in wanted if n > frames]
    if beyond:
        raise NotFound(f"frame(s) {', '.join(map(str, beyond))} beyond the {frames} frame(s) of instance {sop}")
    stored = ds.file_meta.TransferSyntaxUID
    media_type, syntax = _frame_choice(accept, stored)
    parts: list[Part] = []
    if syntax == stored and stored.is_compressed:
        encoded = list(generate_frames(ds.PixelData, number_of_frames=frames))
        parts = [Part(f"{media_type}; transfer-syntax={syntax}", encoded[n - 1]) for n in wanted]
    elif not stored.is_compressed and stored.is_little_endian:
        parts = [Part(f"{media_type}; transfer-syntax={syntax}", _native_frame(ds, n - 1, frames)) for n in wanted]
    else:  # compressed or big endian, wanted uncompressed: decode
        pixels = ds.pixel_array
        pixels = pixels if frames > 1 else pixels[np.newaxis]
        parts = [
            Part(
                f"{media_type}; transfer-syntax={syntax}",
                pixels[n - 1].astype(pixels.dtype.newbyteorder("<")).tobytes(),
            )
            for n in wanted
        ]
    boundary = new_boundary()
    return Response(b"".join(multipart_body(parts, boundary)), media_type=multipart_content_type(media_type, boundary))


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{numbers}")
async def retrieve_frames(request: Request, study: str, series: str, sop: str, numbers: str) -> Response:
    accept = parse_accept(request.headers.get("accept"))
    cache = _metadata_cache(request)
    return await _answer(
        request, "wado frames", study, _frames, _ctx(request), cache, accept, study, series, sop, numbers
    )


def _bulkdata(ctx: WebContext, accept: list[MediaRange], study: str, series: str, sop: str, path: str) -> Response:
    if not any(
        r.takes(OCTET_STREAM) or (r.media_type == "multipart/related" and r.part_type in ("", "*/*", OCTET_STREAM))
        for r in accept
    ):
        raise NotAcceptable(f'bulk data is served as multipart/related; type="{OCTET_STREAM}"')
    instance = _instances(ctx, study, series, sop)[0]
    value = bulk_value(pydicom.dcmread(instance.path), path)
    boundary = new_boundary()
    body = b"".join(multipart_body([Part(OCTET_STREAM, value)], boundary))
    return Response(body, media_type=multipart_content_type(OCTET_STREAM, boundary))


@router.get("/studies/{study}/series/{series}/instances/{sop}/bulkdata/{path:path}")
async def retrieve_bulkdata(request: Request, study: str, series: str, sop: str, path: str) -> Response:
    accept = parse_accept(request.headers.get("accept"))
    return await _answer(request, "wado bulkdata", study, _bulkdata, _ctx(request), accept, study, series, sop, path)


# -- rendered and thumbnails -------------------------------------------------------------


def _rendered_type(accept: list[MediaRange]) -> str:
    for r in accept:
        for media_type in ("image/jpeg", "image/png"):
            if r.takes(media_type) or (r.media_type == "multipart/related" and r.part_type == media_type):
                return media_type
    raise NotAcceptable("rendered images are served as image/jpeg or image/png")


def _window(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    parts = text.split(",")
    try:
        centre, width = float(parts[0]), float(parts[1])
    except (ValueError, IndexError):
        raise BadRequest(f"window={text!r} must be centre,width[,function], e.g. window=40,80,linear") from None
    if len(parts) > 2 and parts[2].strip().lower() not in ("linear", ""):
        raise BadRequest(f"window function {parts[2]!r} is not supported; use linear")
    if width <= 0:
        raise BadRequest(f"window width must be positive, not {width:g}")
    return centre, width


def _viewport(text: str | None, default: tuple[int, int] | None) -> tuple[int, int] | None:
    if not text:
        return default
    try:
        width, height = (int(v) for v in text.split(",")[:2])
    except ValueError:
        raise BadRequest(f"viewport={text!r} must be width,height in pixels, e.g. viewport=512,512") from None
    if not (0 < width <= 4096 and 0 < height <= 4096):
        raise BadRequest("viewport width and height must be 1–4096 pixels")
    return width, height


def _render(
    ctx: WebContext,
    accept: list[MediaRange],
    params: dict[str, str],
    instances: list[StoredInstance],
    frames: list[int] | None,
    size: tuple[int, int] | None,
) -> Response:
    media_type = _rendered_type(accept)
    window, viewport = _window(params.get("window")), _viewport(params.get("viewport"), size)
    try:
        quality = min(100, max(1, int(params.get("quality", "90"))))
    except ValueError:
        raise BadRequest("quality must be a number 1–100") from None
    images: list[bytes] = []
    for instance in instances:
        ds = pydicom.dcmread(instance.path)
        if "PixelData" not in ds and len(instances) > 1:
            continue  # an SR or other non-image in a study or series
        count = int(ds.get("NumberOfFrames", 1) or 1)
        for n in frames or ([count // 2 + 1] if size else [1]):
            images.append(render_frame(ds, n - 1, window=window, size=viewport, media_type=media_type, quality=quality))
    if not images:
        raise NotAnImage("nothing in it has pixel data")
    if len(images) == 1:
        return Response(images[0], media_type=media_type)
    boundary = new_boundary()
    return Response(
        b"".join(multipart_body([Part(media_type, img) for img in images], boundary)),
        media_type=multipart_content_type(media_type, boundary),
    )


def _render_request(
    ctx: WebContext,
    accept: list[MediaRange],
    params: dict[str, str],
    study: str,
    series: str | None,
    sop: str | None,
    numbers: str | None,
    thumbnail: bool,
) -> Response:
    instances = _instances(ctx, study, series, sop)
    frames = frame_numbers(numbers) if numbers else None
    if thumbnail and sop is None:
        images = [i for i in instances if not i.SOPClassUID.startswith("1.2.840.10008.5.1.4.1.1.88")]
        if series is None:  # the study: the largest series
            counts: dict[str, int] = {}
            for i in images:
                counts[i.SeriesInstanceUID] = counts.get(i.SeriesInstanceUID, 0) + 1
            largest = max(counts, key=lambda uid: counts[uid]) if counts else None
            images = [i for i in images if i.SeriesInstanceUID == largest]
        instances = [images[len(images) // 2]] if images else instances[:1]
    return _render(ctx, accept, params, instances, frames, THUMBNAIL_SIZE if thumbnail else None)


def _rendered_route(kind: str, path: str, thumbnail: bool) -> None:
    async def handler(request: Request) -> Response:
        p: dict[str, str] = request.path_params
        accept = parse_accept(request.headers.get("accept"))
        return await _answer(
            request,
            f"wado {'thumbnail' if thumbnail else 'rendered'} {kind}",
            p["study"],
            _render_request,
            _ctx(request),
            accept,
            dict(request.query_params),
            p["study"],
            p.get("series"),
            p.get("sop"),
            p.get("numbers"),
            thumbnail,
        )

    handler.__name__ = f"{'thumbnail' if thumbnail else 'rendered'}_{kind}"
    router.add_api_route(path, handler, methods=["GET"])


for _kind, _path in (
    ("study", "/studies/{study}"),
    ("series", "/studies/{study}/series/{series}"),
    ("instance", "/studies/{study}/series/{series}/instances/{sop}"),
    ("frames", "/studies/{study}/series/{series}/instances/{sop}/frames/{numbers}"),
):
    _rendered_route(_kind, _path + "/rendered", thumbnail=False)
    _rendered_route(_kind, _path + "/thumbnail", thumbnail=True)
