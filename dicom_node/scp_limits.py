"""Listener limits: what a peer may cost the listener before and after its association is accepted.

pynetdicom reads any PDU of any declared length into memory, counts every open connection
(half-open ones included) against ``AE.maximum_associations`` when a request arrives, and does
not enforce its ACSE timeout while a PDU arrives a byte at a time. This module closes those gaps
with pynetdicom's own extension points rather than by patching it:

- ``LimitedAE.make_server`` makes every server a ``LimitedAssociationServer`` (``start_server``
  is called as before, TLS arguments included), whose request handler builds a
  ``LimitedAssociation``;
- ``LimitedAssociation`` carries a ``LimitedDUL`` (reads the 6-byte PDU header, refuses a
  declared length over the cap before reading the body) and a ``LimitedDIMSE`` (stops keeping a
  dataset's bytes once it passes ``max_dataset_bytes``, so the C-STORE handler can refuse it
  with a status instead of the node holding it);
- ``ConnectionGuard`` keeps every connection from TCP accept to the end of its association
  thread: the admission counts (only associations past a complete request count, overall and
  per peer host), and a sweep run from the server loop (``service_actions``, every 0.5 s) that
  cuts a connection whose request is not complete ``association_request_timeout`` seconds after
  connect, or whose PDU has been arriving for ``idle_timeout`` seconds. Cutting is a socket
  ``shutdown``, which also wakes a reader blocked in ``recv`` (plain TCP or TLS). Connections
  still waiting to send their request are capped at ``max_associations``; past that, the oldest
  is cut, so slow or silent sockets can never keep a real sender out.

Every refusal is recorded on the association's DUL (``refusal``) with a reason from
``scp_reasons``; the listener writes it to the association log.

Units: seconds for timeouts, bytes for sizes.
"""
from __future__ import annotations

import io
import logging
import socket
import ssl
import struct
import threading
import time
import zlib
import copy
from dataclasses import dataclass, field
from datetime import datetime

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node import scp_reasons as reasons
from dicom_node import store_rsp

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: Tolerance over the negotiated maximum PDU length for senders that count it loosely (bytes).
PDU_SLACK = 64 * 1024
#: A DIMSE command set is a few hundred bytes; more than this is not a command (bytes).
MAX_COMMAND_BYTES = 64 * 1024


@dataclass(frozen=True)
class ListenerLimits:
    """The ``[node]`` limits, in seconds and bytes (see ``config.NodeSection``)."""

    max_associations: int = 64
    max_associations_per_peer: int = 16
    association_request_timeout: float = 30.0
    idle_timeout: float = 60.0
    max_request_pdu: int = 256 * 1024
    max_pdu: int = 0
    max_dataset_bytes: int = 512 * MiB

    @classmethod
    def from_node_section(cls, node) -> ListenerLimits:  # noqa: ANN001 - config.NodeSection
        return cls(
            max_associations=node.max_associations,
            max_associations_per_peer=node.max_associations_per_peer,
            association_request_timeout=node.association_request_timeout,
            idle_timeout=node.idle_timeout,
            max_request_pdu=node.max_request_pdu,
            max_pdu=node.max_pdu,
            max_dataset_bytes=node.max_dataset_bytes,
        )

    @property
    def max_pending(self) -> int:
        """Connections that may wait at once for their association request to complete."""
        return self.max_associations

    @property
    def max_received_pdu(self) -> int:
        """Largest declared length accepted for a PDU after the request (bytes).

        With ``max_pdu`` announced, that plus a tolerance; with no limit announced (0), no PDU
        can legitimately be larger than the largest dataset we keep."""
        base = self.max_pdu if self.max_pdu > 0 else self.max_dataset_bytes
        return base + PDU_SLACK


# --- connection accounting ---------------------------------------------------------------------

@dataclass(eq=False)
class _Conn:
    assoc: Association
    sock: socket.socket
    peer_host: str | None
    connected_at: float = field(default_factory=time.monotonic)
    requested_at: float | None = None  # a complete A-ASSOCIATE-RQ was read
    pdu_started_at: float | None = None  # a PDU has been arriving since
    admitted: bool = False  # counts towards max_associations
    cut: bool = False


