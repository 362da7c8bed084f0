"""Binary DICOM Segmentation of the nodules: one segment per nodule that has a mask.

The SEG is in the source study and frame of reference, in a new series; it references the
source series (ReferencedSeriesSequence) and, per frame, the source slice it was derived from
(DerivationImageSequence / SourceImageSequence, written by highdicom). Only frames that contain
a mask are written: the source slices given to highdicom are those the masks touch, and empty
(slice, segment) frames are omitted, so a 512x512x133 series with a few nodules yields a few
dozen frames.

Segments follow the nodule numbering (``common.order_findings``): segment label "Nodule <n>",
the nodule's tracking UID and identifier, algorithm identification (name, family "Artificial
Intelligence", version), and a RecommendedDisplayCIELabValue from ``common.segment_colour(n)``.
Segment numbers are 1..K over the nodules that have a mask, so they equal the nodule numbers
whenever every nodule has one; the label always carries the nodule number.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.valuerep import format_number_as_ds

from dicom_node.results.common import (
    ARTIFICIAL_INTELLIGENCE,
    LUNG,
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    NODULE,
    SEG_SERIES_DESCRIPTION,
    SEG_SERIES_NUMBER,
    Nodule,
    Producer,
    UidSource,
)
from dicom_node.volume import Volume

logger = logging.getLogger(__name__)


def build_seg(
    volume: Volume, nodules: Sequence[Nodule], producer: Producer, uids: UidSource
) -> pydicom.Dataset | None:
    """The SEG for the nodules with masks, or ``None`` when none has one."""
    segmented = [n for n in nodules if n.mask is not None and n.segment_number is not None]
    if not segmented:
        return None
    union = np.zeros(volume.array.shape[0], dtype=bool)
    for nodule in segmented:
        assert nodule.mask is not None
        union |= nodule.mask.reshape(nodule.mask.shape[0], -1).any(axis=1)
    slices = np.flatnonzero(union)
    frames = np.zeros((len(slices), *volume.array.shape[1:], len(segmented)), dtype=bool)
    for k, nodule in enumerate(segmented):
        assert nodule.mask is not None
        frames[..., k] = nodule.mask[slices]

    algorithm = hd.AlgorithmIdentificationSequence(
        name=producer.algorithm_name,
        family=ARTIFICIAL_INTELLIGENCE,
        version=producer.algorithm_version,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=nodule.segment_number,
            segment_label=nodule.tracking_id,
            segmented_property_category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            segmented_property_type=NODULE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=nodule.tracking_uid,
            tracking_id=nodule.tracking_id,
            anatomic_regions=[LUNG],
            display_color=hd.color.CIELabColor.from_dicom_value(nodule.colour[0]),
        )
        for nodule in segmented
    ]
    source = [volume.datasets[int(z)] for z in slices]
    seg = hd.seg.Segmentation(
        source_images=source,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids("seg-series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=uids("seg-instance"),
        instance_number=1,
        manufacturer=producer.manufacturer,
        manufacturer_model_name=producer.manufacturer_model_name,
        software_versions=f"{producer.algorithm_name} {producer.algorithm_version}",
        device_serial_number=producer.device_serial_number,
        content_label="NODULES",
        content_description="Lung nodules, automated research tool",
        series_description=SEG_SERIES_DESCRIPTION,
        omit_empty_frames=True,
        institution_name=producer.institution_name,
        institutional_department_name=producer.institutional_department_name,
    )
    # Content Creator Name is type 2 (empty: a device made it); without it DCMTK-based readers
    # (dcmqi) warn. Spacing Between Slices (mm, the source grid's) lets them place the sparse
    # frames without falling back on Slice Thickness, which they warn about.
    seg.ContentCreatorName = ""
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    if "SpacingBetweenSlices" not in measures:
        measures.SpacingBetweenSlices = format_number_as_ds(float(volume.spacing[0]))
    logger.info(
        "SEG %s: %d segments, %d frames, source series %s",
        seg.SOPInstanceUID,
        len(segmented),
        int(seg.NumberOfFrames),
        volume.series_instance_uid,
    )
    return seg
