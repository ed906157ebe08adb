"""C-FIND SCP for the Patient Root and Study Root Query/Retrieve Information Models.

:func:`handle_find` turns the request identifier into a :class:`pipeline.index.query.Query`
(the one query engine, shared with QIDO-RS), yields one pending response per match and
stops at a C-CANCEL. Every request is audited (:func:`pipeline.dicom.audit.audit_dimse`)
and logged in one line, whatever its outcome.

=========  ==========================================================================
Status     Meaning
=========  ==========================================================================
0xFF00     pending: one match (every requested key; empty where the index has none)
0x0000     all matches sent
0xFE00     cancelled by the peer's C-CANCEL
0x0124     refused: the calling AE may not query (``[[dicom.peers]] allow`` lacks
           ``"query"``); an association that asks for nothing else is rejected
           before it starts (see :mod:`pipeline.dicom.receiver`)
0xA700     out of resources: the index is busy or unreachable; try again
0xA900     the identifier breaks the hierarchy rules: keys below the query level, a
           missing unique key above it, a level the model lacks
0xC000     the identifier cannot be processed: no or an unknown QueryRetrieveLevel,
           a value that does not parse (a bad date range), an undecodable dataset
=========  ==========================================================================

Each response carries ``RetrieveAETitle`` (this archive) and the
``SpecificCharacterSet`` the match was received in, so names come back as they were
sent; when its values do not fit that character set (a patient renamed in another
one), the response is UTF-8 (``ISO_IR 192``).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from typing import Any

from pydicom.charset import convert_encodings, encode_string
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import PersonName
from pynetdicom import evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import Settings
from pipeline.dicom.audit import audit_dimse
from pipeline.dicom.fastsend import EncodedIdentifier, active, enable
from pipeline.dicom.identifier import encode as fast_identifier
from pipeline.dicom.peers import may
from pipeline.dicom.status import (
    STATUS_CANCELLED,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_NOT_AUTHORISED,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PENDING,
    STATUS_SOP_CLASS_MISMATCH,
    STATUS_SUCCESS,
)
from pipeline.index.db import is_transient
from pipeline.index.query import BadValueError, IdentifierError, InformationModel, Level, Query, find, validate

log = logging.getLogger(__name__)

FIND_MODELS = {
    str(PatientRootQueryRetrieveInformationModelFind): InformationModel.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelFind): InformationModel.STUDY_ROOT,
}


_NOT_ECHOED = ("QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle")


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _failure(status: int, comment: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = comment[:64]  # LO
    return rsp


def _text(value: Any) -> str:
    """A request element's value as the DICOM string the engine matches on."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_text(v) for v in value)
    if isinstance(value, PersonName):
        return str(value)
    return str(value).strip()


def query_from_identifier(identifier: Dataset, model: InformationModel, settings: Settings) -> Query:
    """The engine's :class:`Query` for a C-FIND identifier (sequences and private keys: return only)."""
    try:
        level_text = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        keys: dict[str, str] = {}
        for elem in identifier:
            if elem.keyword and elem.keyword not in _NOT_ECHOED and elem.VR != "SQ":
                keys[elem.keyword] = _text(elem.value)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for a malformed element
        raise _Refused(STATUS_CANNOT_UNDERSTAND, f"identifier does not decode: {err}") from None
    if not level_text:
        raise _Refused(STATUS_CANNOT_UNDERSTAND, "QueryRetrieveLevel is missing")
    try:
        level = Level(level_text)
    except ValueError:
        raise _Refused(
            STATUS_CANNOT_UNDERSTAND, f"QueryRetrieveLevel {level_text[:16]!r} is not PATIENT/STUDY/SERIES/IMAGE"
        ) from None
    return Query(level, model, keys, strict_names=settings.dicom.strict_person_name_matching)


def _charset(stored: str, texts: list[str]) -> str:
    """``stored`` if every text value encodes in it, else ``ISO_IR 192`` (UTF-8)."""
    values = [v for v in stored.split("\\")] if stored else ["ISO_IR 6"]
    try:
        encodings = convert_encodings(values)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # pydicom warns and replaces what does not fit
            for text in texts:
                encode_string(text, encodings)
    except (LookupError, UnicodeError, ValueError, UserWarning):
        return "ISO_IR 192"
    return stored


def response_identifier(identifier: Dataset, query: Query, match: dict[str, Any], retrieve_ae: str) -> Dataset:
    """The pending response for one match: every requested key, in the request's VRs."""
    rsp = Dataset()
    texts: list[str] = []
    values: list[tuple[int, str, Any]] = []
    for elem in identifier:
        keyword = elem.keyword
        if keyword in _NOT_ECHOED:
            continue
        if elem.VR == "SQ":
            values.append((elem.tag, "SQ", []))
            continue
        if keyword == "InstanceAvailability":
            value: Any = "ONLINE"
        else:
            value = match.get(keyword)
        if value == "":
            value = None
        if isinstance(value, str):
            texts.append(value)
        values.append((elem.tag, elem.VR, value))
    charset = _charset(match.get("SpecificCharacterSet") or "", texts)
    if charset:
        rsp.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
    rsp.QueryRetrieveLevel = query.level.value
    rsp.RetrieveAETitle = retrieve_ae
    for tag, vr, value in values:
        rsp.add_new(tag, vr, value)
    return rsp


