"""Part 10 bytes of a received C-STORE dataset without pydicom's encoder and decoder on the hot
path: the File Meta Information the listener puts in front of the dataset, and the few header
elements the index needs, read from the raw dataset bytes.

Contract:

- ``file_meta(sop_class, sop_instance, transfer_syntax)``: the 128-byte preamble, ``DICM`` and the
  File Meta Information group, byte for byte what pynetdicom's ``Event.encoded_dataset()`` puts
  there (``create_file_meta`` + ``write_file_meta_info``: explicit VR little endian, group length,
  version 00 01, Media Storage SOP Class/Instance UID, Transfer Syntax UID, pynetdicom's
  Implementation Class UID and Version Name).
- ``header_elements(dataset, transfer_syntax)``: the raw elements of ``TAGS`` found at the top
  level of the dataset, as pydicom ``RawDataElement`` values (pydicom converts them on access,
  with the character set, exactly as ``dcmread`` would), read by walking element headers and
  stopping after the last tag wanted, so the pixel data and everything after (0020,0013) are
  never looked at. It returns None, and the caller reads the bytes with pydicom instead, for
  anything it does not walk itself: a big-endian or deflated transfer syntax, an element of
  undefined length (a sequence) before the last tag wanted, a wanted element whose VR is not
  the dictionary's, two bytes that are not a VR where one is due (pydicom then detects an
  implicit VR dataset under an explicit transfer syntax), tags out of ascending order or below
  group 0008 (file meta elements inside the dataset), a truncated dataset.

Units: bytes.
"""
from __future__ import annotations

import struct

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

#: The header elements the index reads (``dicom_node.ingest`` asks pydicom for the same ones
#: when this module declines).
HEADER_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "InstanceNumber", "SeriesNumber", "SeriesDescription", "PatientName", "PatientID",
    "AccessionNumber", "StudyDate", "StudyDescription",
)
#: keyword -> tag of those, plus Specific Character Set (needed to decode the text ones).
KEYWORDS: dict[str, int] = {k: tag_for_keyword(k) for k in ("SpecificCharacterSet", *HEADER_KEYWORDS)}
#: tag -> its dictionary VR (an element with another explicit VR is left to pydicom).
TAGS: dict[int, str] = {tag: dictionary_VR(tag) for tag in KEYWORDS.values()}
_LAST = max(TAGS)
_TAG_OBJECTS = {t: Tag(t) for t in TAGS}
#: Explicit VR: these have a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN", b"SH",
              b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
_UNDEFINED = 0xFFFFFFFF
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _element(tag: int, vr: str, value: bytes) -> bytes:
    """An explicit VR little-endian element with a short (2-byte) length."""
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _uid(value: str) -> bytes:
    raw = str(value).encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


_VERSION = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
_FIXED_TAIL = (_element(0x00020012, "UI", _uid(PYNETDICOM_IMPLEMENTATION_UID))
               + _element(0x00020013, "SH", _VERSION + b" " if len(_VERSION) % 2 else _VERSION))
_VERSION_ELEMENT = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information (see the module doc). Raises
    UnicodeEncodeError for a UID that is not ASCII (the caller falls back to pynetdicom)."""
    body = (_VERSION_ELEMENT + _element(0x00020002, "UI", _uid(sop_class_uid))
            + _element(0x00020003, "UI", _uid(sop_instance_uid))
            + _element(0x00020010, "UI", _uid(transfer_syntax)) + _FIXED_TAIL)
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


def header_elements(dataset, transfer_syntax: str) -> dict | None:  # noqa: ANN001 - bytes-like
    """{Tag: RawDataElement} of ``TAGS`` present in ``dataset`` (the encoded dataset, no file
    meta), or None when pydicom must read it instead (see the module doc)."""
    ts = str(transfer_syntax)
    if ts == _IMPLICIT_LE:
        implicit = True
    elif ts == _EXPLICIT_LE:
        implicit = False
    else:
        uid = UID(ts)
        if not uid.is_transfer_syntax or uid.is_deflated or not uid.is_little_endian or uid.is_implicit_VR:
            return None
        implicit = False  # the compressed syntaxes: explicit VR little endian outside the pixel data
    buf = memoryview(dataset)
    n = len(buf)
    pos = 0
    out = {}
    unpack = struct.unpack_from
    previous = 0x00080000 - 1
    while pos + 8 <= n:
        group, elem = unpack("<HH", buf, pos)
        tag = group << 16 | elem
        if tag > _LAST:
            break
        if tag <= previous:
            return None  # out of order, or a group below 0008 (file meta in the dataset): pydicom's
        previous = tag
        if implicit:
            vr = None
            (length,) = unpack("<I", buf, pos + 4)
            start = pos + 8
        else:
            vr = bytes(buf[pos + 4:pos + 6])
            if vr in _SHORT_VRS:
                (length,) = unpack("<H", buf, pos + 6)
                start = pos + 8
            elif vr in _LONG_VRS:
                if pos + 12 > n:
                    return None
                (length,) = unpack("<I", buf, pos + 8)
                start = pos + 12
            else:
                return None  # not a VR: implicit VR under an explicit transfer syntax, or garbage
        if length == _UNDEFINED:
            return None
        end = start + length
        if end > n:
            return None
        want = TAGS.get(tag)
        if want is not None:
            if vr is not None and vr != want.encode():
                return None
            out[_TAG_OBJECTS[tag]] = RawDataElement(_TAG_OBJECTS[tag], want, length, bytes(buf[start:end]), start,
                                                    implicit, True)
        pos = end
    else:
        if pos != n:
            return None  # a truncated element header
    return out


_MISSING = object()
_PYDICOM = object()


def _plain(elem: RawDataElement):
    """The value of a raw element when it is plain: one value, ASCII, no escape or PN component
    group, so every character set decodes it alike (an IS as int, others as str); else _PYDICOM."""
    value = elem.value
    if not value.isascii() or b"\\" in value or b"=" in value or b"\x1b" in value:
        return _PYDICOM
    text = value.decode("ascii")
    if elem.VR == "IS":
        try:
            return int(text)
        except ValueError:
            return _PYDICOM  # "80.0", garbage: pydicom's IS decides
    return text


class Header:
    """The header elements of ``header_elements`` with the access ``dcmread``'s dataset gives
    (``header.SOPClassUID``, ``header.get("Modality")``; AttributeError when absent). Plain
    values (see ``_plain``) are decoded here; any other goes through a pydicom ``Dataset`` of the
    same raw elements, so it decodes exactly as ``dcmread`` would (character sets included).
    The padding of a plain value is left for the caller to strip, as pydicom's partly is."""

    def __init__(self, raw: dict):
        self._raw = raw
        self._dataset: Dataset | None = None

    def get(self, keyword: str, default=None):  # noqa: ANN001
        elem = self._raw.get(_TAG_OBJECTS[KEYWORDS[keyword]])
        if elem is None:
            return default
        value = _plain(elem)
        if value is _PYDICOM:
            if self._dataset is None:
                self._dataset = Dataset(dict(self._raw))
            value = self._dataset.get(keyword, default)
        return value

    def __getattr__(self, keyword: str):
        if keyword.startswith("_") or keyword not in KEYWORDS:
            raise AttributeError(keyword)
        value = self.get(keyword, _MISSING)
        if value is _MISSING:
            raise AttributeError(keyword)
        return value
