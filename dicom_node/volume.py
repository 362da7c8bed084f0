"""DICOM CT series -> volume in Hounsfield units with its patient geometry.

Contract: ``series_problem`` decides from headers alone (files read with
``stop_before_pixels=True``) whether a series is eligible for the nodule model and, when it is
not, says why in one line. ``load_series`` reads the pixel data of one series (any slice order on
disk, any in-plane orientation, any transfer syntax pydicom can decode) into a ``Volume``: a
(Z, Y, X) float32 array in HU, the voxel spacing, and the mapping from voxel index to DICOM
patient coordinates (LPS, millimetres). ``series_problem`` returns its reason and raises
nothing; ``load_series`` raises ``VolumeError`` (a ``ValueError``) whose message names the
problem and the value. ``load_series`` checks geometry only (one regular stack, any extent and
orientation, as ``dicom-node predict`` needs); the eligibility thresholds (axial, slice count,
thickness) are ``series_problem``'s, with keyword arguments the configuration can set.

Coordinate conventions (the same as SimpleITK):
  * voxel index ``(z, y, x)`` addresses ``Volume.array[z, y, x]``; ``x`` runs along a row of the
    image (ImageOrientationPatient[0:3]), ``y`` down the columns (ImageOrientationPatient[3:6]),
    ``z`` across slices, sorted along the slice normal ``row x column``.
  * ``point_lps = origin + direction @ (np.array([x, y, z]) * np.array([sx, sy, sz]))``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import UID

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.2")
RADIOGRAPH_SOP_CLASSES = frozenset(
    {
        UID("1.2.840.10008.5.1.4.1.1.1"),  # Computed Radiography Image Storage
        UID("1.2.840.10008.5.1.4.1.1.1.1"),  # Digital X-Ray Image Storage - For Presentation
        UID("1.2.840.10008.5.1.4.1.1.1.1.1"),  # Digital X-Ray Image Storage - For Processing
    }
)
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})

NOT_ELIGIBLE_RADIOGRAPH = (
    "not eligible yet: chest radiographs (CR/DX) are not analysed by this version"
)
NOT_ELIGIBLE_ENHANCED_CT = (
    "not eligible yet: Enhanced CT (multi-frame) images are not analysed by this version"
)

# Geometry comparisons: direction cosines and pixel spacing agree to this many units.
_COSINE_TOLERANCE = 1e-3
_PIXEL_SPACING_TOLERANCE_MM = 1e-3
# Slice spacing: a difference from the nominal spacing within this fraction (and at least
# _MIN_SPACING_TOLERANCE_MM) is jitter, not a missing slice.
DEFAULT_SPACING_TOLERANCE = 0.1
_MIN_SPACING_TOLERANCE_MM = 0.01


class VolumeError(ValueError):
    """A series cannot be made into a volume; the message names the problem and the value."""


@dataclass
class Volume:
    """One CT series as a 3-D array with its patient geometry.

    ``array``: float32 (Z, Y, X) in HU (Rescale Slope/Intercept applied), slices sorted along the
    slice normal. ``spacing``: (sz, sy, sx) mm. ``origin``: LPS (x, y, z) mm of the centre of
    voxel [0, 0, 0]. ``direction``: 3x3, columns are the LPS unit vectors of the x, y and z index
    axes (SimpleITK convention). ``datasets``: the source headers, without PixelData, in the
    same z order as ``array``.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    datasets: list[pydicom.Dataset] = field(repr=False)

    @property
    def study_instance_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.datasets[0].FrameOfReferenceUID)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    def _spacing_xyz(self) -> np.ndarray:
        sz, sy, sx = self.spacing
        return np.array([sx, sy, sz], dtype=np.float64)

    def voxel_to_lps(self, zyx: Sequence[float] | np.ndarray) -> np.ndarray:
        """Map voxel index (z, y, x) -- continuous, shape (3,) or (N, 3) -- to LPS (x, y, z) mm."""
        zyx = np.asarray(zyx, dtype=np.float64)
        xyz_index = zyx[..., ::-1]
        offsets = (xyz_index * self._spacing_xyz()) @ self.direction.T
        return np.asarray(self.origin, dtype=np.float64) + offsets

    def lps_to_voxel(self, xyz: Sequence[float] | np.ndarray) -> np.ndarray:
        """Map LPS (x, y, z) mm -- shape (3,) or (N, 3) -- to continuous voxel index (z, y, x)."""
        xyz = np.asarray(xyz, dtype=np.float64)
        relative = xyz - np.asarray(self.origin, dtype=np.float64)
        xyz_index = (relative @ np.linalg.inv(self.direction).T) / self._spacing_xyz()
        return xyz_index[..., ::-1]

    def contains_voxel(self, zyx: Sequence[float] | np.ndarray) -> bool:
        """Whether a continuous voxel index (z, y, x) lies inside the array (voxel centres +-0.5)."""
        zyx = np.asarray(zyx, dtype=np.float64)
        upper = np.asarray(self.array.shape, dtype=np.float64) - 0.5
        return bool(np.all(zyx >= -0.5) and np.all(zyx <= upper))

    def to_sitk(self, array: np.ndarray | None = None):
        """A SimpleITK image of ``array`` (default: the HU volume) with this volume's geometry.

        ``array`` must have the shape (Z, Y, X) of ``self.array`` (e.g. a nodule mask).
        """
        import SimpleITK as sitk

        data = self.array if array is None else np.asarray(array)
        if data.shape != self.array.shape:
            raise VolumeError(
                f"array shape {data.shape} does not match the volume shape {self.array.shape}"
            )
        image = sitk.GetImageFromArray(data)
        sz, sy, sx = self.spacing
        image.SetSpacing((sx, sy, sz))
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetDirection(tuple(float(v) for v in self.direction.ravel()))
        return image


# --------------------------------------------------------------------------------------------
# Header checks


@dataclass(frozen=True)
class _Stack:
    """Headers sorted along the slice normal, with the geometry they share."""

    headers: list[pydicom.Dataset]
    row: np.ndarray  # unit vector along a row (index x)
    column: np.ndarray  # unit vector down a column (index y)
    normal: np.ndarray  # row x column (index z)
    positions: np.ndarray  # (N, 3) ImagePositionPatient, sorted
    along: np.ndarray  # (N,) positions projected on the normal, ascending
    pixel_spacing: tuple[float, float]  # (row spacing = sy, column spacing = sx)
    slice_spacing: float | None  # nominal spacing along the normal; None for one slice


def _instance(ds: pydicom.Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "<no SOPInstanceUID>"))


def _modality_problem(headers: Sequence[pydicom.Dataset]) -> str | None:
    modalities = {str(ds.get("Modality", "")).upper() for ds in headers}
    sop_classes = {UID(str(ds.get("SOPClassUID", ""))) for ds in headers}
    if modalities & RADIOGRAPH_MODALITIES or sop_classes & RADIOGRAPH_SOP_CLASSES:
        return NOT_ELIGIBLE_RADIOGRAPH
    if modalities != {"CT"}:
        return f"not a CT series: Modality {', '.join(sorted(modalities)) or '(empty)'}"
    if sop_classes & {ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE}:
        return NOT_ELIGIBLE_ENHANCED_CT
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in headers):
        return NOT_ELIGIBLE_ENHANCED_CT
    others = sop_classes - {CT_IMAGE_STORAGE}
    if others:
        names = ", ".join(sorted(f"{uid.name} ({uid})" for uid in others))
        return f"not single-frame CT Image Storage: SOP Class {names}"
    return None


def _series_uid_problem(headers: Sequence[pydicom.Dataset]) -> str | None:
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in headers}
    if len(series) > 1:
        return f"instances of {len(series)} series were given as one series: {sorted(series)}"
    return None


def _stack(
    headers: Sequence[pydicom.Dataset], tolerance: float
) -> tuple[_Stack | None, str | None]:
    """Sort headers along the slice normal and check that they form a regular stack."""
    required = (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "Rows",
        "Columns",
        "FrameOfReferenceUID",
    )
    for ds in headers:
        for keyword in required:
            if ds.get(keyword) in (None, ""):
                return None, f"missing {keyword} in instance {_instance(ds)}"
    first = headers[0]
    iop0 = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    ps0 = np.asarray(first.PixelSpacing, dtype=np.float64)
    size0 = (int(first.Rows), int(first.Columns))
    for ds in headers[1:]:
        iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        if iop.shape != (6,) or np.max(np.abs(iop - iop0)) > _COSINE_TOLERANCE:
            return None, (
                f"inconsistent ImageOrientationPatient: {_fmt(iop)} in instance {_instance(ds)}"
                f" vs {_fmt(iop0)}"
            )
        ps = np.asarray(ds.PixelSpacing, dtype=np.float64)
        if ps.shape != (2,) or np.max(np.abs(ps - ps0)) > _PIXEL_SPACING_TOLERANCE_MM:
            return None, (
                f"inconsistent PixelSpacing: {_fmt(ps)} mm in instance {_instance(ds)}"
                f" vs {_fmt(ps0)} mm"
            )
        if (int(ds.Rows), int(ds.Columns)) != size0:
            return None, (
                f"inconsistent image size: {ds.Rows}x{ds.Columns} in instance {_instance(ds)}"
                f" vs {size0[0]}x{size0[1]}"
            )
    frames = {str(ds.FrameOfReferenceUID) for ds in headers}
    if len(frames) > 1:
        return None, f"inconsistent FrameOfReferenceUID: {sorted(frames)}"
    if iop0.shape != (6,) or np.any(ps0 <= 0):
        return (
            None,
            f"invalid geometry: ImageOrientationPatient {_fmt(iop0)}, PixelSpacing {_fmt(ps0)}",
        )
    row, column = iop0[:3], iop0[3:]
    if (
        abs(np.linalg.norm(row) - 1) > 0.01
        or abs(np.linalg.norm(column) - 1) > 0.01
        or abs(float(row @ column)) > 0.01
    ):
        return None, f"ImageOrientationPatient is not two orthogonal unit vectors: {_fmt(iop0)}"
    row = row / np.linalg.norm(row)
    column = column / np.linalg.norm(column)
    normal = np.cross(row, column)

    positions = np.array([ds.ImagePositionPatient for ds in headers], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along = positions[order], along[order]
    sorted_headers = [headers[i] for i in order]

    slice_spacing: float | None = None
    if len(sorted_headers) > 1:
        steps = np.diff(along)
        # Duplicate positions (a repeated acquisition, several phases in one series).
        duplicate = np.flatnonzero(steps < _MIN_SPACING_TOLERANCE_MM)
        if duplicate.size:
            i = int(duplicate[0])
            count = int(np.sum(np.abs(along - along[i]) < _MIN_SPACING_TOLERANCE_MM))
            return None, (
                f"duplicate slice position: {count} instances at z={positions[i, 2]:.2f} mm"
                f" ({_instance(sorted_headers[i])}, {_instance(sorted_headers[i + 1])})"
            )
        nominal = float(np.median(steps))
        allowed = max(tolerance * nominal, _MIN_SPACING_TOLERANCE_MM)
        for i, step in enumerate(steps):
            if step > nominal + allowed:
                missing = step / nominal - 1
                between = (
                    f"between z={positions[i, 2]:.2f} and z={positions[i + 1, 2]:.2f}"
                    f" (expected {nominal:.2f} mm)"
                )
                if abs(missing - round(missing)) * nominal <= allowed:
                    return None, f"missing slice: gap of {step:.2f} mm {between}"
                return None, f"non-uniform slice spacing: {step:.2f} mm {between}"
            if step < nominal - allowed:
                return None, (
                    f"non-uniform slice spacing: {step:.2f} mm between z={positions[i, 2]:.2f} and"
                    f" z={positions[i + 1, 2]:.2f} (expected {nominal:.2f} mm)"
                )
        # Slices must be stacked along the normal: an in-plane drift means gantry tilt or a
        # sheared reconstruction, which a (Z, Y, X) grid cannot represent.
        drift = positions - positions[0] - np.outer(along - along[0], normal)
        worst = int(np.argmax(np.linalg.norm(drift, axis=1)))
        worst_mm = float(np.linalg.norm(drift[worst]))
        if worst_mm > max(0.5 * float(np.min(ps0)), allowed):
            return None, (
                f"slices are not stacked along the slice normal (gantry tilt or sheared series):"
                f" in-plane offset of {worst_mm:.2f} mm at z={positions[worst, 2]:.2f}"
            )
        # Spacing from the first to the last slice: the mean step, robust to jitter.
        slice_spacing = float((along[-1] - along[0]) / (len(along) - 1))
    stack = _Stack(
        headers=sorted_headers,
        row=row,
        column=column,
        normal=normal,
        positions=positions,
        along=along,
        pixel_spacing=(float(ps0[0]), float(ps0[1])),
        slice_spacing=slice_spacing,
    )
    return stack, None


def _fmt(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def series_problem(
    headers: Sequence[pydicom.Dataset],
    *,
    min_slices: int = 16,
    max_slice_spacing_mm: float = 3.0,
    max_slice_thickness_mm: float = 3.0,
    min_slice_spacing_mm: float = 0.25,
    max_tilt_degrees: float = 10.0,
    spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE,
) -> str | None:
    """Whether one series is eligible for the nodule model, from its headers only.

    ``headers``: the series' instances (read with ``stop_before_pixels=True``), in any order.
    Returns ``None`` when eligible, otherwise a one-line reason. Rules, in order:

    * CR/DX -> "not eligible yet: chest radiographs (CR/DX) ..."; Modality must be CT;
      Enhanced CT (multi-frame) -> "not eligible yet: ..."; only CT Image Storage instances;
      one SeriesInstanceUID; no localizer images.
    * ImageOrientationPatient, PixelSpacing, Rows/Columns and FrameOfReferenceUID agree in all
      instances; the slice normal is within ``max_tilt_degrees`` of the patient z axis (axial).
    * At least ``min_slices`` slices; no duplicate positions; slices equally spaced along the
      normal within ``spacing_tolerance`` (a fraction of the nominal spacing), so a missing slice
      is reported with its position; slices stacked along the normal (no gantry tilt).
    * Slice spacing within [``min_slice_spacing_mm``, ``max_slice_spacing_mm``]; SliceThickness,
      where present, at most ``max_slice_thickness_mm``.
    """
    if not headers:
        return "empty series: no instances"
    problem = _modality_problem(headers) or _series_uid_problem(headers)
    if problem:
        return problem
    localizers = [
        ds for ds in headers if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]
    ]
    if localizers:
        return f"localizer (scout) images in the series: {len(localizers)} of {len(headers)}"
    if len(headers) < min_slices:
        return f"too few slices: {len(headers)} (at least {min_slices} needed)"
    stack, problem = _stack(headers, spacing_tolerance)
    if problem:
        return problem
    assert stack is not None
    tilt = math.degrees(math.acos(min(1.0, abs(float(stack.normal[2])))))
    if tilt > max_tilt_degrees:
        iop = _fmt(np.concatenate([stack.row, stack.column]))
        return (
            f"not axial: slice normal {tilt:.1f} degrees from the patient z axis"
            f" (at most {max_tilt_degrees:g}; ImageOrientationPatient {iop})"
        )
    spacing = stack.slice_spacing  # None for a single slice (only with min_slices <= 1)
    if spacing is not None and spacing > max_slice_spacing_mm:
        return f"slice spacing too large: {spacing:.2f} mm (at most {max_slice_spacing_mm:g} mm)"
    if spacing is not None and spacing < min_slice_spacing_mm:
        return f"slice spacing too small: {spacing:.2f} mm (at least {min_slice_spacing_mm:g} mm)"
    thicknesses = [
        float(ds.SliceThickness) for ds in headers if ds.get("SliceThickness") not in (None, "")
    ]
    if thicknesses and max(thicknesses) > max_slice_thickness_mm:
        return (
            f"slice thickness too large: {max(thicknesses):.2f} mm"
            f" (at most {max_slice_thickness_mm:g} mm)"
        )
    return None


# --------------------------------------------------------------------------------------------
# Loading


def _expand(paths: Sequence[Path | str]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files.extend(
                sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            )
        else:
            files.append(path)
    return files


def _hu_slice(ds: pydicom.Dataset) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad series for us
        raise VolumeError(
            f"cannot decode pixel data of instance {_instance(ds)}"
            f" (transfer syntax {ds.file_meta.get('TransferSyntaxUID', '?')}): {exc}"
        ) from exc
    if pixels.ndim != 2:
        raise VolumeError(
            f"instance {_instance(ds)} is not a single-frame grayscale image: pixel array shape {pixels.shape}"
        )
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    hu = pixels.astype(np.float32)
    if slope != 1:
        hu *= np.float32(slope)
    if intercept != 0:
        hu += np.float32(intercept)
    return hu


def load_series(
    paths: Sequence[Path | str],
    *,
    spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE,
) -> Volume:
    """Read one CT series into a ``Volume`` (HU, LPS geometry).

    ``paths``: the series' files in any order (a folder stands for the files in it). Accepts any
    number of slices and any orientation (eligibility is ``series_problem``'s business) but
    requires a consistent, regular stack: one series, one orientation, pixel spacing and size,
    no duplicate or missing slices. Compressed transfer syntaxes are decoded by pydicom's
    plugins (pylibjpeg, ...). Raises ``VolumeError`` on any problem.
    """
    files = _expand(paths)
    if not files:
        raise VolumeError("no files given")
    datasets: list[pydicom.Dataset] = []
    for path in files:
        try:
            datasets.append(pydicom.dcmread(path))
        except Exception as exc:  # noqa: BLE001
            raise VolumeError(f"cannot read DICOM file {path}: {exc}") from exc
    problem = _series_uid_problem(datasets) or _modality_problem(datasets)
    if problem:
        raise VolumeError(problem)
    stack, problem = _stack(datasets, spacing_tolerance)
    if problem:
        raise VolumeError(problem)
    assert stack is not None
    slices = [_hu_slice(ds) for ds in stack.headers]
    array = np.stack(slices, axis=0)
    headers = []
    for ds in stack.headers:
        del ds.PixelData
        headers.append(ds)
    if stack.slice_spacing is not None:
        sz = stack.slice_spacing
    else:
        first = stack.headers[0]
        sz = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    sy, sx = stack.pixel_spacing
    direction = np.column_stack([stack.row, stack.column, stack.normal])
    volume = Volume(
        array=array,
        spacing=(float(sz), float(sy), float(sx)),
        origin=tuple(float(v) for v in stack.positions[0]),  # type: ignore[arg-type]
        direction=direction,
        datasets=headers,
    )
    logger.info(
        "loaded series %s: shape %s, spacing %s mm",
        volume.series_instance_uid,
        volume.shape,
        tuple(round(s, 4) for s in volume.spacing),
    )
    return volume
