"""The DICOM receiver: C-ECHO, C-STORE for every storage SOP class, and C-FIND.

The C-STORE handler only writes and indexes (through :class:`pipeline.archive.Archive`)
and answers; it never decodes pixel data and never runs a model. Bad input gets a
failure status with an ErrorComment and a log line saying why; the server stays up.

=========  ==========================================================================
Status     Meaning
=========  ==========================================================================
0x0000     stored (or a resend of an instance already stored)
0xA700     out of resources: the archive disk or the index is full
0xA900     the dataset's SOP Class/Instance UID differs from the request's
0xC000     the dataset does not parse
0xC001     Study/Series/SOP Instance UID missing or not a valid UID
0x0124     the calling AE may not store (a ``[[dicom.peers]]`` entry without ``store``)
=========  ==========================================================================

C-FIND (Patient Root and Study Root) is answered by :mod:`pipeline.dicom.find`;
C-MOVE and C-GET come from :mod:`pipeline.dicom.retrieve` (its contexts and handlers are added here).

With ``[dicom] workers`` above 1, ``radtriage serve`` runs this receiver in that many
processes accepting on one shared listening socket (:mod:`pipeline.dicom.workers`);
each process applies everything below itself.

Who may do what is ``[dicom] allowed_aes`` (store) and ``[[dicom.peers]]`` (store,
query, retrieve): an association from an AE title with none of these rights, or that
proposes only services it may not use (a C-FIND from an AE without ``query``), is
rejected before it starts ("Calling AE Title Not Recognized") with a log line saying
which right is missing; a handler refuses what slips through on a mixed association.

Before a peer is known (a TCP connection, an A-ASSOCIATE-RQ), everything it can make
the receiver hold is bounded: connections per source address and in total
(:class:`ConnectionGate`, refused at ``accept`` with no thread started; a slot is free
again as soon as its socket closes), the time to the A-ASSOCIATE-AC
(``association_timeout_seconds``), the length and the arrival time of each PDU
(:class:`pipeline.dicom.tuning.PduLimits`), and the called AE title (``called_aes``).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
import time
from collections import defaultdict
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from pipeline.archive import Archive
from pipeline.config import DicomSettings, PeerRight, Settings
from pipeline.dicom.find import FIND_MODELS, handle_find
from pipeline.dicom.peers import may
from pipeline.dicom.retrieve import add_retrieve_contexts, retrieve_handlers
from pipeline.dicom.spooling import drop_unfinished, spool_stores
from pipeline.dicom.storescp import handle_store, read_stores_inline
from pipeline.dicom.syntaxes import TRANSFER_SYNTAXES
from pipeline.dicom.tuning import (
    PduLimits,
    advertised_pdu_size,
    cheap_context_copies,
    end_unrequested,
    tune_association,
)
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def pdu_limits(settings: Settings) -> PduLimits:
    """The limits a tuned association reads PDUs within, from ``[dicom]``."""
    return PduLimits(
        max_pdu_size=settings.dicom.max_pdu_size,
        pdu_timeout=settings.dicom.pdu_timeout_seconds,
        establish_timeout=settings.dicom.association_timeout_seconds,
    )


def set_nodelay(event: evt.Event, limits: PduLimits | None = None) -> None:
    """EVT_CONN_OPEN handler: disable Nagle's algorithm (10x on loopback) and let the
    association react to each message at once, reading PDUs within ``limits``
    (:mod:`pipeline.dicom.tuning`)."""
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    limits = limits or PduLimits()
    if not tune_association(event.assoc, limits) and sock is not None:
        # Untuned, pynetdicom reads with blocking recv(): bound each one at least (a
        # peer gone silent inside a PDU would otherwise hold its thread forever).
        sock.settimeout(limits.pdu_timeout)


def _on_close(event: evt.Event) -> None:
    """EVT_CONN_CLOSE handler: a connection closed before its request frees its thread now."""
    end_unrequested(event.assoc)


def _log_request(event: evt.Event, settings: Settings) -> None:
    """EVT_REQUESTED handler: reject a wrong called AE title; say why an association is
    about to be rejected."""
    request = event.assoc.requestor.primitive
    calling = str(request.calling_ae_title).strip()
    called = str(request.called_ae_title).strip()
    accepted = settings.dicom.called_ae_titles
    if "*" not in accepted and called not in accepted:
        log.warning(
            "association from %s (%s) rejected: called AE title %r is not this archive's (%s)",
            calling,
            event.assoc.requestor.address,
            called,
            ", ".join(accepted),
        )
        event.assoc.acse.send_reject(0x01, 0x01, 0x07)  # rejected-permanent, called AE not recognised
        event.assoc.kill()
        return
    if not settings.dicom.open_to_all and calling not in calling_ae_titles(settings.dicom):
        log.warning(
            "association from %s (%s) rejected: calling AE title not in [dicom] allowed_aes or [[dicom.peers]]",
            calling,
            event.assoc.requestor.address,
        )
        return
    proposed = {str(item.abstract_syntax) for item in request.presentation_context_definition_list}
    needed = {right_needed(uid) for uid in proposed}
    if None not in needed and not any(may(settings.dicom, calling, right) for right in needed if right):
        missing = "/".join(sorted(r for r in needed if r))
        log.warning(
            "association from %s (%s) rejected: it asks only to %s, which it may not; "
            "give it a [[dicom.peers]] entry with allow = [%s]",
            calling,
            event.assoc.requestor.address,
            missing,
            ", ".join(f'"{r}"' for r in sorted(r for r in needed if r)),
        )
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, calling AE not recognised
        event.assoc.kill()


_RETRIEVE_CLASSES = {
    str(uid)
    for uid in (
        PatientRootQueryRetrieveInformationModelMove,
        StudyRootQueryRetrieveInformationModelMove,
        PatientRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelGet,
    )
}


def right_needed(abstract_syntax: str) -> PeerRight | None:
    """The right a presentation context of ``abstract_syntax`` is used with (``None``: C-ECHO)."""
    if abstract_syntax == Verification:
        return None
    if abstract_syntax in FIND_MODELS:
        return "query"
    if abstract_syntax in _RETRIEVE_CLASSES:
        return "retrieve"
    return "store"


def calling_ae_titles(dicom: DicomSettings) -> list[str]:
    """AE titles that may associate at all: ``allowed_aes`` and peers with a calling right."""
    peers = [p.ae_title for p in dicom.peers if {"store", "query", "retrieve"} & set(p.allow)]
    return list(dict.fromkeys([*dicom.allowed_aes, *peers]))


class ConnectionGate:
    """Caps open DICOM connections per source address and in total.

    Installed as the server's ``verify_request`` (socketserver's hook), so a refused
    connection is closed at ``accept`` and starts no thread. A connection holds its slot
    until its socket is closed, whatever closed it (release, abort, timeout).
    """

    def __init__(self, per_address: int, total: int) -> None:
        self.per_address = per_address
        self.total = total
        self._open: dict[str, list[Any]] = defaultdict(list)
        self._lock = threading.Lock()
        self._warned: dict[str, float] = {}

    def verify_request(self, request: Any, client_address: Any) -> bool:
        address = str(client_address[0])
        with self._lock:
            for key in list(self._open):
                alive = [sock for sock in self._open[key] if sock.fileno() != -1]
                if alive:
                    self._open[key] = alive
                else:
                    del self._open[key]
            total = sum(len(socks) for socks in self._open.values())
            mine = len(self._open.get(address, ()))
            if mine < self.per_address and total < self.total:
                self._open[address].append(request)
                return True
        self._warn(address, mine, total)
        return False

    def _warn(self, address: str, mine: int, total: int) -> None:
        now = time.monotonic()
        if now - self._warned.get(address, -3600.0) < 60:  # one line a minute per address
            return
        self._warned[address] = now
        log.warning(
            "DICOM connection from %s refused: %d open from it (max_associations_per_address %d), "
            "%d in all (max_associations %d); further refusals of it are not logged for a minute",
            address,
            mine,
            self.per_address,
            total,
            self.total,
        )


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The server TLS context for ``[dicom.tls]``, or ``None`` when TLS is off."""
    tls = settings.dicom.tls
    if not tls.enabled:
        return None
    if tls.cert_file is None or tls.key_file is None:
        raise ConfigError("dicom.tls.enabled needs dicom.tls.cert_file and dicom.tls.key_file")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        if tls.ca_file is not None:
            ctx.load_verify_locations(cafile=str(tls.ca_file))
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"dicom.tls: cannot load certificate/key/CA: {err}") from None
    if tls.require_client_cert:
        if tls.ca_file is None:
            raise ConfigError("dicom.tls.require_client_cert needs dicom.tls.ca_file to verify clients")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def build_ae(settings: Settings, archive: Archive) -> AE:
    """The application entity: storage SCP for all storage SOP classes, plus C-ECHO."""
    ae = AE(ae_title=settings.dicom.ae_title)
    ae.maximum_pdu_size = advertised_pdu_size(settings.dicom.max_pdu_size)
    ae.network_timeout = settings.dicom.network_timeout_seconds
    # From the connection to the A-ASSOCIATE-RQ (and the ARTIM timer): short, so that
    # connections that never ask cannot hold slots.
    ae.acse_timeout = settings.dicom.association_timeout_seconds
    ae.dimse_timeout = settings.dicom.network_timeout_seconds
    ae.maximum_associations = settings.dicom.max_associations
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for uid in FIND_MODELS:
        ae.add_supported_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    add_retrieve_contexts(ae)
    if not settings.dicom.open_to_all:
        ae.require_calling_aet = calling_ae_titles(settings.dicom)
    return ae


