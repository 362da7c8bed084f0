"""The values a series is matched on: ``Facts`` (a mapping from match key to value, None = absent).

Sources, cheapest first: the stored series/study index (Modality, SeriesDescription, ...), the
association that delivered the series' first instance (calling_ae, called_ae, source_host), the
derived facts (image_count, slice_thickness_mm in millimetres, eligible and eligibility_reason as
the scheduler recorded them), and for any other DICOM keyword the first instance's header, read
without pixel data and cached per series (keyed by series id, instance count and last arrival,
so a series that grew is read again).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName
from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import AssociationLog, Instance, Series

#: DICOM keyword -> how to read it from the index (series row, its study row).
INDEXED: dict[str, Callable[[Series], Any]] = {
    "Modality": lambda x: x.modality,
    "SeriesInstanceUID": lambda x: x.series_instance_uid,
    "SeriesNumber": lambda x: x.series_number,
    "SeriesDescription": lambda x: x.series_description,
    "StudyInstanceUID": lambda x: x.study.study_instance_uid,
    "StudyDescription": lambda x: x.study.study_description,
    "StudyDate": lambda x: x.study.study_date,
    "AccessionNumber": lambda x: x.study.accession_number,
    "PatientID": lambda x: x.study.patient_id,
    "PatientName": lambda x: x.study.patient_name,
}


def element_value(ds: Dataset, keyword: str) -> Any:
    """A header attribute as a plain value: str, int, float, or a list for multi-valued ones."""
    elem = ds.get(keyword)
    if elem is None:
        return None
    value = elem.value if hasattr(elem, "value") else elem
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue):
        return [str(v) if isinstance(v, PersonName) else v for v in value]
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, (bytes, bytearray)) or getattr(elem, "VR", "") == "SQ":
        return "(present)"
    if isinstance(value, (int, float, str)):
        return value
    return str(value)


class HeaderCache:
    """First-instance headers (no pixel data), per series, least recently used dropped first."""

    def __init__(self, size: int = 256):
        self.size = size
        self._items: OrderedDict[tuple, Dataset] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, load: Callable[[], Dataset]) -> Dataset:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        ds = load()
        with self._lock:
            self._items[key] = ds
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return ds


HEADERS = HeaderCache()


class Facts:
    """Lazily gathered values of one series (or of a pasted attribute set in a dry run)."""

    def __init__(self, values: dict[str, Any], header: Callable[[], Dataset | None] | None = None):
        self._values = dict(values)
        self._header = header
        self._ds: Dataset | None = None
        self._read = False
        self.header_error: str | None = None

    def get(self, key: str) -> Any:
        if key in self._values:
            return self._values[key]
        if key == "slice_thickness_mm":
            thickness = self.get("SliceThickness")
            try:
                value = None if thickness is None else float(thickness)
            except (TypeError, ValueError):
                value = None
            self._values[key] = value
            return value
        if self._header is None:
            return None
        if not self._read:
            self._read = True
            try:
                self._ds = self._header()
            except Exception as exc:  # noqa: BLE001 - an unreadable file: the attribute is absent
                self.header_error = f"first instance unreadable: {type(exc).__name__}"
        value = element_value(self._ds, key) if self._ds is not None else None
        self._values[key] = value
        return value

    def known(self) -> dict[str, Any]:
        """The values read so far (for the decision record)."""
        return dict(self._values)


def series_facts(s: Session, series: Series, path_of: Callable[[str], Path],
                 first_header: Dataset | None = None) -> Facts:
    """The facts of a stored series. ``first_header``: its first instance's header when the caller
    has it already (the scheduler reads every header for eligibility); read and cached otherwise."""
    first = s.scalar(select(Instance).where(Instance.series_id == series.id)
                     .order_by(Instance.instance_number, Instance.id).limit(1))
    values: dict[str, Any] = {k: get(series) for k, get in INDEXED.items()}
    values["image_count"] = series.instance_count or 0
    values["eligible"] = series.eligible
    values["eligibility_reason"] = series.eligibility_reason
    values["calling_ae"] = values["called_ae"] = values["source_host"] = None
    if first is not None:
        values["calling_ae"] = first.calling_ae
        if first.association_id is not None:
            assoc = s.get(AssociationLog, first.association_id)
            if assoc is not None:
                values["called_ae"], values["source_host"] = assoc.called_ae, assoc.peer_host
                values["calling_ae"] = values["calling_ae"] or assoc.calling_ae

    def header() -> Dataset | None:
        if first_header is not None:
            return first_header
        if first is None:
            return None
        key = (series.id, series.instance_count, str(series.last_received_at), first.path)
        return HEADERS.get(key, lambda: dcmread(path_of(first.path), stop_before_pixels=True))

    return Facts(values, header)
