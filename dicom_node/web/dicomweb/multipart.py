"""An incremental multipart/related reader (RFC 2046 5.1, RFC 2387) for STOW-RS request bodies.

``read_parts(chunks, boundary, max_part_bytes)`` consumes the body as it arrives and yields one
``Part`` per body part; at most one part (up to ``max_part_bytes``) is held in memory. A part
larger than that is skipped (its bytes are discarded as they arrive) and yielded with
``too_large`` set, so the caller reports it and goes on with the next one.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass


class MultipartError(ValueError):
    """The body is not the multipart/related its Content-Type announced."""


@dataclass
class Part:
    headers: dict[str, str]
    data: bytes
    too_large: bool = False
    size: int = 0  # bytes of the part's body (also when too large)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def boundary_of(content_type: str) -> tuple[str, dict[str, str]]:
    """(media type, parameters) of a Content-Type header; parameter names lower-case."""
    fields = content_type.split(";")
    params = {}
    for f in fields[1:]:
        k, _, v = f.partition("=")
        params[k.strip().lower()] = v.strip().strip('"')
    return fields[0].strip().lower(), params


def _headers(block: bytes) -> dict[str, str]:
    out = {}
    for line in block.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


async def read_parts(chunks: AsyncIterator[bytes], boundary: str, max_part_bytes: int) -> AsyncIterator[Part]:
    """The parts of a multipart body read from ``chunks``; raises MultipartError when malformed."""
    if not boundary or len(boundary) > 200:
        raise MultipartError("the Content-Type has no usable boundary parameter")
    first = b"--" + boundary.encode("latin-1")
    delim = b"\r\n" + first
    buf = bytearray()
    it = chunks.__aiter__()
    done = False

    async def more() -> bool:
        nonlocal done
        if done:
            return False
        try:
            chunk = await it.__anext__()
        except StopAsyncIteration:
            done = True
            return False
        buf.extend(chunk)
        return True

    # Preamble, up to the first delimiter (which may start the body without a CRLF before it).
    while True:
        at = buf.find(first)
        if at >= 0 and (at == 0 or buf[at - 2:at] == b"\r\n"):
            del buf[:at + len(first)]
            break
        if len(buf) > 64 * 1024:
            raise MultipartError("no multipart boundary in the first 64 KiB of the body")
        if not await more():
            raise MultipartError("the body has no multipart boundary")
    while True:
        # After a delimiter: "--" closes the body, else CRLF then the part's headers.
        while len(buf) < 2:
            if not await more():
                raise MultipartError("the body ends without its closing boundary")
        if buf[:2] == b"--":
            return
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buf) > 64 * 1024:
                raise MultipartError("part headers longer than 64 KiB")
            if not await more():
                raise MultipartError("the body ends inside the headers of a part")
        line_end = buf.find(b"\r\n")
        headers = _headers(bytes(buf[line_end + 2:end])) if line_end < end else {}
        del buf[:end + 4]
        size, too_large, scanned = 0, False, 0
        while True:
            at = buf.find(delim, max(0, scanned - len(delim)))
            if at >= 0:
                size += at
                data = b"" if too_large else bytes(buf[:at])
                del buf[:at + len(delim)]
                too_large = too_large or size > max_part_bytes
                yield Part(headers, b"" if too_large else data, too_large, size)
                break
            scanned = len(buf)
            if size + len(buf) > max_part_bytes + len(delim):
                keep = len(delim)  # discard all but a possible start of the delimiter
                size += len(buf) - keep
                del buf[:len(buf) - keep]
                scanned = len(buf)
                too_large = True
            if not await more():
                raise MultipartError("the body ends inside a part (no closing boundary)")
