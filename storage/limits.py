"""What the index accepts of an instance's header attributes, per DICOM VR (PS3.5 6.2).

The file store keeps every instance exactly as received; the database indexes a few header
attributes (``repo.InstanceMeta``). Their columns are sized so that no value the index accepts
can overflow one, on SQLite and PostgreSQL alike:

* UIDs (VR UI, at most 64 characters, PS3.5 9.1) identify rows and name files: their columns
  are ``VARCHAR(64)`` and a longer UID is refused.
* Descriptive text (PN, LO, SH, CS, DA) is stored in unbounded ``TEXT`` columns. Senders in
  the field exceed the standard's lengths for these (24-character accession numbers, 200-
  character descriptions are common); the value is indexed in full and the instance accepted,
  up to ``ACCEPTED`` characters, far beyond any real value. Longer is garbage or an attack and
  the instance is refused.
* Integers (IS) go into 32-bit columns; the standard bounds IS to the same range
  (-2**31 .. 2**31 - 1), and a value outside it is refused.
* A NUL character inside a text value (PostgreSQL cannot store it) is refused; trailing NUL
  padding is removed before this check (``clean_text``).

A refusal is permanent (the same bytes will never be accepted): the listener answers
0xA900 with a log line that names the SOP Instance UID and the attribute keyword, never the
value (patient attributes are among them).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class Limit:
    """``standard``: the VR's maximum length in characters; ``accepted``: what the index takes."""

    keyword: str
    vr: str
    standard: int
    accepted: int


#: Text values the index accepts beyond the standard length (see the module docstring).
ACCEPTED_TEXT = 1024
#: Short coded values (dates, code strings) get a smaller margin.
ACCEPTED_CODE = 64

#: ``repo.InstanceMeta`` field -> its limit. PN: three component groups of 64 characters each,
#: joined by "=" (PS3.5 6.2, Table 6.2-1).
LIMITS: dict[str, Limit] = {
    "study_instance_uid": Limit("StudyInstanceUID", "UI", 64, 64),
    "series_instance_uid": Limit("SeriesInstanceUID", "UI", 64, 64),
    "sop_instance_uid": Limit("SOPInstanceUID", "UI", 64, 64),
    "sop_class_uid": Limit("SOPClassUID", "UI", 64, 64),
    "transfer_syntax_uid": Limit("TransferSyntaxUID", "UI", 64, 64),
    "modality": Limit("Modality", "CS", 16, ACCEPTED_CODE),
    "series_description": Limit("SeriesDescription", "LO", 64, ACCEPTED_TEXT),
    "patient_name": Limit("PatientName", "PN", 3 * 64 + 2, ACCEPTED_TEXT),
    "patient_id": Limit("PatientID", "LO", 64, ACCEPTED_TEXT),
    "accession_number": Limit("AccessionNumber", "SH", 16, ACCEPTED_TEXT),
    "study_date": Limit("StudyDate", "DA", 8, ACCEPTED_CODE),
    "study_description": Limit("StudyDescription", "LO", 64, ACCEPTED_TEXT),
}

#: Integer fields (VR IS) -> keyword.
INTEGERS: dict[str, str] = {"instance_number": "InstanceNumber", "series_number": "SeriesNumber"}


class ValueRefused(ValueError):
    """An indexed attribute the index cannot hold. ``str()`` names the keyword, never the value."""

    def __init__(self, keyword: str, reason: str):
        super().__init__(f"{keyword} {reason}")
        self.keyword = keyword
        self.reason = reason


def clean_text(value: str | None) -> str | None:
    """Strip padding (spaces, trailing NULs); None for an empty value."""
    if value is None:
        return None
    value = value.rstrip("\x00").strip()
    return value or None


def check(meta) -> None:
    """Raise ``ValueRefused`` for the first attribute of ``meta`` the index cannot hold."""
    names = {f.name for f in fields(meta)}
    for field, limit in LIMITS.items():
        value = getattr(meta, field) if field in names else None
        if value is None:
            continue
        if len(value) > limit.accepted:
            raise ValueRefused(limit.keyword, f"is {len(value)} characters long, more than the {limit.accepted} "
                                              f"accepted (VR {limit.vr}, standard maximum {limit.standard})")
        if "\x00" in value:
            raise ValueRefused(limit.keyword, "contains a NUL character")
    for field, keyword in INTEGERS.items():
        value = getattr(meta, field) if field in names else None
        if value is not None and not INT32_MIN <= value <= INT32_MAX:
            raise ValueRefused(keyword, "is outside the range of VR IS (-2**31 .. 2**31 - 1)")