class ConnectionGuard:
    """Every connection from accept until its association thread ends. Thread-safe."""

    def __init__(self, limits: ListenerLimits):
        self.limits = limits
        self._lock = threading.Lock()
        self._conns: dict[Association, _Conn] = {}

    def opened(self, assoc: Association, sock: socket.socket, peer_host: str | None) -> None:
        """A TCP connection was accepted; past ``max_pending`` waiting ones, the oldest is cut."""
        with self._lock:
            self._conns[assoc] = _Conn(assoc, sock, peer_host)
            pending = sorted((c for c in self._conns.values() if c.requested_at is None and not c.cut),
                             key=lambda c: c.connected_at)
            evict = pending[0] if len(pending) > self.limits.max_pending else None
        if evict is not None:
            self.cut(evict, reasons.pending_limit(self.limits.max_pending))

    def get(self, assoc: Association) -> _Conn | None:
        with self._lock:
            return self._conns.get(assoc)

    def admit(self, assoc: Association) -> str | None:
        """Count a requested association; the reason it must be refused, or None."""
        with self._lock:
            conn = self._conns.get(assoc)
            if conn is None:
                return None
            admitted = [c for c in self._conns.values() if c.admitted and not c.cut]
            if len(admitted) >= self.limits.max_associations:
                return reasons.max_associations(self.limits.max_associations)
            if sum(c.peer_host == conn.peer_host for c in admitted) >= self.limits.max_associations_per_peer:
                return reasons.per_peer_limit(conn.peer_host, self.limits.max_associations_per_peer)
            conn.admitted = True
            return None

    def release(self, assoc: Association) -> None:
        """The association was refused after admission (AE titles): it no longer counts."""
        with self._lock:
            conn = self._conns.get(assoc)
            if conn is not None:
                conn.admitted = False

    def closed(self, assoc: Association) -> None:
        with self._lock:
            self._conns.pop(assoc, None)

    def sweep(self, now: float | None = None) -> None:
        """Cut connections past their deadlines (called from the server loop)."""
        now = time.monotonic() if now is None else now
        lim = self.limits
        cuts = []
        with self._lock:
            for assoc, conn in list(self._conns.items()):
                if assoc.ident is not None and not assoc.is_alive():
                    del self._conns[assoc]  # safety net: the thread ended without reaching closed()
                    continue
                if conn.cut:
                    continue
                if conn.requested_at is None and now - conn.connected_at > lim.association_request_timeout:
                    cuts.append((conn, reasons.request_timeout(lim.association_request_timeout)))
                elif conn.pdu_started_at is not None and now - conn.pdu_started_at > lim.idle_timeout:
                    cuts.append((conn, reasons.idle_timeout(lim.idle_timeout)))
        for conn, reason in cuts:
            self.cut(conn, reason)

    def cut(self, conn: _Conn, reason: str) -> None:
        """Record ``reason`` and shut the socket down; the DUL then sees the connection closed."""
        conn.cut = True
        dul = conn.assoc.dul
        if isinstance(dul, LimitedDUL) and dul.refusal is None:
            dul.refusal = reason
        log.warning("cutting connection from %s: %s", conn.peer_host, reason)
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# --- pynetdicom extension points ---------------------------------------------------------------

class CappedBuffer(io.BytesIO):
    """A dataset buffer that keeps at most ``cap`` bytes; past that it keeps nothing and
    only counts (``exceeded`` is then True)."""

    def __init__(self, cap: int):
        super().__init__()
        self.cap = cap
        self.received = 0
        self.exceeded = False

    def write(self, data) -> int:  # noqa: ANN001 - bytes-like
        n = len(data)
        self.received += n
        if self.exceeded:
            return n
        if self.received > self.cap:
            self.exceeded = True
            self.seek(0)
            self.truncate(0)  # BytesIO gives the memory back on a large shrink
            return n
        return super().write(data)


