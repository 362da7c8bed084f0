"""Secondary-capture key images: for viewers that show neither SR nor SEG.

One RGB Secondary Capture image per nodule, in nodule-number order (``common.order_findings``;
Instance Number = nodule number): its key slice in a lung window (level -600 HU, width 1500 HU)
with the nodule outlined in its segment colour (``common.segment_colour``, the SEG's recommended
display colour; the mask boundary on that slice, or the SR's ellipse when there is no mask), in
the source study, a new series, and the source slice's
geometry (pixel spacing, patient orientation) so that measurements on it stay meaningful. The
pixels carry no text, so Burned In Annotation is "NO".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom

from dicom_node.results.common import (
    KEY_IMAGES_SERIES_DESCRIPTION,
    KEY_IMAGES_SERIES_NUMBER,
    Nodule,
    Producer,
    UidSource,
    hex_rgb,
    in_plane_ellipse,
)
from dicom_node.volume import Volume

logger = logging.getLogger(__name__)

LUNG_WINDOW_LEVEL_HU = -600.0
LUNG_WINDOW_WIDTH_HU = 1500.0


def _orientation_label(vector: np.ndarray) -> str:
    """Patient Orientation letters (PS3.3 C.7.6.1.1.1) of a direction in LPS, main axis first."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(vector))
    label = ""
    for axis in order:
        if abs(vector[axis]) > 0.25:
            label += letters[axis][0] if vector[axis] > 0 else letters[axis][1]
    return label


def _lung_window(hu: np.ndarray) -> np.ndarray:
    low = LUNG_WINDOW_LEVEL_HU - LUNG_WINDOW_WIDTH_HU / 2
    scaled = (hu.astype(np.float32) - low) / LUNG_WINDOW_WIDTH_HU
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _outline(volume: Volume, nodule: Nodule) -> np.ndarray:
    """Bool (Y, X): the boundary of the nodule section (dilated one pixel for visibility)."""
    shape = volume.array.shape[1:]
    if nodule.mask is not None and nodule.mask[nodule.key_slice].any():
        region = nodule.mask[nodule.key_slice]
    else:
        graphic, _ = in_plane_ellipse(volume, nodule)
        points = graphic.astype(np.float64) - 0.5  # back to pixel indices (col, row)
        centre = points[:2].mean(axis=0)
        a = points[0] - centre
        b = points[2] - centre
        rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
        d = np.stack([cols - centre[0], rows - centre[1]], axis=-1)
        na, nb = max(np.linalg.norm(a), 0.5), max(np.linalg.norm(b), 0.5)
        u = (d @ a) / na**2
        v = (d @ b) / nb**2
        region = u**2 + v**2 <= 1.0
    interior = region.copy()
    interior[1:, :] &= region[:-1, :]
    interior[:-1, :] &= region[1:, :]
    interior[:, 1:] &= region[:, :-1]
    interior[:, :-1] &= region[:, 1:]
    edge = region & ~interior
    thick = edge.copy()
    thick[1:, :] |= edge[:-1, :]
    thick[:-1, :] |= edge[1:, :]
    thick[:, 1:] |= edge[:, :-1]
    thick[:, :-1] |= edge[:, 1:]
    return thick & ~interior


def build_key_images(
    volume: Volume, nodules: Sequence[Nodule], producer: Producer, uids: UidSource
) -> list[pydicom.Dataset]:
    """One Secondary Capture image per nodule (empty list when there are no nodules)."""
    if not nodules:
        return []
    series_uid = uids("key-images-series")
    images: list[pydicom.Dataset] = []
    for nodule in nodules:
        ref = volume.datasets[nodule.key_slice]
        grey = _lung_window(volume.array[nodule.key_slice])
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        rgb[_outline(volume, nodule)] = hex_rgb(nodule.colour[1])
        iop = np.asarray(ref.ImageOrientationPatient, dtype=np.float64)
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=KEY_IMAGES_SERIES_NUMBER,
            sop_instance_uid=uids(f"key-image-{nodule.number}"),
            instance_number=nodule.number,
            manufacturer=producer.manufacturer,
            pixel_spacing=tuple(float(v) for v in ref.PixelSpacing),
            patient_orientation=(_orientation_label(iop[:3]), _orientation_label(iop[3:])),
            series_description=KEY_IMAGES_SERIES_DESCRIPTION,
            institution_name=producer.institution_name,
            institutional_department_name=producer.institutional_department_name,
        )
        image.BurnedInAnnotation = "NO"
        # Chest is unpaired: with Body Part Examined, General Series needs no Laterality.
        image.BodyPartExamined = str(ref.get("BodyPartExamined") or "CHEST")
        image.ImageComments = (
            f"{nodule.tracking_id}: key slice {nodule.key_slice + 1} of {volume.array.shape[0]},"
            f" lung window, outlined in {nodule.colour[1]}; automated research tool, not for"
            f" clinical use"
        )
        image.DerivationDescription = (
            f"Source slice windowed (L {LUNG_WINDOW_LEVEL_HU:g} / W {LUNG_WINDOW_WIDTH_HU:g} HU),"
            f" nodule outlined by {producer.algorithm_name} {producer.algorithm_version}"
        )
        images.append(image)
    logger.info("%d key images for series %s", len(images), volume.series_instance_uid)
    return images
