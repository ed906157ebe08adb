"""Who may do what, per calling AE title: the ``[[dicom.peers]]`` table.

``[dicom] allowed_aes`` keeps meaning "may store"; querying (C-FIND), retrieving (C-MOVE,
C-GET) and being a C-MOVE destination need a peer entry that allows them. Deny by
default: an AE title not in the table may do none of those.
"""

from __future__ import annotations

from pipeline.config import DicomPeer, DicomSettings, PeerRight


def find_peer(dicom: DicomSettings, ae_title: str) -> DicomPeer | None:
    """The peer entry for ``ae_title`` (compared without surrounding spaces), or ``None``."""
    wanted = ae_title.strip()
    return next((p for p in dicom.peers if p.ae_title == wanted), None)


def may(dicom: DicomSettings, ae_title: str, right: PeerRight) -> bool:
    """Whether ``ae_title`` has ``right``; ``store`` is also given by ``allowed_aes``."""
    if right == "store" and (dicom.open_to_all or ae_title.strip() in dicom.allowed_aes):
        return True
    peer = find_peer(dicom, ae_title)
    return peer is not None and right in peer.allow


def move_destination(dicom: DicomSettings, ae_title: str) -> DicomPeer | None:
    """Where a C-MOVE to ``ae_title`` goes: its peer entry, if it may be a destination."""
    peer = find_peer(dicom, ae_title)
    return peer if peer is not None and "move_destination" in peer.allow else None
