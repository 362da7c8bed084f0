"""Comprehensive 3D SR following TID 1500 (Measurement Report) for the nodules of one series.

Content tree, per nodule ``Nodule <n>`` (one tracking identifier and one tracking UID, the same
as the SEG segment's):

* with a mask: a TID 1411 *volumetric* measurement group: Referenced Segment (the SEG segment
  and its source slices), finding category / finding / finding site, algorithm identification,
  Diameter (mm), Volume (mm3), Probability of cancer (UCUM "1") and the qualitative evaluation
  Malignancy = Malignant | Benign (probability >= the producer's threshold);
* always: a TID 1410 *planar* measurement group on the key slice (the slice through the nodule
  centre): Image Region = SCOORD ELLIPSE outlining the nodule section, and its Long axis (mm).
  TID 1410/1411 allow one kind of region reference per group (image region, or segment), hence
  two groups sharing the tracking identifiers. Without a mask, the planar group also carries the
  diameter, volume and malignancy items.

A series without nodules gets one TID 1501 group: finding "Nodule", finding site "Lung",
qualitative evaluation (121052, DCM, "Presence of property") = (121054, DCM, "Absent").

Patient and study attributes are copied from the source (highdicom); the SR is a new series.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from dicom_node.results.common import (
    ABSENT,
    BENIGN,
    CT_CHEST,
    DIAMETER,
    LONG_AXIS,
    LUNG,
    MALIGNANCY,
    MALIGNANT,
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    NODULE,
    PRESENCE_OF_PROPERTY,
    PROBABILITY_OF_CANCER,
    SR_SERIES_DESCRIPTION,
    SR_SERIES_NUMBER,
    UCUM_MM,
    UCUM_MM3,
    UCUM_NO_UNITS,
    VOLUME,
    Nodule,
    Producer,
    UidSource,
    in_plane_ellipse,
)
from dicom_node.volume import Volume

logger = logging.getLogger(__name__)


def _algorithm(producer: Producer) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=producer.algorithm_name, version=producer.algorithm_version
    )


def _characterisation(nodule: Nodule, producer: Producer) -> tuple[list, list]:
    """Diameter, volume, probability of cancer, and the malignancy evaluation."""
    finding = nodule.finding
    probability = float(np.clip(finding.malignancy, 0.0, 1.0))
    measurements = [
        hd.sr.Measurement(name=DIAMETER, value=float(finding.diameter_mm), unit=UCUM_MM),
        hd.sr.Measurement(name=VOLUME, value=float(finding.volume_mm3), unit=UCUM_MM3),
        hd.sr.Measurement(name=PROBABILITY_OF_CANCER, value=probability, unit=UCUM_NO_UNITS),
    ]
    verdict = MALIGNANT if probability >= producer.malignancy_threshold else BENIGN
    evaluations = [hd.sr.QualitativeEvaluation(name=MALIGNANCY, value=verdict)]
    return measurements, evaluations


def _referenced_segment(seg: pydicom.Dataset, segment_number: int) -> hd.sr.ReferencedSegment:
    """Segment reference with the source slices of that segment's frames.

    (``hd.sr.ReferencedSegment.from_segmentation`` expects the Segment Identification in every
    per-frame item, which highdicom itself moves to the shared items for a one-segment SEG.)
    """
    shared = seg.SharedFunctionalGroupsSequence[0]
    sources: dict[str, str] = {}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        identification = frame.get("SegmentIdentificationSequence") or shared.get(
            "SegmentIdentificationSequence"
        )
        if int(identification[0].ReferencedSegmentNumber) != segment_number:
            continue
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                sources.setdefault(
                    str(source.ReferencedSOPInstanceUID), str(source.ReferencedSOPClassUID)
                )
    if not sources:
        raise ValueError(f"SEG {seg.SOPInstanceUID} has no frame of segment {segment_number}")
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=segment_number,
        source_images=[
            hd.sr.SourceImageForSegmentation(
                referenced_sop_class_uid=cls, referenced_sop_instance_uid=uid
            )
            for uid, cls in sources.items()
        ],
    )


def _tracking(nodule: Nodule) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=nodule.tracking_uid, identifier=nodule.tracking_id)


def _nodule_groups(
    volume: Volume, nodule: Nodule, seg: pydicom.Dataset | None, producer: Producer
) -> list:
    measurements, evaluations = _characterisation(nodule, producer)
    common = dict(
        finding_category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        finding_type=NODULE,
        finding_sites=[hd.sr.FindingSite(anatomic_location=LUNG)],
        algorithm_id=_algorithm(producer),
    )
    groups = []
    has_segment = seg is not None and nodule.segment_number is not None
    if has_segment:
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(nodule),
                referenced_segment=_referenced_segment(seg, nodule.segment_number),
                measurements=measurements,
                qualitative_evaluations=evaluations,
                **common,
            )
        )
    key = volume.datasets[nodule.key_slice]
    graphic, long_axis_mm = in_plane_ellipse(volume, nodule)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.ELLIPSE,
        graphic_data=graphic,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=key.SOPClassUID,
            referenced_sop_instance_uid=key.SOPInstanceUID,
        ),
    )
    planar_measurements = [hd.sr.Measurement(name=LONG_AXIS, value=long_axis_mm, unit=UCUM_MM)]
    planar_evaluations = None
    if not has_segment:
        planar_measurements += measurements
        planar_evaluations = evaluations
    groups.append(
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(nodule),
            referenced_region=region,
            measurements=planar_measurements,
            qualitative_evaluations=planar_evaluations,
            **common,
        )
    )
    return groups


def _negative_group(volume: Volume, producer: Producer, uids: UidSource):
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids("tracking-negative"), identifier="Lung nodules"
        ),
        finding_category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        finding_type=NODULE,
        finding_sites=[hd.sr.FindingSite(anatomic_location=LUNG)],
        algorithm_id=_algorithm(producer),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=PRESENCE_OF_PROPERTY, value=ABSENT)
        ],
    )


def build_sr(
    volume: Volume,
    nodules: Sequence[Nodule],
    seg: pydicom.Dataset | None,
    producer: Producer,
    uids: UidSource,
) -> pydicom.Dataset:
    """The TID 1500 Comprehensive 3D SR for ``nodules`` (a negative report when empty)."""
    if nodules:
        groups = [g for nodule in nodules for g in _nodule_groups(volume, nodule, seg, producer)]
    else:
        groups = [_negative_group(volume, producer, uids)]
    device_uid = uids("device-observer")
    observer = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid,
                name=producer.algorithm_name,
                manufacturer_name=producer.manufacturer,
                model_name=producer.manufacturer_model_name,
                serial_number=producer.device_serial_number,
            ),
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=CT_CHEST,
        imaging_measurements=groups,
    )
    evidence = list(volume.datasets) + ([seg] if seg is not None else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=uids("sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids("sr-instance"),
        instance_number=1,
        manufacturer=producer.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=producer.institution_name,
        institutional_department_name=producer.institutional_department_name,
        series_description=SR_SERIES_DESCRIPTION,
    )
    sr.ManufacturerModelName = producer.manufacturer_model_name
    sr.SoftwareVersions = f"{producer.algorithm_name} {producer.algorithm_version}"
    sr.DeviceSerialNumber = producer.device_serial_number
    logger.info(
        "SR %s: %d measurement groups for %d nodules, source series %s",
        sr.SOPInstanceUID,
        len(groups),
        len(nodules),
        volume.series_instance_uid,
    )
    return sr
