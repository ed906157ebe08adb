"""C-MOVE and C-GET SCP: Patient Root and Study Root, levels PATIENT to IMAGE.

An identifier names instances by unique keys only (PS3.4 C.4.2.2.1, baseline
hierarchical retrieve): the unique key of each level above the retrieve level with one
value, the retrieve level's with one value or a list of UIDs, nothing below it. It is
resolved with one SQL query over the index (:func:`resolve`), our own SEG and SR series
included: they are series of the study like any other.

=========  ==========================================================================
Status     Meaning (final response)
=========  ==========================================================================
0x0000     every sub-operation succeeded (also when nothing matched)
0xB000     some failed or had warnings: the Failed SOP Instance UID List says which
0xA702     every sub-operation failed
0xFE00     cancelled (C-CANCEL) before the sub-operations were done
0xA801     C-MOVE destination not in ``[[dicom.peers]]`` with ``move_destination``
0x0124     the calling AE has no ``retrieve`` right in ``[[dicom.peers]]``
0xA900     the identifier does not fit the information model (level, keys)
0xC000     the identifier cannot be decoded, or a key is not a UID
0xA701     more instances match than one retrieve can count (65535)
=========  ==========================================================================

pynetdicom runs the exchange (the generator protocol of ``EVT_C_MOVE``/``EVT_C_GET``);
what is offered and sent for each instance is decided in :mod:`.substore`. Where the
fast path is on (:mod:`.fastsend`), the handler runs the C-STORE sub-operations itself
(:mod:`.subops`, ~250 µs of CPU less per instance) and pynetdicom sends only the final
response; else it yields one ``(0xFF00, dataset)`` per instance to pynetdicom's loop. Because
pynetdicom has no way to answer a C-MOVE with a failure before it has associated with
the destination, a refused C-MOVE (no right, bad identifier) to a known destination
opens and releases one empty association to it, then answers the failure with an
ErrorComment. Every C-MOVE and C-GET is audited (:func:`pipeline.dicom.audit.audit_dimse`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts, build_context
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from sqlalchemy import select

from pipeline.archive import Archive
from pipeline.config import Settings
from pipeline.dicom.audit import audit_dimse
from pipeline.dicom.fastsend import ArchivedFile, enable, observe_responses
from pipeline.dicom.lease import unreserve
from pipeline.dicom.peers import may, move_destination
from pipeline.dicom.status import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_NOT_AUTHORISED,
    STATUS_SOP_CLASS_MISMATCH,
    STATUS_TOO_MANY_MATCHES,
    STATUS_UNKNOWN_DESTINATION,
)
from pipeline.dicom.subops import Exchange, final, send_all, usable
from pipeline.dicom.substore import (
    Match,
    StoreAssociation,
    Tally,
    accepted_syntaxes,
    describe,
    failed_list,
    final_status,
    prepare,
    status_dataset,
    store_contexts,
)
from pipeline.dicom.syntaxes import TRANSFER_SYNTAXES
from pipeline.dicom.tuning import PduLimits, advertised_pdu_size
from pipeline.index.db import session_scope
from pipeline.index.query import UNIQUE_KEYS  # keyed by Level, a str enum: "STUDY" finds it
from pipeline.index.schema import Instance, Patient, Series, Study

log = logging.getLogger(__name__)

PATIENT_ROOT = ("PATIENT", "STUDY", "SERIES", "IMAGE")
STUDY_ROOT = ("STUDY", "SERIES", "IMAGE")
MODELS = {
    PatientRootQueryRetrieveInformationModelMove: PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelGet: PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelMove: STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelGet: STUDY_ROOT,
}
_COLUMNS = {
    "PatientID": Patient.PatientID,
    "StudyInstanceUID": Study.StudyInstanceUID,
    "SeriesInstanceUID": Series.SeriesInstanceUID,
    "SOPInstanceUID": Instance.SOPInstanceUID,
}
# Tolerant when reading: leading zeros in a component occur in old UIDs.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_SUBOPERATIONS = 65535  # Number of ... Sub-operations are US
_IN_CHUNK = 500  # values per SQL IN (): far below SQLite's and PostgreSQL's parameter limits


class Refusal(Exception):
    """A retrieve refused before any sub-operation, with its status and ErrorComment."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


def _values(identifier: Dataset, keyword: str) -> list[str] | None:
    """The values of ``keyword`` (``None`` if absent, ``[]`` if empty)."""
    if keyword not in identifier:
        return None
    value = identifier[keyword].value
    if value is None:
        return []
    items = list(value) if isinstance(value, MultiValue | list) else [value]
    return [str(v).strip() for v in items if str(v).strip()]


