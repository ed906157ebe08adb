"""A C-STORE SCU: send DICOM files to a peer over one association.

Used by ``radtriage demo``; small on purpose. Sockets get TCP_NODELAY.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import AE, evt

from pipeline.errors import TransientError


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: Nagle's algorithm costs 10x on small PDUs."""
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass
class SendReport:
    sent: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def parse_peer(spec: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` → (ae_title, host, port), with an error that says the format."""
    try:
        ae_title, address = spec.split("@", 1)
        host, port = address.rsplit(":", 1)
        return ae_title, host, int(port)
    except ValueError:
        raise ValueError(f"{spec!r} is not AE@HOST:PORT (e.g. RADTRIAGE@127.0.0.1:11112)") from None


def send_files(
    files: Sequence[Path], ae_title: str, host: str, port: int, *, calling_ae: str = "STORESCU", timeout: float = 30.0
) -> SendReport:
    """Send ``files`` in one association; per file, the SOP Instance UID sent or the failure.

    Raises
    ------
    TransientError
        The peer cannot be reached or rejects the association.
    """
    datasets = [pydicom.dcmread(path) for path in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    if not assoc.is_established:
        raise TransientError(f"{ae_title}@{host}:{port} did not accept an association from {calling_ae}")
    report = SendReport()
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code == 0x0000:
                report.sent.append(str(ds.SOPInstanceUID))
            else:
                report.failed[str(ds.SOPInstanceUID)] = f"status 0x{code:04X}" if code is not None else "no response"
    finally:
        assoc.release()
    return report