class ResponseEncoder:
    """The pending responses of one request, encoded by :mod:`pipeline.dicom.identifier`
    when the negotiated syntax is Explicit or Implicit VR Little Endian and every
    requested key is plain text; else :func:`response_identifier`'s datasets."""

    def __init__(self, identifier: Dataset, query: Query, retrieve_ae: str, transfer_syntax: str, fast: bool) -> None:
        self.identifier, self.query, self.retrieve_ae = identifier, query, retrieve_ae
        self.explicit = transfer_syntax == ExplicitVRLittleEndian
        self.keys = [
            (int(elem.tag), str(elem.VR), elem.keyword) for elem in identifier if elem.keyword not in _NOT_ECHOED
        ]
        self.fast = (
            fast
            and transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
            and all(vr != "SQ" for _, vr, _ in self.keys)
        )
        self.fixed = [(0x00080052, "CS", query.level.value), (0x00080054, "AE", retrieve_ae)]

    def __call__(self, match: dict[str, Any]) -> Dataset:
        if self.fast:
            values = [
                (tag, vr, "ONLINE" if keyword == "InstanceAvailability" else match.get(keyword))
                for tag, vr, keyword in self.keys
            ]
            done = fast_identifier(self.fixed + values, match.get("SpecificCharacterSet") or "", explicit=self.explicit)
            if done is not None:
                return EncodedIdentifier(done[0], self.explicit, lambda: self._dataset(match))
        return self._dataset(match)

    def _dataset(self, match: dict[str, Any]) -> Dataset:
        return response_identifier(self.identifier, self.query, match, self.retrieve_ae)


def _describe(query: Query) -> str:
    asked = " ".join(f"{k}={v}" for k, v in query.keys.items() if v)
    returned = sum(1 for v in query.keys.values() if not v)
    model = "PATIENT_ROOT" if query.model is InformationModel.PATIENT_ROOT else "STUDY_ROOT"
    return f"{query.level.value} {model} {asked} (+{returned} return keys)".replace("  ", " ")


def handle_find(
    event: evt.Event, settings: Settings, session_factory: sessionmaker[Session]
) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND handler: one pending response per match, then the final status."""
    calling = str(event.assoc.requestor.ae_title).strip()
    address = str(event.assoc.requestor.address)
    model = FIND_MODELS.get(str(event.request.AffectedSOPClassUID), InformationModel.STUDY_ROOT)
    started = time.monotonic()
    described = "?"
    study_uid = ""
    sent = 0

    def finish(status: int, comment: str = "") -> None:
        ms = (time.monotonic() - started) * 1000
        level = logging.INFO if status in (STATUS_SUCCESS, STATUS_CANCELLED) else logging.WARNING
        log.log(
            level,
            "C-FIND from %s (%s) %s: %d matches, status 0x%04X%s in %.0f ms",
            calling,
            address,
            described,
            sent,
            status,
            f" ({comment})" if comment else "",
            ms,
        )
        outcome: dict[str, object] = {"matches": sent}
        if comment:
            outcome["reason"] = comment
        audit_dimse(
            session_factory,
            operation="C-FIND",
            calling_ae=calling,
            address=address,
            request=described,
            status=status,
            study_uid=study_uid,
            **outcome,
        )

    enable(event.assoc)  # one prebuilt message per response (the receiver tuned the association)
    try:
        if not may(settings.dicom, calling, "query"):
            raise _Refused(STATUS_NOT_AUTHORISED, f"AE {calling} may not query: [[dicom.peers]] allow lacks 'query'")
        try:
            identifier = event.identifier
        except Exception as err:  # noqa: BLE001 - pynetdicom's decode raises many types
            raise _Refused(STATUS_CANNOT_UNDERSTAND, f"identifier does not decode: {err}") from None
        query = query_from_identifier(identifier, model, settings)
        described = _describe(query)
        uid = query.keys.get("StudyInstanceUID", "")
        study_uid = uid if uid and "\\" not in uid and "*" not in uid else ""
        validate(query)
        encode = ResponseEncoder(
            identifier, query, settings.dicom.ae_title, str(event.context.transfer_syntax), active(event.assoc)
        )
        for match in find(session_factory, query):
            if event.is_cancelled:
                finish(STATUS_CANCELLED)
                yield STATUS_CANCELLED, None
                return
            yield STATUS_PENDING, encode(match)
            sent += 1
    except _Refused as err:
        finish(err.status, str(err))
        yield _failure(err.status, str(err)), None
        return
    except IdentifierError as err:
        finish(STATUS_SOP_CLASS_MISMATCH, str(err))
        yield _failure(STATUS_SOP_CLASS_MISMATCH, str(err)), None
        return
    except BadValueError as err:
        finish(STATUS_CANNOT_UNDERSTAND, str(err))
        yield _failure(STATUS_CANNOT_UNDERSTAND, str(err)), None
        return
    except DBAPIError as err:
        if not is_transient(err):
            raise  # a defect, not a busy index: pynetdicom answers 0xC311 and logs it
        reason = f"index unavailable: {type(err.orig).__name__}"
        finish(STATUS_OUT_OF_RESOURCES, reason)
        yield _failure(STATUS_OUT_OF_RESOURCES, reason), None
        return
    if event.is_cancelled:
        finish(STATUS_CANCELLED)
        yield STATUS_CANCELLED, None
        return
    finish(STATUS_SUCCESS)
    yield STATUS_SUCCESS, None
