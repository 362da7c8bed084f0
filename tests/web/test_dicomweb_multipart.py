"""The STOW-RS body reader (``dicom_node.web.dicomweb.multipart``): parts split at the boundary
whatever the chunking, a part over the size limit skipped (not held) while the next is read,
and malformed bodies refused with a reason."""
from __future__ import annotations

import asyncio

import pytest

from dicom_node.web.dicomweb.multipart import MultipartError, boundary_of, read_parts

MARK = "xYz-boundary"


def body(*parts: bytes, preamble: bytes = b"", close: bool = True) -> bytes:
    out = preamble
    for p in parts:
        out += f"--{MARK}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
    return out + (f"--{MARK}--\r\n".encode() if close else b"")


def parse(data: bytes, chunk: int, max_bytes: int = 1000):
    async def chunks():
        for i in range(0, len(data), chunk):
            yield data[i:i + chunk]

    async def run():
        return [p async for p in read_parts(chunks(), MARK, max_bytes)]

    return asyncio.run(run())


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 100_000])
def test_parts_are_split_at_the_boundary_in_any_chunking(chunk):
    a, b = b"first\r\n--not-the-boundary\r\n" * 3, bytes(range(256)) * 2
    parts = parse(body(a, b, preamble=b"ignored preamble\r\n"), chunk)
    assert [p.data for p in parts] == [a, b]
    assert parts[0].content_type == "application/dicom" and not parts[0].too_large


@pytest.mark.parametrize("chunk", [5, 4096])
def test_a_part_over_the_limit_is_skipped_and_the_next_one_read(chunk):
    big, small = b"B" * 5000, b"small part"
    parts = parse(body(big, small), chunk, max_bytes=1000)
    assert parts[0].too_large and parts[0].data == b"" and parts[0].size == 5000
    assert parts[1].data == small and not parts[1].too_large


def test_malformed_bodies_are_refused_with_a_reason():
    with pytest.raises(MultipartError, match="no multipart boundary"):
        parse(b"just bytes", 4)
    with pytest.raises(MultipartError, match="closing boundary"):
        parse(body(b"abc", close=False), 4)


def test_content_type_parameters():
    assert boundary_of('multipart/related; type="application/dicom"; boundary="a b"') == (
        "multipart/related", {"type": "application/dicom", "boundary": "a b"})
