"""DICOM TLS (PS3.15 Annex B, TLS 1.2 or newer) and HTTPS: the ``ssl.SSLContext`` objects, built
from the ``[tls]`` and ``[web]`` settings, and the reasons a handshake failed, in words.

- ``server_context``: what the listener presents on its TLS port (``[tls] certificate`` and
  ``private_key``). Callers' certificates are checked against ``[tls] ca_certificates``: required
  with ``require_client_certificate = true``, otherwise checked only when a caller offers one.
  The handshake is deferred (``do_handshake_on_connect=False``) so that it runs in the
  association's own thread with ``handshake_timeout_seconds`` (see ``handshake``), not in the
  accepting thread, where one silent client would stop every other from being accepted.
- ``client_context``: what the node uses as SCU towards a destination with ``tls = true``: the
  destination's certificate is verified against ``ca_certificates`` (the system's trust store
  when empty) and, with ``verify_hostname``, must name the destination's host; the node presents
  ``client_certificate``/``client_private_key`` (default: the node's own ``certificate`` and
  ``private_key``) when the destination asks for one. Contexts are built per use, so a renewed
  certificate file is picked up without a restart.
- ``harden_web_context``: the same minimum version for the web's HTTPS context.

Certificates are PEM files. Times are in seconds.
"""
from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path
from typing import Protocol

#: The TLS versions ``[tls] min_version`` may name.
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSSettings(Protocol):
    """The ``[tls]`` section (dicom_node.config.TLSSection) as this module reads it."""

    certificate: Path | None
    private_key: Path | None
    ca_certificates: Path | None
    require_client_certificate: bool
    min_version: str
    client_certificate: Path | None
    client_private_key: Path | None
    verify_hostname: bool


class TLSConfigError(ValueError):
    """A certificate, key or CA file cannot be read or does not fit (the sentence says which)."""


class _RecordingSocket(ssl.SSLSocket):
    """An SSLSocket that keeps the last TLS error on its context (``last_error``), because
    pynetdicom's ``associate`` swallows it and reports only "unable to connect". With TLS 1.3 a
    server's refusal of our certificate arrives after the handshake, on the first read."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except (ssl.SSLError, OSError) as exc:
            self.context.last_error = exc  # type: ignore[attr-defined]
            raise

    def read(self, len: int = 1024, buffer=None):  # noqa: A002, ANN001 - ssl.SSLSocket's signature
        try:
            return super().read(len, buffer)
        except ssl.SSLError as exc:
            self.context.last_error = exc  # type: ignore[attr-defined]
            raise


class _NoSSLTraceback(logging.Filter):
    """pynetdicom logs a TLS failure with its traceback (``LOGGER.exception``); the message line
    says it all, and a peer retried every few seconds would fill the log with tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ssl.SSLError):
            record.exc_info, record.exc_text = None, None
        return True


_QUIET = _NoSSLTraceback()


def _quiet_pynetdicom_tracebacks() -> None:
    for name in ("pynetdicom.transport", "pynetdicom.dul"):
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)


class _DeferredHandshakeContext(ssl.SSLContext):
    """Server context whose sockets do not handshake in ``accept`` (see ``handshake``)."""

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, *args, **kwargs):  # noqa: ANN001
        return super().wrap_socket(sock, server_side, False, *args, **kwargs)


def _require_files(what: str, *paths: Path | None) -> None:
    for path in paths:
        if path is not None and not Path(path).is_file():
            raise TLSConfigError(f"{what}: file {path} does not exist")


def _load_identity(ctx: ssl.SSLContext, certificate: Path | None, private_key: Path | None, what: str) -> None:
    if certificate is None:
        return
    _require_files(what, certificate, private_key)
    try:
        ctx.load_cert_chain(str(certificate), str(private_key) if private_key else None)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{what}: cannot load certificate {certificate} with key {private_key} "
                             f"({exc.reason or exc}); both must be PEM and belong together") from None


def _load_ca(ctx: ssl.SSLContext, ca_certificates: Path) -> None:
    _require_files("[tls] ca_certificates", ca_certificates)
    try:
        ctx.load_verify_locations(cafile=str(ca_certificates))
    except ssl.SSLError as exc:
        raise TLSConfigError(f"[tls] ca_certificates: cannot read {ca_certificates} as a PEM "
                             f"certificate bundle ({exc.reason or exc})") from None