class LimitedDIMSE(DIMSEServiceProvider):
    """Assembles DIMSE messages into a ``CappedBuffer``; cuts a command set that never ends;
    sends a plain C-STORE response encoded by ``store_rsp`` (the same bytes, without pydicom)."""

    def __init__(self, assoc: Association, max_dataset_bytes: int):
        super().__init__(assoc)
        self.max_dataset_bytes = max_dataset_bytes

    def send_msg(self, primitive, context_id: int) -> None:  # noqa: ANN001 - a DIMSE primitive
        """pynetdicom's (3.0 ``DIMSEServiceProvider.send_msg``), except for a plain C-STORE
        response, sent as one P-DATA of ``store_rsp.encode``'s bytes. EVT_DIMSE_SENT is then not
        triggered: only when nothing but pynetdicom's logging handler (which logs nothing for a
        C-STORE-RSP) is bound to it, or nothing at all (see ``_LOGGING_HANDLERS``)."""
        command = store_rsp.encode(primitive)
        max_pdu = self.maximum_pdu_size
        if (command is None or (max_pdu and len(command) + 12 > max_pdu)
                or any(h[0] is not standard_dimse_sent_handler for h in self.assoc.get_handlers(evt.EVT_DIMSE_SENT))):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list = [[context_id, b"\x03" + command]]  # command, last fragment
        self.dul.send_pdu(pdata)

    def receive_primitive(self, primitive) -> None:  # noqa: ANN001 - P_DATA
        if self.message is None:
            self.message = DIMSEMessage()
            self.message.data_set = CappedBuffer(self.max_dataset_bytes)
        super().receive_primitive(primitive)
        msg = self.message
        if msg is not None and msg.encoded_command_set.tell() > MAX_COMMAND_BYTES:
            dul = self.assoc.dul
            if isinstance(dul, LimitedDUL):
                dul.refuse(reasons.command_too_large(MAX_COMMAND_BYTES), in_request=False)


