"""listen: the Storage SCP and Verification SCP.

Contract: checks each association (called AE against the node's AE title, calling AE and peer
host against the sources in the database, read on every association so admin changes apply at
once), writes each instance exactly as received to the file store (temp file, fsync, rename),
indexes it in the database, and only then answers Success. It never decodes pixel data, never
runs the model, never waits on a remote peer, and never imports torch. Every association,
accepted or rejected, is audited (peer, AE titles, result, reason, instance count, duration).
An accepted association's row stays open (no ``ended_at``) until it ends and names this
listener process (``listener``, its heartbeat identity): the scheduler does not call a series
complete while an association delivering it is open (``dicom_node.completion``).

Duplicate SOP Instance UIDs: identical bytes are acknowledged and change nothing; different
bytes replace the stored instance (the newest wins) and mark its series for re-evaluation.
"""
from __future__ import annotations

import logging
import ssl
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from dicom_node import ingest, part10, scp_reasons, tls
from dicom_node.node import Node
from dicom_node.port_share import PortShare, node_identity
from dicom_node.scp_limits import LimitedAE, ListenerLimits, dataset_refusal
from dicom_node.stages import process_identity
from storage import repo
from storage.models import AssociationLog, AssociationResult, utcnow

log = logging.getLogger(__name__)

# C-STORE response statuses (PS3.4 Annex B.2.3), named in ``dicom_node.ingest``.
SUCCESS = ingest.SUCCESS
OUT_OF_RESOURCES = ingest.OUT_OF_RESOURCES
DATASET_DOES_NOT_MATCH_SOP_CLASS = ingest.DATASET_DOES_NOT_MATCH_SOP_CLASS
CANNOT_UNDERSTAND = ingest.CANNOT_UNDERSTAND
#: An instance over ``max_dataset_bytes``: "Error: cannot understand" class, a permanent failure,
#: with the reason in ErrorComment (resending the same instance cannot succeed).
DATASET_TOO_LARGE = ingest.DATASET_TOO_LARGE

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason.
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
REASON_NO_REASON = 0x01
REASON_CALLING_AE_NOT_RECOGNISED = 0x03
REASON_CALLED_AE_NOT_RECOGNISED = 0x07
SOURCE_PROVIDER_PRESENTATION = 0x03
REASON_LOCAL_LIMIT_EXCEEDED = 0x02

RESULT_SOP_CLASSES = ingest.RESULT_SOP_CLASSES


@dataclass
class _AssocState:
    started: float
    peer_host: str | None
    peer_port: int | None
    calling_ae: str | None = None
    called_ae: str | None = None
    log_id: int | None = None
    instances: int = 0
    rejected_reason: str | None = None
    closed: bool = False
    requested: bool = False  # a complete A-ASSOCIATE-RQ arrived (EVT_REQUESTED)
    refused_reason: str | None = None  # instances refused on an accepted association
    refused: int = 0


_text = ingest.text


