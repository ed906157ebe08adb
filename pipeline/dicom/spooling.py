"""Write each C-STORE dataset to its temp file while its PDUs arrive
(:mod:`pipeline.archive.spool` says why).

pynetdicom collects a dataset's P-DATA fragments in a ``BytesIO`` on the message being
decoded. :func:`spool_stores` (an EVT_CONN_OPEN handler) wraps the association's
``dimse.receive_primitive``: once a C-STORE request's command set is in and its dataset
has begun, the message's buffer is replaced by a :class:`SpoolingBuffer`, which keeps
the bytes in memory as before (the header is parsed from them) and also appends them to
an archive spool. The C-STORE handler finds the spool on ``request.DataSet.spool``; its
fdatasync was started as the complete message was queued for the handler
(:meth:`~pipeline.archive.spool.Spool.flush_ahead`).
Messages that arrive in one P-DATA, calling AEs that may not store, and anything a spool
cannot be made for take the ordinary path. A connection closed in the middle of a
dataset removes its spool (:func:`drop_unfinished`).

The same handler also makes the association decode incoming P-DATA and C-STORE
requests the lean way (:mod:`pipeline.dicom.incoming`). All this is for the C-STOREs
pynetdicom reads: on a plain association the first; the association's own thread reads
those that follow (:mod:`pipeline.dicom.storescp`), spooling them the same way.
"""

from __future__ import annotations

import logging
from io import BytesIO
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ

from pipeline.archive import Archive
from pipeline.archive.spool import Spool
from pipeline.config import DicomSettings
from pipeline.dicom.incoming import lean_p_data, lean_store_request, store_request_uids
from pipeline.dicom.peers import may

log = logging.getLogger(__name__)

_TRIED = "_radtriage_spool_tried"


class SpoolingBuffer(BytesIO):
    """A message's dataset buffer that also appends every write to ``spool``."""

    def __init__(self, initial: bytes, spool: Spool) -> None:
        super().__init__()
        self.spool = spool
        self.write(initial)

    def write(self, data: Any) -> int:  # type: ignore[override]
        written = super().write(data)
        self.spool.write(data)
        return written


def spool_of(dataset: Any) -> Spool | None:
    """The spool a received C-STORE dataset buffer was written to, if any."""
    return getattr(dataset, "spool", None)


def spool_stores(event: evt.Event, archive: Archive, dicom: DicomSettings | None = None) -> None:
    """EVT_CONN_OPEN handler: spool the datasets of this association's C-STORE requests,
    decoding its P-DATA-TF PDUs and C-STORE requests the lean way
    (:mod:`pipeline.dicom.incoming`)."""
    lean_p_data(event.assoc)
    dimse = event.assoc.dimse
    receive = dimse.receive_primitive
    queue_message = dimse.msg_queue.put

    def put_message(item: Any, *args: Any, **kwargs: Any) -> None:
        # A complete message, before its handler can see it: a spooled dataset's
        # fdatasync starts now (pipeline.archive.spool).
        spool = spool_of(getattr(item[1], "DataSet", None)) if type(item) is tuple and len(item) == 2 else None
        if spool is not None:
            spool.flush_ahead()
        queue_message(item, *args, **kwargs)

    dimse.msg_queue.put = put_message

    def receive_primitive(primitive: Any) -> None:
        receive(primitive)
        message = dimse.message  # None again once a message was complete
        if message is None or type(message) is not C_STORE_RQ or getattr(message, _TRIED, False):
            return
        setattr(message, _TRIED, True)
        lean_store_request(message)
        if type(message.data_set) is not BytesIO:
            return
        _start(event.assoc, message, archive, dicom)

    dimse.receive_primitive = receive_primitive


def drop_unfinished(event: evt.Event) -> None:
    """EVT_CONN_CLOSE handler: a connection that closed inside a C-STORE (aborted, timed
    out, the peer gone) leaves no spool file behind."""
    message = getattr(event.assoc.dimse, "message", None)
    spool = spool_of(getattr(message, "data_set", None))
    if spool is not None:
        spool.discard()


def _start(assoc: Any, message: Any, archive: Archive, dicom: DicomSettings | None) -> None:
    calling = assoc.requestor.ae_title
    if dicom is not None and not may(dicom, calling, "store"):
        return  # handle_store refuses it; nothing to write
    context = assoc._accepted_cx.get(message.context_id)
    if context is None:
        return
    sop_class_uid, sop_instance_uid = store_request_uids(message)
    spool = archive.open_spool(
        transfer_syntax=str(context.transfer_syntax[0]),
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        source_ae=calling,
    )
    if spool is not None:
        message.data_set = SpoolingBuffer(message.data_set.getvalue(), spool)