class LimitedDUL(DULServiceProvider):
    """Reads PDUs with the declared length checked before the body is read."""

    def __init__(self, assoc: LimitedAssociation):
        super().__init__(assoc)
        self.refusal: str | None = None
        self.idle_expired = False  # latched: the association aborts when it sees this

    @property
    def guard(self) -> ConnectionGuard:
        return self.assoc.guard

    def refuse(self, reason: str, *, in_request: bool) -> None:
        """Tell the peer (A-ASSOCIATE-RJ permanent during the request, else A-ABORT) and close."""
        if self.refusal is None:
            self.refusal = reason
        log.warning("refusing connection from %s: %s", self.assoc.requestor.address, reason)
        if in_request:
            pdu = A_ASSOCIATE_RJ()
            pdu.result, pdu.source, pdu.reason_diagnostic = 0x01, 0x02, 0x01  # permanent, ACSE, no reason
        else:
            pdu = A_ABORT_RQ()
            pdu.source, pdu.reason_diagnostic = 0x02, 0x06  # service provider, invalid PDU parameter
        sock = self.socket
        if sock is not None and sock.socket is not None:
            try:
                sock.socket.sendall(pdu.encode())
            except OSError:
                pass
            sock.close()  # Evt17: the state machine closes the association
        else:
            self.event_queue.put("Evt17")

    def _read_pdu_data(self) -> None:
        """pynetdicom's reader (3.0 ``DULServiceProvider._read_pdu_data``) with the declared
        length checked against the cap before reading the body, and the read timed for the
        guard's sweep."""
        sock = self.socket
        conn = self.guard.get(self.assoc)
        # Not the state machine's state: it may lag behind the events already queued.
        awaiting_request = conn is None or conn.requested_at is None
        if conn is not None:
            conn.pdu_started_at = time.monotonic()
        try:
            try:
                header = sock.recv(6)
            except ssl.SSLError as exc:  # a plain-TCP client on a TLS port, a bad certificate
                if awaiting_request and self.refusal is None:
                    self.refusal = f"{reasons.MALFORMED}: TLS handshake failed ({exc.reason or exc})"
                self.event_queue.put("Evt17")
                return
            except (OSError, TimeoutError):
                self.event_queue.put("Evt17")
                return
            if len(header) < 6:
                self.event_queue.put("Evt17")  # connection closed (or cut)
                return
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
                log.debug("unknown PDU type 0x%02X from %s", pdu_type, self.assoc.requestor.address)
                self._invalid(awaiting_request, f"unknown PDU type 0x{pdu_type:02X}")
                return
            cap = self.guard.limits.max_request_pdu if awaiting_request else self.guard.limits.max_received_pdu
            if length > cap:
                reason = (reasons.request_too_large(length, cap) if awaiting_request
                          else reasons.pdu_too_large(length, cap))
                self.refuse(reason, in_request=awaiting_request)
                return
            try:
                body = sock.recv(length)
            except (OSError, TimeoutError):
                self.event_queue.put("Evt17")
                return
            if len(body) != length:
                self.event_queue.put("Evt17")
                return
        finally:
            if conn is not None:
                conn.pdu_started_at = None
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception as exc:  # noqa: BLE001 - pynetdicom's READ_PDU_EXC_F: invalid PDU
            log.debug("cannot decode a PDU from %s: %s", self.assoc.requestor.address, exc)
            self._invalid(awaiting_request, f"PDU type 0x{pdu_type:02X} cannot be decoded")
            return
        if pdu_type == 0x01 and conn is not None:
            conn.requested_at = time.monotonic()
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _invalid(self, awaiting_request: bool, what: str) -> None:
        """Evt19 (invalid PDU): the state machine aborts; the first reason is the one kept."""
        if awaiting_request and self.refusal is None:
            self.refusal = f"{reasons.MALFORMED}: {what}"
        self.event_queue.put("Evt19")

    def idle_timer_expired(self) -> bool:
        if super().idle_timer_expired():
            self.idle_expired = True
        return self.idle_expired

    def _send(self, pdu) -> None:  # noqa: ANN001
        super()._send(pdu)
        self._idle_timer.restart()  # idle means no traffic either way, not "the peer is quiet"

    def receive_pdu(self, wait: bool = False, timeout: float | None = None):
        """As pynetdicom's, but a wait ends early once this DUL has stopped (nothing can come):
        the association thread of a connection cut before its request does not linger."""
        if not wait:
            return super().receive_pdu(wait=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = 0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic()))
            primitive = super().receive_pdu(wait=True, timeout=step)
            if primitive is not None:
                return primitive
            if deadline is not None and time.monotonic() >= deadline:
                return None
            if self.ident is not None and not self.is_alive() and self.to_user_queue.empty():
                return None


class LimitedAssociation(Association):
    """An acceptor association with the limited DUL and DIMSE providers."""

    def __init__(self, ae: LimitedAE, mode: str):
        super().__init__(ae, mode)
        self.guard: ConnectionGuard = ae.guard
        self.dul = LimitedDUL(self)
        self.dimse = LimitedDIMSE(self, ae.guard.limits.max_dataset_bytes)
        # The timeout setters push their values into the DUL's timers: apply them to the new one.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            self.guard.closed(self)


#: pynetdicom's logging handlers: they format every received message and PDU (the C-STORE-RQ one
#: decodes the command set and copies the whole dataset) whatever the logger's level. Unbound
#: unless the pynetdicom logger shows INFO (``-vv``): 11% of the listener's CPU otherwise.
_LOGGING_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def _copy_contexts(contexts: list) -> list:
    """Each association's own copy of the server's supported presentation contexts.

    pynetdicom deep-copies them for every association (about 160 contexts with every transfer
    syntax: 60-180 ms of CPU per association, with the GIL held). Negotiation only reads them
    and builds new contexts for its results, so a copy of each context and of its
    transfer-syntax list (the only mutable attribute) is as safe; the UIDs are immutable
    strings and are shared.
    """
    out = []
    for cx in contexts:
        new = copy.copy(cx)
        new._transfer_syntax = list(cx._transfer_syntax)
        out.append(new)
    return out