def handlers(settings: Settings, archive: Archive) -> list[Any]:
    """The event handlers the receiver binds (exposed so other servers can reuse them)."""
    return [
        (evt.EVT_CONN_OPEN, set_nodelay, [pdu_limits(settings)]),
        (evt.EVT_CONN_OPEN, spool_stores, [archive, settings.dicom]),
        (evt.EVT_CONN_OPEN, read_stores_inline, [archive, settings.dicom]),
        (evt.EVT_CONN_CLOSE, _on_close),
        (evt.EVT_CONN_CLOSE, drop_unfinished),
        (evt.EVT_REQUESTED, _log_request, [settings]),
        (evt.EVT_C_STORE, handle_store, [archive, settings.dicom]),
        (evt.EVT_C_FIND, handle_find, [settings, archive.session_factory]),
        *retrieve_handlers(settings, archive),
    ]


class SharedSocketServer(ThreadedAssociationServer):
    """An association server that accepts on a listening socket it is handed, shared with
    the other receiver processes (:mod:`pipeline.dicom.workers`), instead of binding one.

    The socket is non-blocking: each process wakes for a new connection, one ``accept``
    wins, the others get EAGAIN (which socketserver ignores). It is never ``shutdown()``:
    that would stop the other processes' listening too.
    """

    listen_socket: socket.socket  # set on the subclass :func:`start_receiver` makes

    def server_bind(self) -> None:
        self.socket.close()  # the fresh one socketserver made
        self.socket = self.listen_socket
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Nothing: the process that bound the socket called ``listen``."""

    def server_close(self) -> None:
        self.socket.close()

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)  # not AE._servers: start_server never added it
        self.server_close()


def start_receiver(
    settings: Settings, archive: Archive, *, ae: AE | None = None, listen_socket: socket.socket | None = None
) -> ThreadedAssociationServer:
    """Start listening on ``[dicom] bind:port`` without blocking; return the server.

    Port 0 binds a free port; read it from ``server.server_address[1]``. Stop with
    ``server.shutdown()``. With ``listen_socket`` (bound and listening), accept on it
    instead: one of several receiver processes sharing the port.
    """
    ae = ae or build_ae(settings, archive)
    if listen_socket is None:
        server = ae.start_server(
            (settings.dicom.bind, settings.dicom.port),
            block=False,
            evt_handlers=handlers(settings, archive),
            ssl_context=ssl_context(settings),
        )
    else:
        shared = type("SharedSocketServer", (SharedSocketServer,), {"listen_socket": listen_socket})
        server = ae.make_server(
            listen_socket.getsockname()[:2],
            evt_handlers=handlers(settings, archive),
            ssl_context=ssl_context(settings),
            server_class=shared,
        )
        threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True).start()
    gate = ConnectionGate(settings.dicom.max_associations_per_address, settings.dicom.max_associations)
    server.verify_request = gate.verify_request  # type: ignore[method-assign]
    cheap_context_copies(server)
    host, port = server.server_address[:2]
    log.info(
        "DICOM receiver %s %s %s:%d%s%s",
        settings.dicom.ae_title,
        "listening on" if listen_socket is None else "accepting on",
        host,
        port,
        " (TLS)" if settings.dicom.tls.enabled else "",
        "" if listen_socket is None else ", a socket shared with the other receiver processes",
    )
    return server


class DicomReceiver:
    """The receiver as a component of ``radtriage serve`` (see :func:`start_receiver`)."""

    name = "DICOM receiver"

    def __init__(self, settings: Settings, archive: Archive) -> None:
        self.settings = settings
        self.archive = archive
        self.server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        """The port listened on (the configured one, or the free one port 0 got)."""
        if self.server is None:
            raise RuntimeError("the DICOM receiver is not started")
        return int(self.server.server_address[1])

    def start(self) -> None:
        self.server = start_receiver(self.settings, self.archive)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