def server_context(cfg: TLSSettings) -> ssl.SSLContext:
    """The listener's context: TLS >= ``min_version``, the node's certificate, peer trust."""
    if cfg.certificate is None or cfg.private_key is None:
        raise TLSConfigError("[tls] certificate and private_key are needed for the TLS listener")
    _quiet_pynetdicom_tracebacks()
    ctx = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[cfg.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_identity(ctx, cfg.certificate, cfg.private_key, "[tls] certificate/private_key")
    if cfg.ca_certificates is not None:
        _load_ca(ctx, cfg.ca_certificates)
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_certificate else ssl.CERT_OPTIONAL
    elif cfg.require_client_certificate:
        raise TLSConfigError("[tls] require_client_certificate needs ca_certificates (whom to trust)")
    return ctx


def client_context(cfg: TLSSettings) -> ssl.SSLContext:
    """The SCU's context towards a TLS destination: verified peer, optional client certificate."""
    _quiet_pynetdicom_tracebacks()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = VERSIONS[cfg.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.check_hostname = cfg.verify_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.sslsocket_class = _RecordingSocket
    ctx.last_error = None  # type: ignore[attr-defined]
    if cfg.ca_certificates is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_ca(ctx, cfg.ca_certificates)
    if cfg.client_certificate is not None:
        _load_identity(ctx, cfg.client_certificate, cfg.client_private_key,
                       "[tls] client_certificate/client_private_key")
    else:
        _load_identity(ctx, cfg.certificate, cfg.private_key, "[tls] certificate/private_key")
    return ctx


#: TLS 1.2 suites for HTTPS (forward secrecy, AEAD; BCP 195). uvicorn's own default is the
#: OpenSSL string "TLSv1", which leaves the choice to the system's OpenSSL security level.
WEB_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"


def harden_web_context(ctx: ssl.SSLContext, min_version: str = "1.2") -> ssl.SSLContext:
    """Raise an HTTPS server context's floor to ``min_version``, allow only ``WEB_CIPHERS`` for
    TLS 1.2 (TLS 1.3 suites are all AEAD), and turn off compression."""
    if ctx.minimum_version < VERSIONS[min_version]:  # MINIMUM_SUPPORTED is -2
        ctx.minimum_version = VERSIONS[min_version]
    ctx.set_ciphers(WEB_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def handshake(sock: ssl.SSLSocket, timeout: float) -> None:
    """Run the server-side handshake on ``sock`` within ``timeout`` seconds; the socket's own
    timeout is restored afterwards. Raises ``ssl.SSLError`` or ``OSError`` (``TimeoutError``)."""
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        sock.do_handshake()
    finally:
        sock.settimeout(previous)


def describe_failure(exc: BaseException, timeout: float | None = None, *, as_client: bool = False) -> str:
    """A handshake error as a sentence for the audit log (the listener) or, ``as_client``, for a
    transfer's error (the node as SCU)."""
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"TLS handshake not completed within {timeout:g} s" if timeout else "TLS handshake timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS handshake failed: certificate not accepted ({exc.verify_message or exc.reason})"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).upper()
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_RECORD", "UNKNOWN_PROTOCOL",
                      "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "BAD_PACKET_LENGTH"):
            hint = "is that port a TLS port?" if as_client else "plain TCP on the TLS port?"
            return f"TLS handshake failed: the peer does not speak TLS ({exc.reason}; {hint})"
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED", "TLSV13_ALERT_CERTIFICATE_REQUIRED") \
                and as_client:
            return (f"TLS handshake failed: the peer requires a client certificate ({exc.reason}; "
                    "set [tls] certificate/private_key or client_certificate/client_private_key)")
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return f"TLS handshake failed: no client certificate ({exc.reason}; require_client_certificate is on)"
        if reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE"):
            return f"TLS handshake failed: protocol version below the minimum ({exc.reason})"
        if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
                      "TLSV1_ALERT_DECRYPT_ERROR"):
            return f"TLS handshake failed: the peer did not accept our certificate ({exc.reason})"
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, OSError):
        hint = "; a peer restarting, or one that does not speak TLS on this port" if as_client else ""
        return f"TLS handshake failed: connection lost ({type(exc).__name__}: {exc}{hint})"
    return f"TLS handshake failed: {type(exc).__name__}: {exc}"


def peer_summary(sock: ssl.SSLSocket) -> str:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384, client certificate CN=...`` (no patient data in certs)."""
    version, cipher = sock.version(), (sock.cipher() or ("?",))[0]
    cert = sock.getpeercert() or {}
    subject = dict(x[0] for x in cert.get("subject", ()) if x)
    who = f"client certificate CN={subject['commonName']}" if "commonName" in subject else \
        ("client certificate" if cert else "no client certificate")
    return f"{version} {cipher}, {who}"


class WebSettings(Protocol):
    """The ``[web]`` section (dicom_node.config.WebSection) as ``web_config`` reads it."""

    host: str
    port: int
    certificate: Path | None
    private_key: Path | None
    trusted_proxies: list[str]


def web_config(app, web: WebSettings, *, host: str | None = None, port: int | None = None, **uvicorn_kwargs):  # noqa: ANN001
    """The ``uvicorn.Config`` for the web stage: HTTPS (TLS >= 1.2) with ``[web] certificate``
    and ``private_key`` when given; X-Forwarded-For/-Proto believed only from ``trusted_proxies``
    (uvicorn's own default, 127.0.0.1, is not used: with none listed no header is believed).
    The config is loaded here, so a bad certificate fails now with its file named."""
    import uvicorn

    options: dict = {"proxy_headers": bool(web.trusted_proxies)}
    if web.trusted_proxies:
        options["forwarded_allow_ips"] = list(web.trusted_proxies)
    if web.certificate is not None:
        options["ssl_certfile"], options["ssl_keyfile"] = str(web.certificate), str(web.private_key)
    config = uvicorn.Config(app, host=host or web.host, port=web.port if port is None else port,
                            **options, **uvicorn_kwargs)
    _require_files("[web] certificate/private_key", web.certificate, web.private_key)
    try:
        config.load()
    except ssl.SSLError as exc:
        raise TLSConfigError(f"[web] certificate/private_key: cannot load {web.certificate} with "
                             f"{web.private_key} ({exc.reason or exc})") from None
    if config.ssl is not None:
        harden_web_context(config.ssl)
    return config
