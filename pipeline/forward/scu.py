"""C-STORE SCU: deliver archived files to one archive node over one association."""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Comprehensive3DSRStorage, SegmentationStorage
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from pipeline.config import DicomSettings
from pipeline.dicom.syntaxes import contexts_for
from pipeline.forward.queue import Outcome, Target

log = logging.getLogger(__name__)

# Always proposed, so a node that lacks them rejects at negotiation and says so.
RESULT_SOP_CLASSES = (SegmentationStorage, Comprehensive3DSRStorage)


@dataclass(frozen=True)
class Item:
    """One job to send: the file, or why there is none."""

    job_id: int
    SOPInstanceUID: str
    path: Path | None
    problem: str = ""


def _on_open(event: Event, seen: dict[str, object]) -> None:
    # Nagle's algorithm costs ~40 ms per PDU round trip on loopback.
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    seen["connected"] = True


def _on_acse_recv(event: Event, seen: dict[str, object]) -> None:
    primitive = getattr(event, "primitive", None)
    seen["answered"] = True
    if getattr(primitive, "result", None) in (0x01, 0x02):
        seen["rejection"] = primitive


def describe_status(code: int) -> str:
    """``0xA700 Failure: Refused: Out of resources`` style text for a C-STORE status."""
    category = code_to_category(code)
    description = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", ""))[1]
    text = f"0x{code:04X} {category}"
    return f"{text}: {description}" if description else text


def _contexts(metas: dict[int, tuple[UID, UID]]) -> tuple[list[PresentationContext], set[int]]:
    """Presentation contexts for the files; ids of jobs whose context did not fit."""
    stored: dict[UID, list[UID]] = {}
    for sop_class, syntax in metas.values():
        syntaxes = stored.setdefault(sop_class, [])
        if syntax not in syntaxes:
            syntaxes.append(syntax)
    for sop_class in RESULT_SOP_CLASSES:
        stored.setdefault(UID(sop_class), [])
    contexts, fitted = contexts_for(stored)
    left_out = {job_id for job_id, key in metas.items() if key not in fitted}
    return contexts, left_out


def store_items(target: Target, items: Sequence[Item], dicom: DicomSettings) -> tuple[list[Outcome], list[int]]:
    """Send ``items`` to ``target`` over one association.

    Returns
    -------
    outcomes
        One per attempted item: delivered, or the failure (no file, association
        refused or lost, a failure status).
    not_tried
        Jobs left for the next round (more SOP classes than one association holds).
    """
    outcomes: list[Outcome] = []
    metas: dict[int, tuple[UID, UID]] = {}
    sendable: list[Item] = []
    for item in items:
        if item.path is None:
            outcomes.append(Outcome(item.job_id, False, item.problem or "not in the archive"))
            continue
        try:
            meta = read_file_meta_info(item.path)
            metas[item.job_id] = (UID(meta.MediaStorageSOPClassUID), UID(meta.TransferSyntaxUID))
        except (OSError, AttributeError, ValueError, InvalidDicomError) as err:
            outcomes.append(Outcome(item.job_id, False, f"cannot read archived file {item.path}: {err}"))
            continue
        sendable.append(item)
    if not sendable:
        return outcomes, []

    contexts, left_out = _contexts(metas)
    sendable = [i for i in sendable if i.job_id not in left_out]
    ae = AE(ae_title=dicom.ae_title)
    ae.requested_contexts = contexts
    ae.maximum_pdu_size = dicom.max_pdu_size
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dicom.network_timeout_seconds
    ae.connection_timeout = dicom.network_timeout_seconds
    seen: dict[str, object] = {}
    assoc = ae.associate(
        target.host,
        target.port,
        ae_title=target.ae_title,
        max_pdu=dicom.max_pdu_size,
        evt_handlers=[(evt.EVT_CONN_OPEN, _on_open, [seen]), (evt.EVT_ACSE_RECV, _on_acse_recv, [seen])],
    )
    if not assoc.is_established:
        reason = _association_failure(target, assoc, seen, dicom.network_timeout_seconds)
        log.warning("forwarding to %s: %s; %d objects wait", target, reason, len(sendable))
        outcomes.extend(Outcome(i.job_id, False, reason) for i in sendable)
        return outcomes, sorted(left_out)
    try:
        for message_id, item in enumerate(sendable, start=1):
            outcomes.append(_send_one(target, assoc, item, message_id))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes, sorted(left_out)


def _send_one(target: Target, assoc: Association, item: Item, message_id: int) -> Outcome:
    if not assoc.is_established:
        return Outcome(item.job_id, False, f"association with {target} was lost before this object was sent")
    try:
        status = assoc.send_c_store(item.path, msg_id=message_id)
    except ValueError as err:  # no accepted context, or the file could not be encoded for it
        return Outcome(item.job_id, False, f"{target} cannot take this object: {err}")
    except (OSError, AttributeError) as err:
        return Outcome(item.job_id, False, f"cannot send archived file {item.path}: {err}")
    if "Status" not in status:
        return Outcome(
            item.job_id,
            False,
            f"no C-STORE response from {target} (connection lost, aborted or timed out after {assoc.dimse_timeout} s)",
        )
    code = int(status.Status)
    category = code_to_category(code)
    if category == "Success":
        return Outcome(item.job_id, True)
    if category == "Warning":
        warning = f"delivered with warning {describe_status(code)}"
        log.warning("forwarding %s to %s: %s", item.SOPInstanceUID, target, warning)
        return Outcome(item.job_id, True, warning=warning)
    comment = f" ({status.ErrorComment})" if "ErrorComment" in status else ""
    error = f"{target} answered C-STORE with {describe_status(code)}{comment}"
    log.warning("forwarding %s: %s", item.SOPInstanceUID, error)
    return Outcome(item.job_id, False, error)


def _association_failure(target: Target, assoc: Association, seen: dict[str, object], timeout: float) -> str:
    rsp = seen.get("rejection")
    if rsp is not None:
        return (
            f"{target} rejected the association ({getattr(rsp, 'result_str', '')}, "
            f"{getattr(rsp, 'source_str', '')}: {getattr(rsp, 'reason_str', '')}); check the "
            "destination's AE title and that the node accepts our calling AE title"
        )
    if not seen.get("connected"):
        return f"cannot connect to {target} (connection refused or no answer within {timeout:g} s): node down or unreachable"
    if not seen.get("answered"):
        return f"{target} accepted the connection but did not answer the association request within {timeout:g} s"
    return f"{target} aborted the association or accepted none of our SOP classes (SEG, Comprehensive 3D SR, ...)"
