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
  * finding site: "Lung" with laterality (7771000, SCT, "Left") | (24028007, SCT, "Right"), or,
    only when a lobe is known (never guessed), (45653009, SCT, "Upper lobe of lung"),
    (72481006, SCT, "Middle lobe of right lung"), (90572001, SCT, "Lower lobe of lung") with
    laterality.
  * malignancy suspicion level: qualitative evaluation "Malignancy" = (62482003, SCT, "Low") |
    (11896004, SCT, "Intermediate") | (75540009, SCT, "High"), cut-offs below
    (``HIGH_SUSPICION_FROM``, ``INTERMEDIATE_SUSPICION_FROM``).
  * detection score: (111012, DCM, "Certainty of Finding") [UCUM "1", a number in [0, 1]].
  * volume method: (370129005, SCT, "Measurement Method") = (126030, DCM, "Sum of segmented
    voxel method for volume").
  * document text: (121111, DCM, "Summary") and (121106, DCM, "Comment") (the research-use
    disclaimer) in the TID 1500 (C0034375, UMLS, "Qualitative Evaluations") container.

Everything a reader sees about one nodule is numbered by ``order_findings`` (one rule, used by
the SR, the SEG and the key images), coloured by ``segment_colour`` (one palette, reusable by the
web page) and rounded by ``round_mm`` / ``round_mm3`` / ``round_probability``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from highdicom.color import CIELabColor
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from dicom_node.presentation import (  # noqa: F401 - re-exported for the result builders
    HIGH_SUSPICION_FROM,
    INTERMEDIATE_SUSPICION_FROM,
    SEGMENT_PALETTE,
    round_mm,
    round_mm3,
    round_probability,
    suspicion_level,
)
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
LEFT = Code("7771000", "SCT", "Left")
RIGHT = Code("24028007", "SCT", "Right")
UPPER_LOBE_OF_LUNG = Code("45653009", "SCT", "Upper lobe of lung")
MIDDLE_LOBE_OF_RIGHT_LUNG = Code("72481006", "SCT", "Middle lobe of right lung")
LOWER_LOBE_OF_LUNG = Code("90572001", "SCT", "Lower lobe of lung")
LOW = Code("62482003", "SCT", "Low")
INTERMEDIATE = Code("11896004", "SCT", "Intermediate")
HIGH = Code("75540009", "SCT", "High")
CERTAINTY_OF_FINDING = Code("111012", "DCM", "Certainty of Finding")
SUM_OF_SEGMENTED_VOXELS = Code("126030", "DCM", "Sum of segmented voxel method for volume")
SUMMARY = Code("121111", "DCM", "Summary")
COMMENT = Code("121106", "DCM", "Comment")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

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


# -- how findings are presented ----------------------------------------------------------------
# Cut-offs, rounding and the palette live in ``dicom_node.presentation`` (one place, shared with
# the web pages and the export); the SR's codes for each level are here.
SUSPICION_CODES = {"low": LOW, "intermediate": INTERMEDIATE, "high": HIGH}


def laterality(center_mm: Sequence[float]) -> str:
    """``"left"`` or ``"right"`` lung from the patient x of a point in LPS mm (+x is the
    patient's left; x = 0 counts as right, as in the worker's ``side_of``)."""
    return "left" if float(center_mm[0]) > 0 else "right"


# Lobe names a caller may pass (``build_results(lobes=...)``) when it knows the lobe: the anatomic
# code and the laterality it implies. A lobe is never inferred from coordinates.
LOBES: dict[str, tuple[Code, str]] = {
    "right upper lobe": (UPPER_LOBE_OF_LUNG, "right"),
    "right middle lobe": (MIDDLE_LOBE_OF_RIGHT_LUNG, "right"),
    "right lower lobe": (LOWER_LOBE_OF_LUNG, "right"),
    "left upper lobe": (UPPER_LOBE_OF_LUNG, "left"),
    "left lower lobe": (LOWER_LOBE_OF_LUNG, "left"),
}


def order_findings(findings: Sequence[Finding]) -> list[int]:
    """Indices into ``findings`` in nodule-number order: Nodule 1 is ``findings[order[0]]``.

    The one numbering rule of every result object (SR tracking identifiers, SEG segments, key
    images) and of whatever shows them: descending malignancy probability, then descending
    detection score, then the order given (stable).
    """
    return sorted(
        range(len(findings)),
        key=lambda i: (-float(findings[i].malignancy), -float(findings[i].score), i),
    )


# Segment colours: ``dicom_node.presentation.SEGMENT_PALETTE`` (sRGB); nodule n gets
# SEGMENT_PALETTE[(n - 1) % len(SEGMENT_PALETTE)]. The SEG carries each as its
# RecommendedDisplayCIELabValue; the key images and the web page outline in it.


def segment_colour(number: int) -> tuple[tuple[int, int, int], str]:
    """Colour of nodule ``number`` (1-based): (DICOM CIELab value as three uint16, ``"#rrggbb"``).

    The CIELab triple is what DICOM's RecommendedDisplayCIELabValue holds (L* 0..100 and a*, b*
    -128..127 scaled to 0..65535, PS3.3 C.10.7.1.1), converted from the sRGB hex by highdicom.
    """
    if int(number) < 1:
        raise ValueError(f"nodule numbers start at 1, got {number}")
    hex_colour = SEGMENT_PALETTE[(int(number) - 1) % len(SEGMENT_PALETTE)]
    return tuple(CIELabColor.from_rgb(*hex_rgb(hex_colour)).value), hex_colour


def hex_rgb(hex_colour: str) -> tuple[int, int, int]:
    """``"#rrggbb"`` -> (r, g, b) in 0..255."""
    value = hex_colour.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


@dataclass(frozen=True)
class Producer:
    """Who made the results: the algorithm and the equipment attributes written into every object.

    ``malignancy_threshold`` is kept (and checked) for old callers; the objects no longer use it:
    they give a suspicion level (``suspicion_level``) instead of a malignant/benign verdict.
    """

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

    ``number``: the nodule number (``order_findings``), shown as ``tracking_id`` "Nodule <n>".
    ``index``: position of ``finding`` in the caller's list. ``mask``: bool (Z, Y, X) over the
    whole volume, or ``None`` when the finding has none (or it lies outside the volume).
    ``key_slice``: index z of the slice through the nodule centre (or, when the mask misses that
    slice, the slice with the largest mask area). ``segment_number``: 1-based segment in the SEG,
    ``None`` without a mask (equal to ``number`` whenever every finding has a mask).
    ``lobe``: a key of ``LOBES`` when the caller knows it, else ``None``.
    """

    number: int
    finding: Finding
    tracking_id: str
    tracking_uid: str
    mask: np.ndarray | None
    key_slice: int
    segment_number: int | None = None
    index: int = 0
    lobe: str | None = None

    @property
    def laterality(self) -> str:
        """``"left"`` / ``"right"``: from the lobe when known, else from the centre's patient x."""
        if self.lobe is not None:
            return LOBES[self.lobe][1]
        return laterality(self.finding.center_mm)

    @property
    def site_text(self) -> str:
        """E.g. "right lung" or "left upper lobe"."""
        return self.lobe if self.lobe is not None else f"{self.laterality} lung"

    @property
    def colour(self) -> tuple[tuple[int, int, int], str]:
        return segment_colour(self.number)


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


def prepare_nodules(
    volume: Volume,
    findings: Sequence[Finding],
    uids: UidSource,
    lobes: Sequence[str | None] | None = None,
) -> list[Nodule]:
    """Number the findings 1..N by ``order_findings``; give each a tracking UID, mask, key slice.

    ``lobes[i]``, when given, is the lobe of ``findings[i]`` (a key of ``LOBES``) or ``None``.
    Returned in nodule-number order.
    """
    if lobes is not None:
        if len(lobes) != len(findings):
            raise ValueError(f"lobes has {len(lobes)} entries for {len(findings)} findings")
        for lobe in lobes:
            if lobe is not None and lobe not in LOBES:
                raise ValueError(f"unknown lobe {lobe!r}; expected one of {sorted(LOBES)} or None")
    nodules: list[Nodule] = []
    segment = 0
    for number, index in enumerate(order_findings(findings), start=1):
        finding = findings[index]
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
                index=index,
                lobe=None if lobes is None else lobes[index],
            )
        )
    return nodules


