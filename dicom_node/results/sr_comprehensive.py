"""A Comprehensive SR (no SCOORD3D) from our Comprehensive 3D SR, for peers that accept no 3D SR.

``comprehensive_sr(sr3d)`` copies the TID 1500 report and drops every measurement group whose
Image Region is a SCOORD3D (the nodule centre point in the frame of reference, LPS mm) and any
other SCOORD3D item; the volumetric groups (the SEG reference, diameter, volume, malignancy)
and the key-slice planar groups (SCOORD ELLIPSE) stay. The SOP Class becomes Comprehensive SR;
the SOP Instance UID and Series Instance UID are derived from the 3D SR's (a UUID-derived
``2.25.`` UID), so every send of the fallback is the same object and a peer never gets two.
"""
from __future__ import annotations

import copy
import uuid

from pydicom import Dataset
from pydicom.sequence import Sequence

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"

_NAMESPACE = uuid.UUID("7d1f3b52-5a57-4a8e-9c55-0c7bd1f0c0a1")


def derived_uid(uid: str, purpose: str) -> str:
    """A stable ``2.25.`` UID for ``purpose`` derived from ``uid``."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, f'{purpose}:{uid}').int}"


def _has_scoord3d(item: Dataset) -> bool:
    return any(getattr(c, "ValueType", None) == "SCOORD3D" for c in item.get("ContentSequence", []))


def _strip(items: Sequence) -> Sequence:
    kept = []
    for item in items:
        if getattr(item, "ValueType", None) == "SCOORD3D":
            continue
        if item.get("ValueType") == "CONTAINER" and _has_scoord3d(item):
            continue  # a TID 1410 group whose only region is 3D: meaningless without it
        if "ContentSequence" in item:
            item.ContentSequence = _strip(item.ContentSequence)
        kept.append(item)
    return Sequence(kept)


def comprehensive_sr(sr3d: Dataset) -> Dataset:
    """The Comprehensive SR equivalent of ``sr3d`` (a Comprehensive 3D SR); ``sr3d`` is unchanged.
    Raises ValueError when ``sr3d`` is not a Comprehensive 3D SR."""
    if str(sr3d.SOPClassUID) != COMPREHENSIVE_3D_SR:
        raise ValueError(f"SOP Class {sr3d.SOPClassUID} is not Comprehensive 3D SR ({COMPREHENSIVE_3D_SR})")
    ds = copy.deepcopy(sr3d)
    ds.ContentSequence = _strip(ds.ContentSequence)
    ds.SOPClassUID = COMPREHENSIVE_SR
    ds.SOPInstanceUID = derived_uid(str(sr3d.SOPInstanceUID), "comprehensive-sr")
    ds.SeriesInstanceUID = derived_uid(str(sr3d.SeriesInstanceUID), "comprehensive-sr-series")
    ds.file_meta.MediaStorageSOPClassUID = COMPREHENSIVE_SR
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesDescription = (str(ds.get("SeriesDescription", "")) + " (Comprehensive SR)")[:64]
    return ds


def add_predecessor(sr: Dataset, study_uid: str, series_uid: str, sop_class_uid: str, sop_instance_uid: str) -> None:
    """Name the SR that ``sr`` replaces in its Predecessor Documents Sequence (0040,A360)
    (PS3.3 C.17.2: study, series and SOP references of the earlier version)."""
    ref = Dataset()
    ref.ReferencedSOPClassUID = sop_class_uid
    ref.ReferencedSOPInstanceUID = sop_instance_uid
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    series.ReferencedSOPSequence = Sequence([ref])
    study = Dataset()
    study.StudyInstanceUID = study_uid
    study.ReferencedSeriesSequence = Sequence([series])
    sr.PredecessorDocumentsSequence = Sequence([study])