def parse_identifier(identifier: Dataset, model: tuple[str, ...]) -> tuple[str, dict[str, list[str]]]:
    """The retrieve level and ``{unique key: values}``; :class:`Refusal` when it does not fit.

    Raises
    ------
    Refusal
        0xA900 for a level outside ``model``, a missing unique key, more than one value
        above the retrieve level or a key below it; 0xC000 for a key that is not a UID.
    """
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in model:
        raise Refusal(STATUS_SOP_CLASS_MISMATCH, f"QueryRetrieveLevel {level!r} is not one of {'/'.join(model)}")
    depth = model.index(level)
    keys: dict[str, list[str]] = {}
    for i, lvl in enumerate(model):
        keyword = UNIQUE_KEYS[lvl]
        values = _values(identifier, keyword)
        if i > depth:
            if values is not None:
                raise Refusal(STATUS_SOP_CLASS_MISMATCH, f"{keyword} is below the {level} retrieve level")
            continue
        if not values:
            raise Refusal(STATUS_SOP_CLASS_MISMATCH, f"unique key {keyword} missing for a {level} retrieve")
        if len(values) > 1 and (i < depth or keyword == "PatientID"):
            raise Refusal(STATUS_SOP_CLASS_MISMATCH, f"{keyword} must have one value at a {level} retrieve")
        if keyword != "PatientID":
            bad = next((v for v in values if len(v) > 64 or not _UID.match(v)), None)
            if bad is not None:
                raise Refusal(STATUS_CANNOT_UNDERSTAND, f"{keyword} {bad[:30]!r} is not a UID")
        keys[keyword] = values
    return level, keys


def resolve(archive: Archive, keys: dict[str, list[str]], target: str) -> list[Match]:
    """The archived instances ``keys`` name, in study, series and instance order.

    ``target`` is the unique key of the retrieve level (the one that may hold a list).
    """
    base = (
        select(
            Instance.SOPInstanceUID,
            Instance.SOPClassUID,
            Instance.TransferSyntaxUID,
            Study.StudyInstanceUID,
            Instance.path,
        )
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .order_by(Study.id, Series.SeriesNumber, Series.id, Instance.InstanceNumber, Instance.SOPInstanceUID)
    )
    if "PatientID" in keys:
        base = base.join(Patient, Study.patient_id == Patient.id)
    for keyword, values in keys.items():
        if keyword != target:
            base = base.where(_COLUMNS[keyword] == values[0])
    wanted = keys[target]
    matches: list[Match] = []
    with session_scope(archive.session_factory, readonly=True) as session:
        for start in range(0, len(wanted), _IN_CHUNK):
            stmt = base.where(_COLUMNS[target].in_(wanted[start : start + _IN_CHUNK]))
            matches.extend(
                Match(sop, cls, ts, study, archive.data_dir / rel) for sop, cls, ts, study, rel in session.execute(stmt)
            )
    return matches


