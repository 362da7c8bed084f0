"""Test series for the routing tests, derived from real data (../shared/data): a copy of a series
with new Study/Series/SOP Instance UIDs, optionally another modality (an "MR" made from CT
slices: real pixel data under an MR Image Storage header, which is all routing looks at)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.peers import need

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def derive_series(source: Path, out: Path, *, modality: str | None = None, limit: int | None = None,
                  body_part: str | None = None, series_description: str | None = None,
                  study_uid: str | None = None) -> Path:
    """Copy ``source`` (a folder of DICOM files, or one file) into ``out`` with new UIDs (the
    Study Instance UID ``study_uid`` when given: another series of that study)."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    files = files[:limit] if limit else files
    study, series, frame = study_uid or generate_uid(), generate_uid(), generate_uid()
    for n, f in enumerate(files):
        ds = dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if "FrameOfReferenceUID" in ds:
            ds.FrameOfReferenceUID = frame
        if modality:
            ds.Modality = modality
            if modality == "MR":
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        if body_part is not None:
            ds.BodyPartExamined = body_part
        if series_description is not None:
            ds.SeriesDescription = series_description
        ds.save_as(out / f"{n:04d}.dcm", enforce_file_format=True)
    return out


def storescu(port: int, *paths, calling_ae: str = "STORESCU", called_ae: str = "DICOM_NODE") -> None:
    r = subprocess.run([need("storescu"), "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port),
                        "+sd", *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def study_uid_of(folder: Path) -> str:
    return str(dcmread(next(p for p in sorted(folder.iterdir()) if p.is_file()), stop_before_pixels=True).StudyInstanceUID)
