"""Our own loop over a C-MOVE's or C-GET's C-STORE sub-operations: the retrieve fast path.

pynetdicom runs a retrieve's sub-operations itself, one ``(status, dataset)`` yield of the
handler at a time: per instance it validates the status into its response primitive,
formats two log lines, sends the C-STORE, looks the status up, sets four validating
properties and encodes the pending C-MOVE/C-GET-RSP through its DIMSE message classes,
~250 µs of CPU per instance beside the C-STORE itself. On an association where
:func:`pipeline.dicom.fastsend.active` holds (for a C-MOVE, its destination's too), the
handler runs :func:`send_all` instead, inside one step of pynetdicom's loop:

* each instance comes from the handler: an :class:`~pipeline.dicom.fastsend.ArchivedFile`
  when the peer accepted its stored transfer syntax, sent as its bytes with no dataset
  built (:func:`pipeline.dicom.fastsend.store_status`), else the decompressed or
  unsendable dataset of :func:`pipeline.dicom.substore.prepare`, through pynetdicom's own
  ``send_c_store`` as before; the same Message IDs as pynetdicom's, and the requestor as Move Originator;
* each pending response is written as bytes (:class:`pipeline.dicom.wire.SuboperationResponses`);
* a C-CANCEL (``event.is_cancelled``, as before), an A-ABORT or A-RELEASE-RQ of the
  requestor (what pynetdicom checks between yields) and a C-STORE that raises (a
  destination that went away: failed, as pynetdicom counts it) end or count as they did;
* the final response stays pynetdicom's (after it has released a C-MOVE's destination):
  :func:`pipeline.dicom.fastsend.final_response` gives it the status, counts and Failed
  SOP Instance UID List of the sub-operations run here.

It relies on how pynetdicom 3.0.4's ``_get_scp``/``_move_scp`` end after the handler's
last yield (one final response, sent through ``dimse.send_msg``): with another version
:func:`usable` says no, once with a WARNING, and the handler yields to pynetdicom as
before. So does pynetdicom's logger at DEBUG (its own loop logs every sub-operation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import pynetdicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import encode
from pynetdicom.status import code_to_category

from pipeline.dicom import fastsend
from pipeline.dicom.fastsend import ArchivedFile
from pipeline.dicom.substore import failed_list
from pipeline.dicom.tuning import PYNETDICOM_VERSION, _skipped
from pipeline.dicom.wire import SuboperationResponses

log = logging.getLogger(__name__)


@dataclass
class Exchange:
    """One C-MOVE or C-GET whose sub-operations :func:`send_all` runs."""

    assoc: Any  # the requestor's association: the responses go there
    store: Any  # the association the C-STOREs go on (C-GET: the same)
    move: bool
    msg_id: int  # the request's Message ID
    context_id: int  # the request's presentation context
    sop_class: str  # the request's Affected SOP Class UID
    originator: str | None = None  # C-MOVE: the requestor's AE title, each C-STORE's Move Originator

    @classmethod
    def of(cls, event: Any, store: Any, *, move: bool) -> Exchange:
        """The exchange of a C-MOVE or C-GET request event, its C-STOREs on ``store``."""
        request, assoc = event.request, event.assoc
        return cls(
            assoc,
            store,
            move,
            int(request.MessageID),
            int(event.context.context_id),
            str(request.AffectedSOPClassUID),
            # PS3.7 9.1.1.1: the Move Originator is the AE that invoked the C-MOVE.
            str(assoc.requestor.ae_title).strip() if move else None,
        )


@dataclass
class Progress:
    """What :func:`send_all` did: the SOP Instance UIDs it sent a C-STORE for (or failed),
    and how it ended."""

    sent: list[str] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    warning: int = 0
    cancelled: bool = False
    gone: bool = False  # the requestor aborted or asked to release: no final response


def usable(exchange: Exchange) -> bool:
    """Whether :func:`send_all` may run this exchange (else: pynetdicom's loop)."""
    if pynetdicom.__version__ != PYNETDICOM_VERSION:
        _skipped("own sub-operation loop", "its final response is pynetdicom 3.0.4's")
        return False
    return fastsend.active(exchange.assoc) and (exchange.store is exchange.assoc or fastsend.active(exchange.store))


def _requestor_gone(assoc: Any) -> bool:
    """What pynetdicom checks between two yields of a retrieve handler."""
    acse = assoc.acse
    return not assoc.is_established or acse.is_aborted() or acse.is_release_requested()


def send_all(
    exchange: Exchange,
    instances: Sequence[str],
    dataset_for: Callable[[int], ArchivedFile | Dataset],
    is_cancelled: Callable[[], bool],
    sent: list[str],
    record: Callable[[str, int], None],
) -> Progress:
    """Send a C-STORE for each of ``instances`` (SOP Instance UIDs; ``dataset_for(i)`` is the
    dataset of the i-th), a pending response after each, until done, cancelled or the
    requestor is gone. Each UID goes into ``sent`` as its C-STORE goes, each status to
    ``record`` (0xA700 when the C-STORE raised). The caller registers the final response."""
    progress = Progress(sent=sent)
    responses = SuboperationResponses(exchange.move, exchange.sop_class, exchange.msg_id)
    total = len(instances)
    store, assoc = exchange.store, exchange.assoc
    originator_id = exchange.msg_id if exchange.move else None
    for i, uid in enumerate(instances):
        if is_cancelled():
            progress.cancelled = True
            return progress
        if _requestor_gone(assoc):
            progress.gone = True
            return progress
        dataset = dataset_for(i)
        msg_id = exchange.msg_id + i + 1  # pynetdicom's Message IDs (US: they wrap)
        if msg_id > 65535:
            msg_id -= 65535
        progress.sent.append(uid)
        try:
            status = fastsend.store_status(store, dataset, msg_id, exchange.originator, originator_id)
        except Exception as err:  # noqa: BLE001 - as pynetdicom: any exception fails the sub-operation
            log.warning("C-STORE sub-operation for %s failed: %s", uid, err)
            status = 0xA700
        record(uid, status)
        category = code_to_category(status)
        if category == "Success":
            progress.completed += 1
        elif category == "Warning":
            progress.warning += 1
        else:
            progress.failed += 1
        command = responses.pending(total - i - 1, progress.completed, progress.failed, progress.warning)
        if not fastsend.send_command(assoc, exchange.context_id, command):
            progress.gone = True
            return progress
    return progress


def final(
    exchange: Exchange,
    status: int,
    counts: dict[str, int],
    failed: list[str],
    remaining: int | None,
    transfer_syntax: UID,
) -> None:
    """Have pynetdicom's final response to ``exchange`` say ``status`` and ``counts``, with
    the Failed SOP Instance UID List ``failed`` unless it is Success, and ``remaining``
    (Number of Remaining Sub-operations) only when cancelled (PS3.4 C.4.2.1.6)."""
    identifier = None
    if status != 0:
        identifier = encode(failed_list(failed), transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian)

    def fill(rsp: Any) -> None:
        rsp.Status = status
        rsp.NumberOfRemainingSuboperations = remaining
        rsp.NumberOfCompletedSuboperations = counts["completed"]
        rsp.NumberOfFailedSuboperations = counts["failed"]
        rsp.NumberOfWarningSuboperations = counts["warning"]
        rsp.Identifier = None if identifier is None else BytesIO(identifier)

    fastsend.final_response(exchange.assoc, exchange.msg_id, fill)