class _Retrieve:
    """One C-MOVE or C-GET request: who asked, what, and its audit record."""

    def __init__(self, event: evt.Event, settings: Settings, archive: Archive, operation: str) -> None:
        self.event = event
        self.settings = settings
        self.archive = archive
        self.operation = operation
        self.calling = str(event.assoc.requestor.ae_title).strip()
        self.address = str(event.assoc.requestor.address)
        self.request = "(identifier not decoded)"
        self.study_uid = ""
        self.matches: list[Match] = []
        self.sent: list[str] = []
        self.tally = Tally()
        self.audited = False
        self.outcome: dict[str, object] = {}  # added to every audit record (e.g. the destination)

    def check(self) -> None:
        """Right, identifier and matches; raises :class:`Refusal`."""
        try:
            identifier = self.event.identifier
        except (ValueError, TypeError, AttributeError, KeyError, IndexError, EOFError, OverflowError) as err:
            raise Refusal(STATUS_CANNOT_UNDERSTAND, f"identifier cannot be decoded: {err}") from None
        # What was asked, for the log and the audit, before anything is judged.
        self.request = " ".join(f"{e.keyword or e.tag}={str(e.value)[:200]}" for e in identifier)[:512]
        if not may(self.settings.dicom, self.calling, "retrieve"):
            raise Refusal(STATUS_NOT_AUTHORISED, f"AE {self.calling} may not retrieve (no retrieve right)")
        model = MODELS.get(self.event.context.abstract_syntax, STUDY_ROOT)
        level, keys = parse_identifier(identifier, model)
        self.request = f"{level} " + " ".join(k + "=" + "\\".join(v) for k, v in keys.items())
        self.study_uid = keys.get("StudyInstanceUID", [""])[0]
        self.matches = resolve(self.archive, keys, UNIQUE_KEYS[level])
        if len(self.matches) > MAX_SUBOPERATIONS:
            raise Refusal(STATUS_TOO_MANY_MATCHES, f"{len(self.matches)} instances match; retrieve by series")
        if self.matches and not self.study_uid:
            self.study_uid = self.matches[0].StudyInstanceUID

    def refused(self, err: Refusal, **outcome: object) -> None:
        log.warning(
            "%s from %s (%s) refused with 0x%04X: %s [%s]",
            self.operation,
            self.calling,
            self.address,
            err.status,
            err.comment,
            self.request,
        )
        self.audit(err.status, reason=err.comment, **outcome)

    def audit(self, status: int, **outcome: object) -> None:
        self.audited = True
        audit_dimse(
            self.archive.session_factory,
            operation=self.operation,
            calling_ae=self.calling,
            address=self.address,
            request=self.request,
            status=status,
            study_uid=self.study_uid,
            **{**self.outcome, **outcome},
        )

    def suboperations(
        self,
        accepted: Callable[[], dict[str, set[str]]],
        left_out: set[str],
        fast: Callable[[], bool],
        exchange: Callable[[], Exchange | None],
    ) -> Iterator[Any]:
        """pynetdicom's ``(status, dataset)`` yields, one per instance, stopping at C-CANCEL;
        none when :mod:`pipeline.dicom.subops` runs the sub-operations (``exchange``)."""
        own = exchange()
        if own is not None and usable(own):
            self._send_all(own, accepted, left_out, fast)
            return
        for m in self.matches:
            if self.event.is_cancelled:
                self._cancelled()
                yield 0xFE00, failed_list(self.tally.failed(self.sent))
                return
            ds = self._dataset(m, accepted, left_out, fast)
            self.sent.append(m.SOPInstanceUID)
            yield 0xFF00, ds
        self.finish()

    def _dataset(
        self, m: Match, accepted: Callable[[], dict[str, set[str]]], left_out: set[str], fast: Callable[[], bool]
    ) -> Dataset:
        ds, problem = prepare(m, {} if m.SOPInstanceUID in left_out else accepted(), fast=fast())
        if m.SOPInstanceUID in left_out:
            problem = "more SOP classes and transfer syntaxes than one association holds"
        if problem:
            self.tally.problems[m.SOPInstanceUID] = problem
            log.warning("%s sub-operation for %s fails: %s", self.operation, m.SOPInstanceUID, problem)
        return ds

    def _cancelled(self) -> None:
        self.tally.cancelled = True
        log.info("%s from %s cancelled after %d of %d", self.operation, self.calling, len(self.sent), len(self.matches))
        self.finish()

    def _send_all(
        self,
        exchange: Exchange,
        accepted: Callable[[], dict[str, set[str]]],
        left_out: set[str],
        fast: Callable[[], bool],
    ) -> None:
        """The sub-operations by :func:`pipeline.dicom.subops.send_all`, and the final
        response pynetdicom sends given its status, counts and Failed SOP Instance UID List."""
        matches = self.matches

        def item(i: int) -> ArchivedFile | Dataset:
            m = matches[i]
            if fast() and m.SOPInstanceUID not in left_out and m.TransferSyntaxUID in accepted().get(m.SOPClassUID, ()):
                return ArchivedFile(m.SOPClassUID, m.SOPInstanceUID, m.path, m.TransferSyntaxUID)  # as prepare() does
            return self._dataset(m, accepted, left_out, fast)

        progress = send_all(
            exchange,
            [m.SOPInstanceUID for m in matches],
            item,
            lambda: self.event.is_cancelled,
            self.sent,
            self.tally.record,
        )
        if progress.cancelled:
            self._cancelled()
        else:
            self.finish()
        counts = self.tally.counts(self.sent)
        final(
            exchange,
            final_status(len(matches), counts, progress.cancelled),
            counts,
            self.tally.failed(self.sent),
            len(matches) - len(self.sent) if progress.cancelled else None,
            self.event.context.transfer_syntax,
        )

    def finish(self, **outcome: object) -> None:
        counts = self.tally.counts(self.sent)
        status = final_status(len(self.matches), counts, self.tally.cancelled)
        failed = self.tally.failed(self.sent)
        log.log(
            logging.INFO if status == 0 else logging.WARNING,
            "%s from %s (%s) of %s: 0x%04X, %d instances, %s",
            self.operation,
            self.calling,
            self.address,
            self.request,
            status,
            len(self.matches),
            describe(counts),
        )
        self.audit(
            status,
            instances=len(self.matches),
            **counts,
            failed_uids=failed[:20],
            reasons=sorted(set(self.tally.problems.values()))[:5],
            **outcome,
        )


