"""Small synthetic CT series written with pydicom, for geometry and result-object tests.

Every voxel's stored value encodes its own patient position: ``hu_at(p) = round(4 x + 2 y + 3 z)``
(p in LPS mm) plus a soft-tissue sphere where asked, so a test can check that the loader put
every voxel where the headers say it is, whatever the slice order on disk and the orientation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

INTERCEPT = -1024.0
SLOPE = 1.0


def hu_at(points: np.ndarray) -> np.ndarray:
    """The synthetic HU value at LPS points (..., 3): a linear ramp, exact in int16."""
    points = np.asarray(points, dtype=np.float64)
    return np.round(4.0 * points[..., 0] + 2.0 * points[..., 1] + 3.0 * points[..., 2])


@dataclass
class SeriesSpec:
    """Geometry of a synthetic series. ``positions_along_normal`` overrides the regular grid."""

    n_slices: int = 20
    rows: int = 24
    columns: int = 20
    pixel_spacing: tuple[float, float] = (0.8, 0.7)  # (between rows, between columns) mm
    slice_spacing: float = 2.0
    row_cosine: tuple[float, float, float] = (1.0, 0.0, 0.0)
    column_cosine: tuple[float, float, float] = (0.0, 1.0, 0.0)
    origin: tuple[float, float, float] = (-8.0, -10.0, -30.0)
    positions_along_normal: Sequence[float] | None = None
    in_plane_shift_per_slice: tuple[float, float, float] = (0.0, 0.0, 0.0)  # gantry tilt
    drop: Sequence[int] = ()
    modality: str = "CT"
    sop_class_uid: str = CTImageStorage
    slice_thickness: float | None = None
    sphere_center: tuple[float, float, float] | None = None  # LPS mm
    sphere_radius: float = 0.0
    sphere_hu: float = 40.0
    seed: int = 1
    study_uid: str = field(default_factory=lambda: str(generate_uid()))
    series_uid: str = field(default_factory=lambda: str(generate_uid()))
    frame_uid: str = field(default_factory=lambda: str(generate_uid()))

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.column_cosine)


def slice_positions(spec: SeriesSpec) -> list[np.ndarray]:
    """ImagePositionPatient of every slice, in acquisition order (before shuffling/dropping)."""
    along = (
        list(spec.positions_along_normal)
        if spec.positions_along_normal is not None
        else [k * spec.slice_spacing for k in range(spec.n_slices)]
    )
    origin = np.asarray(spec.origin, dtype=np.float64)
    shift = np.asarray(spec.in_plane_shift_per_slice, dtype=np.float64)
    return [origin + a * spec.normal + k * shift for k, a in enumerate(along)]


def expected_hu(spec: SeriesSpec, points: np.ndarray) -> np.ndarray:
    values = hu_at(points)
    if spec.sphere_center is not None and spec.sphere_radius > 0:
        inside = (
            np.linalg.norm(points - np.asarray(spec.sphere_center), axis=-1) <= spec.sphere_radius
        )
        values = np.where(inside, spec.sphere_hu, values)
    return values


def slice_points(spec: SeriesSpec, position: np.ndarray) -> np.ndarray:
    """LPS points (rows, columns, 3) of the pixel centres of a slice at ``position``."""
    r = np.arange(spec.rows)[:, None, None]
    c = np.arange(spec.columns)[None, :, None]
    sy, sx = spec.pixel_spacing
    return (
        position[None, None, :]
        + c * sx * np.asarray(spec.row_cosine)[None, None, :]
        + r * sy * np.asarray(spec.column_cosine)[None, None, :]
    )


def make_dataset(spec: SeriesSpec, position: np.ndarray, number: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = spec.sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = "20240102"
    ds.SeriesDate = "20240102"
    ds.StudyTime = "101500"
    ds.SeriesTime = "101600"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = spec.modality
    ds.Manufacturer = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = "SYN-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = (
        spec.slice_thickness if spec.slice_thickness is not None else spec.slice_spacing
    )
    ds.KVP = 120
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [round(float(v), 4) for v in position]
    ds.ImageOrientationPatient = [
        round(float(v), 6) for v in (*spec.row_cosine, *spec.column_cosine)
    ]
    ds.FrameOfReferenceUID = spec.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.PixelSpacing = list(spec.pixel_spacing)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = INTERCEPT
    ds.RescaleSlope = SLOPE
    ds.RescaleType = "HU"
    hu = expected_hu(spec, slice_points(spec, position))
    stored = np.round((hu - INTERCEPT) / SLOPE).astype(np.int16)
    ds.PixelData = stored.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def write_series(directory: Path, spec: SeriesSpec, *, compress: str | None = None) -> list[Path]:
    """Write the series, shuffled (file names do not follow slice order); returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    positions = slice_positions(spec)
    kept = [(k, p) for k, p in enumerate(positions) if k not in set(spec.drop)]
    random.Random(spec.seed).shuffle(kept)
    paths = []
    for i, (k, position) in enumerate(kept):
        ds = make_dataset(spec, position, number=k + 1)
        if compress is not None:
            ds.compress(compress)
        path = directory / f"im{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def headers(paths: Sequence[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
