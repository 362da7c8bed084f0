"""The node as a DICOM client: C-ECHO and C-STORE to one peer, with outcomes told apart.

An ``Outcome`` says whether a failure is permanent (the peer rejected the association or
refused an instance: retrying will not help) or transient (connection refused, timeout, abort:
retry later). Nothing counts as sent unless the peer answered Success or a Warning status.

With ``tls`` (the ``[tls]`` settings) the association runs over DICOM TLS (PS3.15 Annex B):
the peer's certificate is verified (``dicom_node.tls.client_context``); a certificate the node
does not trust, a peer that refuses ours or does not speak TLS, is a permanent failure named
in the outcome; a peer that is down, or the node's own certificate files missing, is transient.
"""
from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node import tls as tls_module

log = logging.getLogger(__name__)

#: PS3.7 C.4.2.1.4 / Annex C: status classes.
STATUS_SUCCESS = 0x0000


class Kind(str, Enum):
    OK = "ok"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass
class Outcome:
    kind: Kind
    message: str
    acknowledged: list[str] = field(default_factory=list)  # SOP Instance UIDs the peer took

    @property
    def ok(self) -> bool:
        return self.kind is Kind.OK


def parse_peer(text: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` -> (ae_title, host, port) (``dicom_node.values.parse_peer``: pynetdicom's
    AE rules, port 1-65535); raises ValueError naming the bad part."""
    from dicom_node.values import parse_peer as parse

    return parse(text)


def status_is_success(status: int) -> bool:
    """Success (0x0000) or a Warning (0x0001, 0x0107, 0x0116, 0xB000-0xBFFF): stored."""
    return status == STATUS_SUCCESS or status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF


def _tls_args(tls: tls_module.TLSSettings | None, host: str) -> tuple | Outcome | None:
    """``(context, server_hostname)`` for ``associate``, None without TLS, or the Outcome that
    says why the node's own TLS configuration cannot be used."""
    if tls is None:
        return None
    try:
        return tls_module.client_context(tls), host
    except tls_module.TLSConfigError as exc:  # the node's own files: retrying helps once they are fixed
        return Outcome(Kind.TRANSIENT, f"TLS configuration: {exc}")


def _tls_failure(tls_args: tuple | None, ae_title: str, host: str, port: int) -> Outcome | None:
    """The handshake error recorded on the context, as an Outcome, if the handshake failed."""
    exc = getattr(tls_args[0], "last_error", None) if tls_args else None
    if exc is None:
        return None
    reason = tls_module.describe_failure(exc, as_client=True)
    where = f"{ae_title}@{host}:{port}"
    # Trust, certificate and protocol problems do not fix themselves on retry; a handshake cut
    # short (the peer restarting, a timeout) may.
    permanent = isinstance(exc, ssl.SSLCertVerificationError) or (
        isinstance(exc, ssl.SSLError) and ("ALERT" in (exc.reason or "") or exc.reason == "WRONG_VERSION_NUMBER"))
    return Outcome(Kind.PERMANENT if permanent else Kind.TRANSIENT, f"TLS to {where}: {reason}")


def _association_failure(assoc, ae_title: str, host: str, port: int, tls_args: tuple | None = None) -> Outcome:
    where = f"{ae_title}@{host}:{port}"
    failed_tls = _tls_failure(tls_args, ae_title, host, port)
    if failed_tls is not None:
        return failed_tls
    if assoc.is_rejected:
        rej = assoc.acceptor.primitive
        detail = f"result {getattr(rej, 'result_str', '?')}, source {getattr(rej, 'source_str', '?')}, reason {getattr(rej, 'reason_str', '?')}"
        transient = getattr(rej, "result", None) == 0x02  # rejected-transient
        return Outcome(Kind.TRANSIENT if transient else Kind.PERMANENT, f"association rejected by {where} ({detail})")
    return Outcome(Kind.TRANSIENT, f"could not connect to {where} (connection refused, timed out, or aborted "
                                   "before the association was accepted)")


def echo(ae_title: str, host: str, port: int, *, calling_ae: str = "DICOM_NODE", timeout: float = 10.0,
         tls: tls_module.TLSSettings | None = None) -> Outcome:
    """C-ECHO ``ae_title@host:port`` (over DICOM TLS with ``tls``); ``timeout`` in seconds."""
    tls_args = _tls_args(tls, host)
    if isinstance(tls_args, Outcome):
        return tls_args
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout  # covers the TLS handshake too
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args)
    if not assoc.is_established:
        return _association_failure(assoc, ae_title, host, port, tls_args)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if status is None or "Status" not in status:
        return Outcome(Kind.TRANSIENT, f"no C-ECHO response from {ae_title}@{host}:{port}")
    if status.Status != STATUS_SUCCESS:
        return Outcome(Kind.PERMANENT, f"C-ECHO status 0x{status.Status:04X} from {ae_title}@{host}:{port}")
    return Outcome(Kind.OK, f"C-ECHO to {ae_title}@{host}:{port} succeeded")


def store(paths: list[Path], ae_title: str, host: str, port: int, *, calling_ae: str = "DICOM_NODE",
          timeout: float = 30.0, skip_uids: set[str] = frozenset(),
          tls: tls_module.TLSSettings | None = None, on_response=None) -> Outcome:
    """Send ``paths`` on one association (over DICOM TLS with ``tls``); returns which SOP
    Instance UIDs the peer acknowledged. ``timeout`` in seconds.

    ``on_response(sop_instance_uid)``, if given, is called after each C-STORE response (progress).

    Presentation contexts are proposed for each file's SOP class with its own transfer syntax
    and Explicit/Implicit VR Little Endian, so files are sent as stored where the peer allows.
    """
    datasets = []
    for p in paths:
        ds = dcmread(p)
        if ds.SOPInstanceUID in skip_uids:
            continue
        datasets.append(ds)
    if not datasets:
        return Outcome(Kind.OK, "nothing left to send")
    tls_args = _tls_args(tls, host)
    if isinstance(tls_args, Outcome):
        return tls_args
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout  # covers the TLS handshake too
    seen = set()
    for ds in datasets:
        key = (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        if key in seen:
            continue
        seen.add(key)
        syntaxes = list(dict.fromkeys([ds.file_meta.TransferSyntaxUID, "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]))
        ae.add_requested_context(ds.SOPClassUID, syntaxes)
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args)
    if not assoc.is_established:
        return _association_failure(assoc, ae_title, host, port, tls_args)
    acknowledged: list[str] = []
    failure: Outcome | None = None
    try:
        for ds in datasets:
            try:
                status = assoc.send_c_store(ds)
                if on_response is not None:
                    on_response(ds.SOPInstanceUID)
            except ValueError as exc:  # no accepted presentation context for this SOP class
                failure = Outcome(Kind.PERMANENT, f"{ae_title} accepts no context for {ds.SOPClassUID}: {exc}")
                break
            if status is None or "Status" not in status:
                failure = Outcome(Kind.TRANSIENT, f"no C-STORE response from {ae_title} for {ds.SOPInstanceUID}")
                break
            if status_is_success(status.Status):
                acknowledged.append(ds.SOPInstanceUID)
                log.info("stored %s on %s (status 0x%04X)", ds.SOPInstanceUID, ae_title, status.Status)
            else:
                # 0xA7xx "Refused: Out of Resources" may clear (the peer frees disk): retry.
                # Any other failure (0xA9xx does not match SOP class, 0xCxxx cannot understand,
                # 0x0122 SOP class not supported, ...) will not change by retrying.
                kind = Kind.TRANSIENT if 0xA700 <= status.Status <= 0xA7FF else Kind.PERMANENT
                failure = Outcome(kind, f"{ae_title} refused {ds.SOPInstanceUID} with status 0x{status.Status:04X}")
                break
    finally:
        if assoc.is_established:
            assoc.release()
    if failure is not None:
        failure.acknowledged = acknowledged
        return failure
    return Outcome(Kind.OK, f"{len(acknowledged)} object(s) stored on {ae_title}@{host}:{port}", acknowledged)