def handle_move(event: evt.Event, settings: Settings, archive: Archive) -> Iterator[Any]:
    """``EVT_C_MOVE`` handler (pynetdicom's generator protocol)."""
    job = _Retrieve(event, settings, archive, "C-MOVE")
    destination_ae = event.request.MoveDestination
    if isinstance(destination_ae, bytes):
        destination_ae = destination_ae.decode("ascii", "replace")
    destination_ae = str(destination_ae or "").strip()
    job.outcome["destination"] = destination_ae
    destination = move_destination(settings.dicom, destination_ae)
    if destination is None:
        job.refused(Refusal(STATUS_UNKNOWN_DESTINATION, f"move destination {destination_ae!r} is not a known peer"))
        yield None, None
        return
    try:
        job.check()
    except Refusal as err:
        job.refused(err)
        yield destination.host, destination.port, {"contexts": [build_context(Verification)]}
        yield 1
        yield status_dataset(err.status, err.comment), failed_list([])
        return
    contexts, left_out = store_contexts(job.matches)
    enable(event.assoc)  # the pending responses, one per sub-operation (the receiver tuned it)
    # The limits the receiver reads within; our own maximum PDU is what responses may use.
    limits = PduLimits(
        max_pdu_size=settings.dicom.max_pdu_size,
        pdu_timeout=settings.dicom.pdu_timeout_seconds,
        establish_timeout=settings.dicom.association_timeout_seconds,
    )
    store = StoreAssociation(limits=limits, observer=job.tally.record)
    options = {
        "contexts": contexts,
        "max_pdu": advertised_pdu_size(settings.dicom.max_pdu_size),
        "evt_handlers": [(evt.EVT_CONN_OPEN, store.on_open), (evt.EVT_DIMSE_RECV, job.tally.on_dimse_recv)],
    }
    log.info("C-MOVE from %s of %s: %d instances to %s", job.calling, job.request, len(job.matches), destination_ae)
    yield destination.host, destination.port, options
    yield len(job.matches)
    if not job.matches:
        job.finish()
        return

    def exchange() -> Exchange | None:
        return Exchange.of(event, store.assoc, move=True) if store.assoc is not None and store.fast else None

    try:
        yield from job.suboperations(store.accepted, left_out, lambda: store.fast, exchange)
    finally:
        if not job.audited:  # the requestor went away mid-move
            job.finish(aborted=True)


def handle_get(event: evt.Event, settings: Settings, archive: Archive) -> Iterator[Any]:
    """``EVT_C_GET`` handler: the C-STOREs go back on the requesting association."""
    job = _Retrieve(event, settings, archive, "C-GET")
    try:
        job.check()
    except Refusal as err:
        job.refused(err)
        yield 1
        yield status_dataset(err.status, err.comment), failed_list([])
        return
    log.info("C-GET from %s of %s: %d instances", job.calling, job.request, len(job.matches))
    yield len(job.matches)
    if not job.matches:
        job.finish()
        return

    syntaxes = accepted_syntaxes(event.assoc.accepted_contexts, acceptor=True)  # fixed once accepted

    def accepted() -> dict[str, set[str]]:
        return syntaxes

    fast = enable(event.assoc)  # the receiver tuned it at EVT_CONN_OPEN
    event.assoc.bind(evt.EVT_DIMSE_RECV, job.tally.on_dimse_recv)
    observe_responses(event.assoc, job.tally.record)

    def exchange() -> Exchange | None:
        return Exchange.of(event, event.assoc, move=False) if fast else None

    try:
        yield from job.suboperations(accepted, set(), lambda: fast, exchange)
    finally:
        unreserve(event.assoc)  # the requestor's next message is read at once
        observe_responses(event.assoc, None)
        event.assoc.unbind(evt.EVT_DIMSE_RECV, job.tally.on_dimse_recv)
        if not job.audited:
            job.finish(aborted=True)


RETRIEVE_SOP_CLASSES = tuple(MODELS)


def add_retrieve_contexts(ae: AE) -> None:
    """Support C-MOVE and C-GET of both models, and the SCP role C-GET requestors ask for.

    A C-GET requestor proposes the storage SOP classes it wants back with an SCP/SCU
    role selection (it is their SCP); the storage contexts accept the proposed roles.
    """
    for uid in RETRIEVE_SOP_CLASSES:
        ae.add_supported_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES, scu_role=True, scp_role=True)


def retrieve_handlers(settings: Settings, archive: Archive) -> list[Any]:
    """The ``evt_handlers`` entries of the C-MOVE and C-GET SCP."""
    return [
        (evt.EVT_C_MOVE, handle_move, [settings, archive]),
        (evt.EVT_C_GET, handle_get, [settings, archive]),
    ]
