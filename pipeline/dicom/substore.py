"""The C-STORE sub-operations of a C-MOVE or C-GET: what to offer, what to send, the tally.

pynetdicom opens the C-MOVE destination's association when the handler yields the
address, and either sends each dataset the handler yields or lets
:mod:`pipeline.dicom.subops` run the sub-operations; this module decides everything
around that:

* :func:`store_contexts`: the presentation contexts to propose to a C-MOVE destination:
  per SOP class, one context per stored compressed transfer syntax (the file goes as it
  is) and one with Explicit and Implicit VR Little Endian (the fallback, between which
  pynetdicom converts). PS3.4 C.4.2.3.1.
* :func:`prepare`: one archived file as the dataset to send over the contexts the peer
  accepted: as stored when its syntax was accepted, decompressed (pydicom and the
  pylibjpeg plugins) when only uncompressed was, and otherwise with the reason it
  cannot go. A dataset that cannot go is still yielded, so that pynetdicom counts its
  sub-operation as failed and lists its SOP Instance UID in the final response.
* :class:`Tally`: the C-STORE responses as they arrive (an ``EVT_DIMSE_RECV`` handler
  bound to the association that carries them, and the observer of the responses
  :mod:`pipeline.dicom.fastsend` reads itself), for the log, the audit and the final
  status.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import code_to_category

from pipeline.dicom.fastsend import StoredFile, enable, observe_responses
from pipeline.dicom.syntaxes import UNCOMPRESSED, contexts_for
from pipeline.dicom.tuning import PduLimits, tune_association

log = logging.getLogger(__name__)

# A transfer syntax no peer accepts: pynetdicom then fails the sub-operation of a file
# that could not be read, and lists its SOP Instance UID as failed.
UNSENDABLE = UID("1.2.826.0.1.3680043.10.1462.999.1")


@dataclass(frozen=True)
class Match:
    """One instance a retrieve names, from the index."""

    SOPInstanceUID: str
    SOPClassUID: str
    TransferSyntaxUID: str
    StudyInstanceUID: str
    path: Path


def store_contexts(matches: Iterable[Match]) -> tuple[list[PresentationContext], set[str]]:
    """Presentation contexts for a C-MOVE destination, and the SOP Instance UIDs whose
    context did not fit in :data:`MAX_CONTEXTS`."""
    stored: dict[str, list[str]] = {}
    for m in matches:
        syntaxes = stored.setdefault(m.SOPClassUID, [])
        if m.TransferSyntaxUID not in syntaxes:
            syntaxes.append(m.TransferSyntaxUID)
    contexts, fitted = contexts_for(stored)
    # An instance whose compressed context did not fit still goes if the uncompressed one did.
    left_out = {
        m.SOPInstanceUID
        for m in matches
        if (m.SOPClassUID, m.TransferSyntaxUID) not in fitted and (m.SOPClassUID, ExplicitVRLittleEndian) not in fitted
    }
    return contexts, left_out


def accepted_syntaxes(contexts: Iterable[PresentationContext], *, acceptor: bool) -> dict[str, set[str]]:
    """``{SOP Class UID: transfer syntaxes}`` we may send C-STOREs in.

    ``acceptor``: we accepted the association (C-GET) and need the SCU role the
    requestor gave us; otherwise (C-MOVE) we requested it and are its SCU.
    """
    accepted: dict[str, set[str]] = {}
    for cx in contexts:
        if acceptor and not cx.as_scu:
            continue
        accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
    return accepted


def _unsendable(m: Match) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = m.SOPClassUID
    ds.SOPInstanceUID = m.SOPInstanceUID
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UNSENDABLE
    return ds


def prepare(m: Match, accepted: dict[str, set[str]], *, fast: bool = False) -> tuple[Dataset, str]:
    """The dataset to send for ``m`` over ``accepted``, and why it cannot go ("" if it can).

    The file's data elements are sent as stored (pydicom writes the values it read
    back as they were); only decompression changes them. ``fast`` (the association has
    :func:`pipeline.dicom.fastsend.enable`): an instance whose stored transfer syntax was
    accepted is a :class:`~pipeline.dicom.fastsend.StoredFile`, sent as its bytes.
    """
    syntaxes = accepted.get(m.SOPClassUID, set())
    if fast and m.TransferSyntaxUID in syntaxes:
        return StoredFile(m.SOPClassUID, m.SOPInstanceUID, m.path, m.TransferSyntaxUID), ""
    try:
        ds = dcmread(m.path)
    except (OSError, InvalidDicomError, ValueError, EOFError) as err:
        return _unsendable(m), f"cannot read the archived file {m.path}: {err}"
    stored = UID(ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))
    if not syntaxes:
        return ds, f"the peer accepted no presentation context for SOP class {UID(m.SOPClassUID).name}"
    if stored in syntaxes or not stored.is_compressed:
        return ds, ""  # as stored, or pynetdicom converts between the uncompressed syntaxes
    if not syntaxes & set(UNCOMPRESSED):
        return ds, f"the peer accepts {UID(m.SOPClassUID).name} neither in {stored.name} nor uncompressed"
    try:
        ds.decompress(generate_instance_uid=False)  # the same instance, only re-encoded
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError) as err:
        return ds, f"the peer wants it uncompressed, and it cannot be decompressed from {stored.name}: {err}"
    log.debug("sub-operation for %s: decompressed from %s", m.SOPInstanceUID, stored.name)
    return ds, ""


@dataclass
class Tally:
    """The outcome of each C-STORE sub-operation, by SOP Instance UID."""

    statuses: dict[str, int] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    cancelled: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def on_dimse_recv(self, event: evt.Event) -> None:
        """``EVT_DIMSE_RECV`` handler: note each C-STORE response."""
        message = event.message
        if type(message).__name__ != "C_STORE_RSP":
            return
        command = message.command_set
        self.record(str(command.AffectedSOPInstanceUID), int(command.Status))

    def record(self, sop_instance_uid: str, status: int) -> None:
        """Note one C-STORE response (also what :func:`pipeline.dicom.fastsend.observe_responses`
        reports of the responses pynetdicom never sees)."""
        with self._lock:
            self.statuses[sop_instance_uid] = status

    def failed(self, sent: Iterable[str]) -> list[str]:
        """The SOP Instance UIDs of ``sent`` that did not arrive (failure or no response)."""
        return [uid for uid in sent if code_to_category(self.statuses.get(uid, 0xA700)) not in ("Success", "Warning")]

    def counts(self, sent: list[str]) -> dict[str, int]:
        failed = self.failed(sent)
        warning = sum(1 for uid in sent if code_to_category(self.statuses.get(uid, 0xA700)) == "Warning")
        return {"completed": len(sent) - len(failed) - warning, "failed": len(failed), "warning": warning}


def final_status(total: int, counts: dict[str, int], cancelled: bool) -> int:
    """The final C-MOVE/C-GET status pynetdicom sends for these counts (PS3.4 C.4.2.1.5)."""
    if cancelled:
        return 0xFE00
    if not counts["failed"] and not counts["warning"]:
        return 0x0000
    return 0xA702 if counts["failed"] == total else 0xB000


@dataclass
class StoreAssociation:
    """Holds the C-MOVE destination's association once pynetdicom has opened it."""

    assoc: object = None
    limits: PduLimits | None = None
    fast: bool = False  # its C-STOREs go by pipeline.dicom.fastsend
    observer: Callable[[str, int], None] | None = None  # each C-STORE response fastsend reads
    _accepted: dict[str, set[str]] | None = None

    def on_open(self, event: evt.Event) -> None:
        """``EVT_CONN_OPEN`` handler of the sub-association: keep it, disable Nagle, tune
        it as the receiver's associations are and send its C-STOREs the fast way."""
        self.assoc = event.assoc
        sock = event.assoc.dul.socket.socket
        if sock is not None:  # Nagle's algorithm costs ~40 ms per C-STORE round trip on loopback
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fast = tune_association(event.assoc, self.limits, requestor=True) and enable(event.assoc)
        if self.fast:
            observe_responses(event.assoc, self.observer)

    def accepted(self) -> dict[str, set[str]]:
        """What the destination accepted (computed once: it cannot change)."""
        if self._accepted is None and self.assoc is not None:
            self._accepted = accepted_syntaxes(getattr(self.assoc, "accepted_contexts", []), acceptor=False)
        return self._accepted or {}


def failed_list(uids: list[str]) -> Dataset:
    """The identifier of a final response: the Failed SOP Instance UID List."""
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = uids
    return ds


def status_dataset(code: int, comment: str) -> Dataset:
    """A status with an ErrorComment (LO: at most 64 characters)."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


CancelCheck = Callable[[], bool]
