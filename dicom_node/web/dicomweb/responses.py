"""Responses of the DICOMweb routes: DICOM JSON, multipart/related (streamed), errors.

``multipart_related`` yields a PS3.18 8.7.3 / RFC 2387 body part by part: each part's bytes
come from a callable run when the part is reached, so files are read one at a time while the
response streams (never the whole study in memory).
"""
from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable, Iterator

from fastapi import HTTPException, Request
from fastapi.responses import Response, StreamingResponse

DICOM_JSON = "application/dicom+json"
CHUNK_BYTES = 1024 * 1024


class DicomWebError(HTTPException):
    """An error answered as JSON ``{"detail": ...}`` with its HTTP status."""

    def __init__(self, status_code: int, detail: str, headers: dict | None = None):
        super().__init__(status_code=status_code, detail=detail, headers=headers)


class DicomJSONResponse(Response):
    media_type = DICOM_JSON

    def render(self, content) -> bytes:  # noqa: ANN001
        if isinstance(content, (bytes, bytearray)):
            return bytes(content)
        return json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def base_url(request: Request) -> str:
    """The absolute URL of ``/dicom-web`` as the client reached it (RetrieveURL, BulkDataURI).

    Some clients (``dicomweb-client``) send a Host header without the port; on a direct
    connection (no proxy's X-Forwarded-* headers) the port the server listens on is added then.
    """
    url = request.base_url
    host = request.headers.get("host", "")
    server = request.scope.get("server") or (None, None)
    default = {"http": 80, "https": 443}.get(url.scheme)
    direct = not any(k.startswith("x-forwarded-") for k in request.headers.keys())
    if direct and ":" not in host.rsplit("]", 1)[-1] and server[1] and server[1] != default:
        url = url.replace(port=server[1])
    return str(url).rstrip("/") + "/dicom-web"


def boundary() -> str:
    return "dicomnode-" + secrets.token_hex(16)


Part = tuple[str, Callable[[], Iterable[bytes]]]  # (Content-Type of the part, its chunks)


def multipart_related(parts: Iterable[Part], mark: str) -> Iterator[bytes]:
    """The body of a multipart/related response with boundary ``mark``."""
    sent = False
    for content_type, chunks in parts:
        yield f"--{mark}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        yield from chunks()
        yield b"\r\n"
        sent = True
    if not sent:
        yield f"--{mark}\r\n".encode()  # a multipart body needs at least a delimiter
    yield f"--{mark}--\r\n".encode()


def multipart_response(parts: Iterable[Part], part_type: str, status_code: int = 200,
                       headers: dict | None = None) -> StreamingResponse:
    mark = boundary()
    media = f'multipart/related; type="{part_type}"; boundary={mark}'
    return StreamingResponse(multipart_related(parts, mark), status_code=status_code, media_type=media,
                             headers=headers)


def file_chunks(path) -> Callable[[], Iterator[bytes]]:  # noqa: ANN001
    def read() -> Iterator[bytes]:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK_BYTES):
                yield chunk
    return read


def accept_types(request: Request) -> list[tuple[str, dict[str, str]]]:
    """The Accept header as (media type, parameters), in the order given ("*/*" when absent)."""
    raw = request.headers.get("accept") or "*/*"
    out = []
    for item in _split_outside_quotes(raw, ","):
        fields = _split_outside_quotes(item, ";")
        media = fields[0].strip().lower()
        params = {}
        for f in fields[1:]:
            k, _, v = f.partition("=")
            params[k.strip().lower()] = v.strip().strip('"')
        if media:
            out.append((media, params))
    return out


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts, cur, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts
