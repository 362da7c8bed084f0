"""What the SR, SEG and key-image builders share: codes, producer identity, UIDs, nodule masks.

Terminology (standard codes only, PS3.16 and SNOMED CT / RadLex / UCUM):
  * finding category: (49755003, SCT, "Morphologically abnormal structure");
    finding / segmented property type: (27925004, SCT, "Nodule"); finding site / anatomic
    region: (39607008, SCT, "Lung").
  * measurements: (81827009, SCT, "Diameter") [mm], (103339001, SCT, "Long axis") [mm],
    (118565006, SCT, "Volume") [mm3], (111047, DCM, "Probability of cancer") [UCUM "1",
    a number in [0, 1]].
  * malignancy: qualitative evaluation (RID36042, RADLEX, "Malignancy") = (21594007, SCT,
    "Malignant") or (30807003, SCT, "Benign") -- the same concept name the DICOM encoding of the
    LIDC-IDRI annotations uses (Fedorov et al., Med Phys 2020).
  * a study without nodules: qualitative evaluation (121052, DCM, "Presence of property") =
    (121054, DCM, "Absent") in a TID 1501 measurement group whose finding is "Nodule".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from dicom_node.volume import Volume
from model.finding import Finding

logger = logging.getLogger(__name__)

# -- codes ------------------------------------------------------------------------------------
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically abnormal structure")
NODULE = Code("27925004", "SCT", "Nodule")
LUNG = Code("39607008", "SCT", "Lung")
DIAMETER = Code("81827009", "SCT", "Diameter")
LONG_AXIS = Code("103339001", "SCT", "Long axis")
VOLUME = Code("118565006", "SCT", "Volume")
PROBABILITY_OF_CANCER = Code("111047", "DCM", "Probability of cancer")
MALIGNANCY = Code("RID36042", "RADLEX", "Malignancy")
MALIGNANT = Code("21594007", "SCT", "Malignant")
BENIGN = Code("30807003", "SCT", "Benign")
PRESENCE_OF_PROPERTY = Code("121052", "DCM", "Presence of property")
PRESENT = Code("121053", "DCM", "Present")
ABSENT = Code("121054", "DCM", "Absent")
CT_CHEST = Code("24627-2", "LN", "CT Chest")
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")
UCUM_MM = Code("mm", "UCUM", "millimeter")
UCUM_MM3 = Code("mm3", "UCUM", "cubic millimeter")
UCUM_NO_UNITS = Code("1", "UCUM", "no units")

# -- series identity ----------------------------------------------------------------------------
SR_SERIES_NUMBER = 9901
SEG_SERIES_NUMBER = 9902
KEY_IMAGES_SERIES_NUMBER = 9903
# Series Description is LO: at most 64 characters.
SR_SERIES_DESCRIPTION = "AI lung nodule report - automated research tool, not clinical"
SEG_SERIES_DESCRIPTION = "AI lung nodule masks - automated research tool, not clinical"
KEY_IMAGES_SERIES_DESCRIPTION = "AI nodule key images - automated research tool, not clinical"
DISCLAIMER = (
    "Produced automatically by a non-clinical research tool; not a medical device; "
    "not for diagnostic use."
)


@dataclass(frozen=True)
class Producer:
    """Who made the results: the algorithm and the equipment attributes written into every object."""

    algorithm_name: str
    algorithm_version: str
    manufacturer: str = "dicom-node"
    manufacturer_model_name: str = "dicom-node lung nodule analysis"
    device_serial_number: str = "0"
    institution_name: str | None = None
    institutional_department_name: str | None = None
    malignancy_threshold: float = 0.5

    def __post_init__(self) -> None:
        if not self.algorithm_name:
            raise ValueError("algorithm_name must not be empty")
        if not self.algorithm_version:
            raise ValueError("algorithm_version must not be empty")
        if not 0.0 <= self.malignancy_threshold <= 1.0:
            raise ValueError(
                f"malignancy_threshold must be in [0, 1], got {self.malignancy_threshold}"
            )


class UidSource:
    """New UIDs; derived from ``seed`` when given, so that a re-run of the same job produces the
    same SOP Instance UIDs (a receiver then sees a duplicate, not a second result)."""

    def __init__(self, seed: str | None = None) -> None:
        self._seed = seed

    def __call__(self, label: str) -> str:
        if self._seed is None:
            return str(generate_uid())
        return str(generate_uid(entropy_srcs=[self._seed, label]))


@dataclass
class Nodule:
    """One finding prepared for the result objects.

    ``mask``: bool (Z, Y, X) over the whole volume, or ``None`` when the finding has none (or it
    lies outside the volume). ``key_slice``: index z of the slice through the nodule centre (or,
    when the mask misses that slice, the slice with the largest mask area). ``segment_number``:
    1-based segment in the SEG, ``None`` without a mask.
    """

    number: int
    finding: Finding
    tracking_id: str
    tracking_uid: str
    mask: np.ndarray | None
    key_slice: int
    segment_number: int | None = None


def full_mask(volume: Volume, finding: Finding) -> np.ndarray | None:
    """The finding's mask placed into a bool (Z, Y, X) array of the volume's shape (clipped)."""
    if finding.mask is None:
        return None
    mask = np.asarray(finding.mask).astype(bool, copy=False)
    if mask.ndim != 3:
        raise ValueError(f"Finding.mask must be 3-D (d, h, w), got shape {mask.shape}")
    shape = np.asarray(volume.array.shape)
    start = np.asarray(finding.mask_offset, dtype=int)
    stop = start + np.asarray(mask.shape)
    lo = np.clip(start, 0, shape)
    hi = np.clip(stop, 0, shape)
    if np.any(hi <= lo):
        logger.warning(
            "finding mask at offset %s lies outside the volume %s", tuple(start), tuple(shape)
        )
        return None
    out = np.zeros(volume.array.shape, dtype=bool)
    src = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
    out[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))] = mask[src]
    if not out.any():
        return None
    return out


def key_slice(volume: Volume, finding: Finding, mask: np.ndarray | None) -> int:
    """Index z of the key slice: through the centre, or the largest mask section if the centre misses."""
    z = int(round(float(finding.center_voxel[0])))
    z = min(max(z, 0), volume.array.shape[0] - 1)
    if mask is not None and not mask[z].any():
        z = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
    return z


def prepare_nodules(volume: Volume, findings: Sequence[Finding], uids: UidSource) -> list[Nodule]:
    """Number the findings 1..N (in the given order) and give each a tracking UID, mask and key slice."""
    nodules: list[Nodule] = []
    segment = 0
    for number, finding in enumerate(findings, start=1):
        mask = full_mask(volume, finding)
        if mask is not None:
            segment += 1
        nodules.append(
            Nodule(
                number=number,
                finding=finding,
                tracking_id=f"Nodule {number}",
                tracking_uid=uids(f"tracking-{number}"),
                mask=mask,
                key_slice=key_slice(volume, finding, mask),
                segment_number=segment if mask is not None else None,
            )
        )
    return nodules


def in_plane_ellipse(volume: Volume, nodule: Nodule) -> tuple[np.ndarray, float]:
    """An ellipse outlining the nodule on its key slice, and its long axis in mm.

    Returns ``(graphic_data, long_axis_mm)``: ``graphic_data`` is (4, 2) image coordinates
    (column, row) of the major-axis end points then the minor-axis end points, as SCOORD ELLIPSE
    wants (PS3.3 C.18.6.1.2; pixel centre of the top-left pixel at (0.5, 0.5)). From the mask
    section (principal axes, extent along each) when there is one, otherwise a circle of the
    finding's diameter around its centre.
    """
    sz, sy, sx = volume.spacing
    finding = nodule.finding
    centre_rc = np.array([finding.center_voxel[1], finding.center_voxel[2]], dtype=np.float64)
    if nodule.mask is not None and nodule.mask[nodule.key_slice].sum() >= 3:
        rows, cols = np.nonzero(nodule.mask[nodule.key_slice])
        points_mm = np.column_stack([cols * sx, rows * sy]).astype(np.float64)
        centre_mm = points_mm.mean(axis=0)
        centered = points_mm - centre_mm
        _, vectors = np.linalg.eigh(centered.T @ centered)
        major, minor = vectors[:, 1], vectors[:, 0]
        # Extent of the pixels (each pixel is sx by sy) along each axis.
        half_pixel = 0.5 * (abs(major[0]) * sx + abs(major[1]) * sy)
        a_proj = centered @ major
        b_proj = centered @ minor
        a_half = max(abs(a_proj.min()), abs(a_proj.max())) + half_pixel
        half_pixel_b = 0.5 * (abs(minor[0]) * sx + abs(minor[1]) * sy)
        b_half = max(abs(b_proj.min()), abs(b_proj.max())) + half_pixel_b
        long_axis_mm = float(a_proj.max() - a_proj.min() + 2 * half_pixel)
        ends_mm = np.array(
            [
                centre_mm + a_half * major,
                centre_mm - a_half * major,
                centre_mm + b_half * minor,
                centre_mm - b_half * minor,
            ]
        )
        cols_rows = ends_mm / np.array([sx, sy])
    else:
        radius_mm = max(float(finding.diameter_mm) / 2.0, min(sx, sy))
        long_axis_mm = 2.0 * radius_mm
        c, r = centre_rc[1], centre_rc[0]
        cols_rows = np.array(
            [
                [c - radius_mm / sx, r],
                [c + radius_mm / sx, r],
                [c, r - radius_mm / sy],
                [c, r + radius_mm / sy],
            ]
        )
    # Voxel index -> image coordinates: the centre of pixel (0, 0) is (0.5, 0.5).
    graphic = (cols_rows + 0.5).astype(np.float32)
    graphic[:, 0] = np.clip(graphic[:, 0], 0.0, float(volume.array.shape[2]))
    graphic[:, 1] = np.clip(graphic[:, 1], 0.0, float(volume.array.shape[1]))
    return graphic, long_axis_mm


def source_headers(volume: Volume) -> list[pydicom.Dataset]:
    """The source instances' headers, checked to belong to one study and frame of reference."""
    if not volume.datasets:
        raise ValueError("volume has no source datasets")
    return volume.datasets