class LimitedRequestHandler(RequestHandler):
    def _create_association(self) -> Association:
        """pynetdicom's ``RequestHandler._create_association`` (3.0), building a
        ``LimitedAssociation``, registering the connection with the guard, copying the
        supported contexts with ``_copy_contexts`` rather than ``deepcopy``, and without
        pynetdicom's logging handlers when its logger would drop what they log."""
        ae = self.ae
        assoc = LimitedAssociation(ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        self.server.guard.opened(assoc, self.request, self.client_address[0])
        assoc.set_socket(AssociationSocket(assoc, client_socket=self.request))
        assoc.acceptor.maximum_length = ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = ae.implementation_version_name
        assoc.acceptor.supported_contexts = _copy_contexts(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    assoc.bind(event, handler[0], handler[1])
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
            for event, handler in _LOGGING_HANDLERS:
                assoc.unbind(event, handler)
        return assoc


class LimitedAssociationServer(ThreadedAssociationServer):
    """A threaded association server whose loop also runs the guard's sweep."""

    def __init__(self, *args, guard: ConnectionGuard, reuse_port: bool = False, **kwargs):
        self.guard = guard
        self.reuse_port = reuse_port
        kwargs.setdefault("request_handler", LimitedRequestHandler)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        """pynetdicom's, with ``SO_REUSEPORT`` first when the port is shared by several
        listener processes (``[node] listeners``): each must set it, so a process that does
        not still finds the port taken."""
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self):
        """Accept; with TLS, leave the handshake to the connection's own thread (it happens on
        the first read, under the association-request deadline). pynetdicom's handshakes here,
        in the accept loop, where one silent client stops every other connection."""
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def service_actions(self) -> None:
        super().service_actions()
        self.guard.sweep()


class LimitedAE(AE):
    """An AE whose servers enforce ``limits`` (``start_server`` is used as usual)."""

    def __init__(self, ae_title: str, limits: ListenerLimits):
        super().__init__(ae_title=ae_title)
        self.guard = ConnectionGuard(limits)
        self.reuse_port = False  # True: the port is shared with other listener processes
        # Admission is the guard's (only associations past their request count); pynetdicom's
        # own count includes half-open connections, so it is set out of the way.
        self.maximum_associations = 1 << 30
        self.maximum_pdu_size = limits.max_pdu
        # Backstops only: the guard's sweep cuts first, with the real reason.
        self.acse_timeout = limits.association_request_timeout + 5
        self.network_timeout = limits.idle_timeout

    def make_server(self, address, ae_title=None, contexts=None, ssl_context=None, evt_handlers=None,  # noqa: ANN001
                    server_class=None, **kwargs):
        return super().make_server(address, ae_title=ae_title, contexts=contexts, ssl_context=ssl_context,
                                   evt_handlers=evt_handlers, server_class=LimitedAssociationServer,
                                   guard=self.guard, reuse_port=self.reuse_port, **kwargs)


# --- dataset size ------------------------------------------------------------------------------

def inflates_beyond(data, cap: int, chunk: int = MiB) -> bool | None:
    """Whether raw-deflate ``data`` inflates to more than ``cap`` bytes: True, False, or None
    when it is not a valid deflate stream. Inflates ``chunk`` bytes at a time and keeps none."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    view = memoryview(data)
    try:
        for offset in range(0, len(view), 64 * 1024):
            buf = view[offset:offset + 64 * 1024]
            while buf:
                total += len(d.decompress(buf, chunk))
                if total > cap:
                    return True
                buf = d.unconsumed_tail
            if d.eof:
                break
        total += len(d.flush())
    except zlib.error:
        return None
    finally:
        view.release()
    return total > cap


def dataset_refusal(request, transfer_syntax: str, cap: int) -> str | None:  # noqa: ANN001 - C_STORE
    """The reason a C-STORE dataset must be refused for its size, or None."""
    buf = request.DataSet
    if isinstance(buf, CappedBuffer) and buf.exceeded:
        return reasons.dataset_too_large(cap, inflated=False)
    if UID(str(transfer_syntax)).is_deflated and isinstance(buf, io.BytesIO):
        with buf.getbuffer() as view:
            if inflates_beyond(view, cap):
                return reasons.dataset_too_large(cap, inflated=True)
    return None