def long_axis_mm(volume: Volume, nodule: Nodule) -> float:
    """The nodule section's long axis on its key slice, in mm.

    From the mask section (its extent along the principal axis, pixels counted whole) when it has
    at least 3 pixels, otherwise the finding's diameter.
    """
    sz, sy, sx = volume.spacing
    if nodule.mask is None or nodule.mask[nodule.key_slice].sum() < 3:
        return max(float(nodule.finding.diameter_mm), min(sx, sy))
    rows, cols = np.nonzero(nodule.mask[nodule.key_slice])
    points_mm = np.column_stack([cols * sx, rows * sy]).astype(np.float64)
    centered = points_mm - points_mm.mean(axis=0)
    _, vectors = np.linalg.eigh(centered.T @ centered)
    major = vectors[:, 1]
    projection = centered @ major
    pixel = abs(major[0]) * sx + abs(major[1]) * sy
    return float(projection.max() - projection.min() + pixel)


def in_plane_ellipse(volume: Volume, nodule: Nodule) -> tuple[np.ndarray, float]:
    """An ellipse outlining the nodule on its key slice, axis-aligned, and its long axis in mm.

    Returns ``(graphic_data, long_axis_mm)``: ``graphic_data`` is (4, 2) image coordinates
    (column, row) of the major-axis end points then the minor-axis end points, as SCOORD ELLIPSE
    wants (PS3.3 C.18.6.1.2; the centre of the top-left pixel is (0.5, 0.5)). The axes run along
    the image rows and columns -- OHIF 3.x draws an SR ellipse only when one axis is parallel to
    the column direction (see docs/results/sr-seg.md) -- and the ellipse is the one inscribed in
    the bounding box of the mask section (pixel edges), or, without a mask section, a circle of
    the finding's diameter around its centre. ``long_axis_mm``: ``long_axis_mm()``.
    """
    sz, sy, sx = volume.spacing
    finding = nodule.finding
    if nodule.mask is not None and nodule.mask[nodule.key_slice].any():
        rows, cols = np.nonzero(nodule.mask[nodule.key_slice])
        c0, c1 = float(cols.min()), float(cols.max()) + 1.0  # pixel edges
        r0, r1 = float(rows.min()), float(rows.max()) + 1.0
        cc, rc = (c0 + c1) / 2.0, (r0 + r1) / 2.0
        half_c, half_r = (c1 - c0) / 2.0, (r1 - r0) / 2.0
    else:
        radius_mm = max(float(finding.diameter_mm) / 2.0, min(sx, sy))
        cc, rc = float(finding.center_voxel[2]) + 0.5, float(finding.center_voxel[1]) + 0.5
        half_c, half_r = radius_mm / sx, radius_mm / sy
    horizontal = [[cc - half_c, rc], [cc + half_c, rc]]
    vertical = [[cc, rc - half_r], [cc, rc + half_r]]
    if half_c * sx >= half_r * sy:
        points = horizontal + vertical
    else:
        points = vertical + horizontal
    graphic = np.asarray(points, dtype=np.float32)
    graphic[:, 0] = np.clip(graphic[:, 0], 0.0, float(volume.array.shape[2]))
    graphic[:, 1] = np.clip(graphic[:, 1], 0.0, float(volume.array.shape[1]))
    return graphic, long_axis_mm(volume, nodule)


def source_headers(volume: Volume) -> list[pydicom.Dataset]:
    """The source instances' headers, checked to belong to one study and frame of reference."""
    if not volume.datasets:
        raise ValueError("volume has no source datasets")
    return volume.datasets