class Listener:
    """The SCP. ``start()`` binds ``[node] host:port``; ``stop()`` shuts it down."""

    def __init__(self, node: Node):
        self.node = node
        self._assocs: dict[int, _AssocState] = {}
        self._lock = threading.Lock()
        self._server = None
        self.port: int | None = None
        self._tls_server = None
        self.tls_port: int | None = None  # the DICOM TLS port, with [tls] enabled
        self._plain_share: PortShare | None = None  # claims on shared ports (dicom_node.port_share)
        self._tls_share: PortShare | None = None
        self.ae = self._build_ae()

    # --- composition ---------------------------------------------------------------------------
    def _build_ae(self) -> LimitedAE:
        # Limits (maximum PDU, associations, timeouts, sizes) are applied by LimitedAE.
        self.limits = ListenerLimits.from_node_section(self.node.settings.node)
        ae = LimitedAE(self.node.settings.node.ae_title, self.limits)
        ae.require_called_aet = False  # checked in _on_requested against the live setting
        ae.reuse_port = self.node.settings.node.listeners > 1  # the port shared by the listeners
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        ae.dimse_timeout = 60
        return ae

    def handlers(self) -> list:
        return [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]

    def start(self, port: int | None = None) -> int:
        """Bind the plain port (unless ``[tls] plain = false``) and, with ``[tls] enabled``, the
        DICOM TLS port (``tls_port``). Returns the plain port, or the TLS port when TLS only."""
        host = self.node.settings.node.host
        port = self.node.effective("node.port") if port is None else port
        tls_cfg = self.node.settings.tls
        if tls_cfg.enabled and self._tls_server is None:
            self.start_tls(host, tls_cfg.port)
        if not tls_cfg.enabled or tls_cfg.plain:
            self._plain_share = self._claim(port)
            try:
                self._server = self.ae.start_server((host, port), block=False, evt_handlers=self.handlers())
            except BaseException:
                self._release(self._plain_share)
                raise
            self.port = self._server.server_address[1]
            log.info("listening as %s on %s:%d", self.node.effective("node.ae_title"), host, self.port)
        return self.port if self._server is not None else self.tls_port

    def start_tls(self, host: str, port: int) -> int:
        """DICOM TLS on ``host:port`` with the ``[tls]`` certificate; the handshake runs in each
        connection's own thread (``_on_tls_handshake``), bounded by ``handshake_timeout_seconds``."""
        context = tls.server_context(self.node.settings.tls)
        self._tls_share = self._claim(port)
        try:
            self._tls_server = self.ae.start_server(
                (host, port), block=False, ssl_context=context,
                evt_handlers=self.handlers() + [(evt.EVT_CONN_OPEN, self._on_tls_handshake)])
        except BaseException:
            self._release(self._tls_share)
            raise
        self.tls_port = self._tls_server.server_address[1]
        log.info("listening as %s with DICOM TLS on %s:%d (TLS >= %s, client certificate %s)",
                 self.node.effective("node.ae_title"), host, self.tls_port, self.node.settings.tls.min_version,
                 "required" if self.node.settings.tls.require_client_certificate else "optional")
        return self.tls_port

    def stop(self) -> None:
        self.stop_plain()
        if self._tls_server is not None:
            self._tls_server.shutdown()
            self._tls_server = None
        self._release(self._tls_share)
        self._tls_share = None

    def stop_plain(self) -> None:
        """Close the plain port only (rebinding after a port change keeps the TLS port)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._release(self._plain_share)
        self._plain_share = None

    def _claim(self, port: int) -> PortShare | None:
        """With the port shared by several listener processes (``[node] listeners``), claim it
        for this node (``dicom_node.port_share``): another node is refused with one line."""
        if not self.ae.reuse_port or not port:
            return None
        settings = self.node.settings
        share = PortShare(port, node_identity(settings.database_url, settings.node.data_dir),
                          str(Path(settings.node.data_dir).resolve()))
        share.claim()
        return share

    @staticmethod
    def _release(share: PortShare | None) -> None:
        if share is not None:
            share.release()

    def _on_tls_handshake(self, event) -> None:
        """EVT_CONN_OPEN on the TLS port: handshake now, in this connection's thread. A failure
        (plain TCP, an untrusted or missing client certificate, a timeout) is audited as a
        rejection with its reason, logged once, and the connection closed."""
        sock = event.assoc.dul.socket.socket
        if not isinstance(sock, ssl.SSLSocket) or sock.fileno() < 0:
            return  # closed already (e.g. refused by a connection limit)
        st = self._state(event)
        timeout = self.node.settings.tls.handshake_timeout_seconds
        try:
            tls.handshake(sock, timeout)
        except (ssl.SSLError, OSError) as exc:
            reason = tls.describe_failure(exc, timeout)
            with self._lock:
                self._assocs.pop(id(event.assoc), None)
            st.rejected_reason = reason
            log.warning("connection from %s refused: %s", st.peer_host, reason)
            try:
                self._write_log(st, AssociationResult.REJECTED, reason, ended=True)
            finally:
                sock.close()  # pynetdicom then sees a closed transport: no read, no traceback
            return
        log.info("TLS from %s: %s", st.peer_host, tls.peer_summary(sock))

    # --- association audit -------------------------------------------------------------------
    def _state(self, event) -> _AssocState:
        key = id(event.assoc)
        with self._lock:
            st = self._assocs.get(key)
            if st is None:
                req = event.assoc.requestor
                st = _AssocState(time.monotonic(), req.address or None, req.port or None)
                self._assocs[key] = st
            return st

    def _on_conn_open(self, event) -> None:
        self._state(event)

    def _on_requested(self, event) -> None:
        st = self._state(event)
        st.requested = True
        rq = event.assoc.requestor.primitive
        st.calling_ae = _text(rq.calling_ae_title)
        st.called_ae = _text(rq.called_ae_title)
        limit = self.ae.guard.admit(event.assoc)
        if limit is not None:  # transient: the sender may retry later
            self._reject(event, st, limit, REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION,
                         REASON_LOCAL_LIMIT_EXCEEDED, self.node.settings.node.ae_title)
            return
        with self.node.sessions() as s:
            our_ae = self.node.effective("node.ae_title", s)
            reason = None
            diagnostic = REASON_NO_REASON
            if st.called_ae != our_ae:
                reason = f"called AE title {st.called_ae!r} is not this node's ({our_ae!r})"
                diagnostic = REASON_CALLED_AE_NOT_RECOGNISED
            elif self.node.effective("node.unknown_callers", s) != "accept":
                reason = repo.source_allows(s, st.calling_ae or "", st.peer_host)
                diagnostic = REASON_CALLING_AE_NOT_RECOGNISED
        if reason is not None:
            self.ae.guard.release(event.assoc)
            self._reject(event, st, reason, REJECTED_PERMANENT, SOURCE_SERVICE_USER, diagnostic, our_ae)

    def _reject(self, event, st: _AssocState, reason: str, result: int, source: int, diagnostic: int,
                our_ae: str) -> None:
        st.rejected_reason = reason
        log.warning("association from %s (%s -> %s) rejected: %s", st.peer_host, st.calling_ae, st.called_ae, reason)
        self._write_log(st, AssociationResult.REJECTED, reason, ended=True)
        event.assoc.acceptor.ae_title = our_ae
        event.assoc.acse.send_reject(result, source, diagnostic)
        # Wait until the A-ASSOCIATE-RJ is on the wire before pynetdicom closes the socket.
        event.assoc.kill()

    def _on_established(self, event) -> None:
        st = self._state(event)
        self._write_log(st, AssociationResult.ACCEPTED, None, ended=False)
        log.info("association %s accepted from %s (%s -> %s)", st.log_id, st.peer_host, st.calling_ae, st.called_ae)

    def _on_ended(self, event) -> None:
        with self._lock:
            st = self._assocs.pop(id(event.assoc), None)
        if st is None or st.log_id is None or st.closed:
            return
        aborted = event.event is evt.EVT_ABORTED
        with self.node.sessions.begin() as s:
            row = s.get(AssociationLog, st.log_id)
            row.ended_at = utcnow()
            row.instances = st.instances
            row.duration_s = round(time.monotonic() - st.started, 3)
            if st.refused_reason is not None:
                row.reason = f"{st.refused_reason}: {st.refused} instance(s) refused"
            if aborted:
                row.result = AssociationResult.ABORTED
                row.reason = self._abort_reason(event.assoc)
        st.closed = True
        log.info("association %s %s: %d instance(s) in %.2f s", st.log_id, "aborted" if aborted else "released",
                 st.instances, time.monotonic() - st.started)

    def _abort_reason(self, assoc) -> str:
        """The real reason an established association ended without a release."""
        refusal = getattr(assoc.dul, "refusal", None)
        if refusal is not None:
            return refusal
        if getattr(assoc.dul, "idle_expired", False):  # latched: sending the A-ABORT restarts the timer
            return scp_reasons.idle_timeout(self.limits.idle_timeout)
        return "association aborted (A-ABORT or connection lost)"

    def _on_conn_close(self, event) -> None:
        with self._lock:
            st = self._assocs.get(id(event.assoc))
            if st is not None and not st.requested:
                del self._assocs[id(event.assoc)]
            else:
                # Requested associations are audited when rejected, or in _on_ended (released or
                # aborted), which may run after this even if the connection closed at once.
                return
        # The peer never sent a complete, valid A-ASSOCIATE-RQ: cut by a limit (the DUL says
        # which), or garbage on the port, a port scan, a connection dropped.
        reason = getattr(event.assoc.dul, "refusal", None) or scp_reasons.MALFORMED
        self._write_log(st, AssociationResult.REJECTED, reason, ended=True)
        log.warning("connection from %s closed without a valid association request: %s", st.peer_host, reason)

    def _write_log(self, st: _AssocState, result: AssociationResult, reason: str | None, *, ended: bool) -> None:
        duration = round(time.monotonic() - st.started, 3)
        with self.node.sessions.begin() as s:
            row = repo.log_association(
                s, direction="in", peer_host=st.peer_host, peer_port=st.peer_port, calling_ae=st.calling_ae,
                called_ae=st.called_ae, result=result, reason=reason, instances=0,
                ended_at=utcnow() if ended else None, duration_s=duration if ended else None,
                listener=None if ended else process_identity(),
            )
            st.log_id = row.id
            st.closed = ended

    # --- services ----------------------------------------------------------------------------
    def _on_c_echo(self, event) -> int:
        return SUCCESS

    def _index_cache(self, event) -> repo.IndexCache:
        """The study/series rows known on this association (dropped with the association)."""
        with self._lock:
            caches = self.__dict__.setdefault("_index_caches", weakref.WeakKeyDictionary())
            cache = caches.get(event.assoc)
            if cache is None:
                cache = caches[event.assoc] = repo.IndexCache()
            return cache

    def _on_c_store(self, event) -> int | tuple:
        """Persist, index, then acknowledge. Returns a named PS3.4 status.

        The file is made durable (fsync, rename) before the index transaction begins, so the
        database write lock (SQLite) is never held across an fsync; the index never names a
        file that is not durable. Refusals of the content itself are permanent (0xA900/0xC000:
        the same bytes will never be accepted); only a failure of the disk or the database is
        transient (0xA700: the sender retries). Logs name UIDs and attribute keywords, never a
        value: patient attributes are among them.
        """
        st = self._state(event)
        sop_uid_cmd = _text(event.request.AffectedSOPInstanceUID)
        too_large = dataset_refusal(event.request, event.context.transfer_syntax, self.limits.max_dataset_bytes)
        if too_large is not None:
            return self._refuse_instance(st, sop_uid_cmd, too_large)
        try:
            data, dataset = _part10(event)
        except Exception as exc:  # noqa: BLE001 - any failure to take the bytes
            log.error("cannot read dataset %s from %s: %s", _uid_for_log(sop_uid_cmd), st.calling_ae,
                      type(exc).__name__)
            return CANNOT_UNDERSTAND
        try:
            ingest.store_instance(self.node, data, transfer_syntax=str(event.context.transfer_syntax),
                                  source=st.calling_ae, association_id=st.log_id, cache=self._index_cache(event),
                                  expected_sop_instance_uid=sop_uid_cmd, dataset=dataset)
        except ingest.Refused as exc:
            if exc.limit:
                st.refused_reason, st.refused = exc.reason, st.refused + 1  # in the association audit
            return exc.status
        st.instances += 1
        return SUCCESS

    def _refuse_instance(self, st: _AssocState, sop_uid: str | None, reason: str) -> Dataset:
        """A permanent refusal (``DATASET_TOO_LARGE``) with the reason in ErrorComment."""
        st.refused_reason, st.refused = reason, st.refused + 1
        log.warning("instance %s from %s refused: %s", sop_uid, st.calling_ae, reason)
        status = Dataset()
        status.Status = DATASET_TOO_LARGE
        status.ErrorComment = reason[:64]  # LO: at most 64 characters
        return status


_uid_for_log = ingest.uid_for_log


def _part10(event) -> tuple[bytes, memoryview | None]:  # noqa: ANN001 - C-STORE event
    """(the Part 10 bytes to store, the dataset part of them) of a C-STORE request: the file
    meta built by ``part10.file_meta`` (the bytes pynetdicom's ``encoded_dataset`` would give,
    without building and encoding a pydicom dataset), or pynetdicom's for a UID that is not
    ASCII (then no dataset part: the header is read with pydicom)."""
    rq = event.request
    raw = rq.DataSet.getvalue()
    try:
        meta = part10.file_meta(rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID, event.context.transfer_syntax)
    except UnicodeEncodeError:
        return event.encoded_dataset(include_meta=True), None
    data = meta + raw
    return data, memoryview(data)[len(meta):]


def run_listener(node: Node, stop: threading.Event, poll_seconds: float = 2.0) -> None:
    """Run the SCP until ``stop`` is set; rebind when the port setting changes."""
    listener = Listener(node)
    configured = node.effective("node.port")
    try:
        listener.start(configured)
    except tls.TLSConfigError as exc:
        log.error("cannot start the DICOM TLS listener: %s", exc)
        listener.stop()
        raise SystemExit(2) from None
    plain = not node.settings.tls.enabled or node.settings.tls.plain
    try:
        while not stop.wait(poll_seconds):
            try:
                wanted = node.effective("node.port")
            except Exception as exc:  # noqa: BLE001
                log.warning("cannot read settings: %s", exc)
                continue
            if wanted != configured and plain:
                log.info("port setting changed %d -> %d: rebinding", configured, wanted)
                listener.stop_plain()
                listener.start(wanted)
                configured = wanted
    finally:
        listener.stop()
