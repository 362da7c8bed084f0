"""Comprehensive 3D SR following TID 1500 (Measurement Report) for the nodules of one series.

Nodules are numbered by ``common.order_findings`` (descending malignancy probability, then
descending detection score); nodule <n> has the tracking identifier
"Cornerstone3DTools@^0.1.0:EllipticalROI:Nodule <n>" (the prefix is how OHIF 3.x picks the tool
that lists the measurement) and one tracking UID shared by its measurement groups and its SEG
segment (label and Tracking ID "Nodule <n>"). Per nodule, in this order:

* with a mask: a TID 1411 *volumetric* group: Referenced Segment (the SEG segment and its source
  slices); finding category, finding "Nodule", finding site "Lung" with laterality (or the lobe,
  only when the caller knows it); algorithm identification (TID 4019: name, version); Diameter
  (mm, 0.1 mm), Volume (mm3, 1 mm3, measurement method "Sum of segmented voxel method for
  volume"), Probability of cancer (two decimals), Certainty of Finding = the detection score (two
  decimals), and the qualitative evaluation Malignancy = Low | Intermediate | High suspicion
  (cut-offs in ``common``);
* always: a TID 1410 *planar* group on the key slice (through the nodule centre): Image Region =
  SCOORD ELLIPSE with its axes along the image rows and columns (the shape OHIF 3.x draws), and the
  section's Long axis (mm), which carries the ellipse again as INFERRED FROM (OHIF's adapter
  reads the SCOORD under the group's first NUM), and a Comment "Nodule <n>, <d> mm, <level>
  suspicion" (OHIF's label). Without a mask this group also carries the diameter, volume,
  probability, detection score and suspicion level;
* always: a TID 1410 planar group whose Image Region is a SCOORD3D POINT at the nodule centre in
  the source frame of reference (LPS mm), and the Diameter (mm). (OHIF's EllipticalROI adapter
  skips this group and the volumetric one: their first NUM has no SCOORD under it.)

TID 1410/1411 allow one region per group, hence several groups sharing the tracking identifiers;
OHIF merges them by tracking UID and draws the first region, the key-slice ellipse.

The report also has an Image Library (TID 1600) of the source slices it references (every slice
of the series for a report without nodules) and, in its "Qualitative Evaluations" container, a
plain-language "Summary" and the research-use disclaimer ("Comment"). Every container is
SEPARATE, so that text renderers (DCMTK ``dsr2html``) print each item with its concept name.

A series without nodules gets one TID 1501 group: finding "Nodule", finding site "Lung",
qualitative evaluation (121052, DCM, "Presence of property") = (121054, DCM, "Absent").

Patient and study attributes are copied from the source (highdicom); the SR is a new series.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.valuerep import DS

from dicom_node.results.common import (
    ABSENT,
    CERTAINTY_OF_FINDING,
    COMMENT,
    CT_CHEST,
    DIAMETER,
    DISCLAIMER,
    LEFT,
    LOBES,
    LONG_AXIS,
    LUNG,
    MALIGNANCY,
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    NODULE,
    PRESENCE_OF_PROPERTY,
    PROBABILITY_OF_CANCER,
    QUALITATIVE_EVALUATIONS,
    RIGHT,
    SR_SERIES_DESCRIPTION,
    SR_SERIES_NUMBER,
    SUM_OF_SEGMENTED_VOXELS,
    SUMMARY,
    SUSPICION_CODES,
    UCUM_MM,
    UCUM_MM3,
    UCUM_NO_UNITS,
    VOLUME,
    Nodule,
    Producer,
    UidSource,
    in_plane_ellipse,
    round_mm,
    round_mm3,
    round_probability,
    suspicion_level,
)
from dicom_node.volume import Volume

logger = logging.getLogger(__name__)


def _algorithm(producer: Producer) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=producer.algorithm_name, version=producer.algorithm_version
    )


def _measurement(name, value: float, unit, text: str, method=None) -> hd.sr.Measurement:
    """A TID 300 measurement whose Numeric Value is written as ``text`` (the rounded value)."""
    measurement = hd.sr.Measurement(name=name, value=value, unit=unit, method=method)
    item = measurement[0].MeasuredValueSequence[0]
    item.NumericValue = DS(text)
    if "FloatingPointValue" in item:
        item.FloatingPointValue = float(text)
    return measurement


def _finding_site(nodule: Nodule) -> hd.sr.FindingSite:
    """Lung (or the lobe, when known) with the nodule's laterality."""
    side = RIGHT if nodule.laterality == "right" else LEFT
    location = LUNG if nodule.lobe is None else LOBES[nodule.lobe][0]
    return hd.sr.FindingSite(anatomic_location=location, laterality=side)


def _characterisation(nodule: Nodule, with_volume_method: bool) -> tuple[list, list]:
    """Diameter, volume, probability of cancer, detection score, and the suspicion level."""
    finding = nodule.finding
    diameter = round_mm(finding.diameter_mm)
    volume = round_mm3(finding.volume_mm3)
    probability = round_probability(finding.malignancy)
    score = round_probability(finding.score)
    measurements = [
        _measurement(DIAMETER, diameter, UCUM_MM, f"{diameter:.1f}"),
        _measurement(
            VOLUME,
            volume,
            UCUM_MM3,
            f"{volume:d}",
            method=SUM_OF_SEGMENTED_VOXELS if with_volume_method else None,
        ),
        _measurement(PROBABILITY_OF_CANCER, probability, UCUM_NO_UNITS, f"{probability:.2f}"),
        _measurement(CERTAINTY_OF_FINDING, score, UCUM_NO_UNITS, f"{score:.2f}"),
    ]
    level = SUSPICION_CODES[suspicion_level(finding.malignancy)]
    evaluations = [hd.sr.QualitativeEvaluation(name=MALIGNANCY, value=level)]
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


#: The tracking identifier prefix by which OHIF 3.x (cornerstone3D adapters,
#: ``MeasurementReport.getAdapterForTrackingIdentifier``: exact match or ``startsWith``) picks the
#: adapter that hydrates a measurement group into its measurements panel; "Nodule <n>" follows it.
OHIF_ELLIPSE_PREFIX = "Cornerstone3DTools@^0.1.0:EllipticalROI:"


def tracking_identifier(nodule: Nodule) -> str:
    """The SR tracking identifier of ``nodule``: OHIF's prefix, then "Nodule <n>"."""
    return OHIF_ELLIPSE_PREFIX + nodule.tracking_id


def tracking_label(identifier: str) -> str:
    """"Nodule <n>" from an SR tracking identifier (the part after OHIF's prefix)."""
    return identifier.rsplit(":", 1)[-1]


def _tracking(nodule: Nodule) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=nodule.tracking_uid, identifier=tracking_identifier(nodule))


def ohif_label(nodule: Nodule) -> str:
    """The key-slice group's Comment, OHIF's label of the measurement: "Nodule <n>, <d> mm,
    <level> suspicion" (OHIF computes the row's area and maximum from the drawn ellipse)."""
    diameter = round_mm(nodule.finding.diameter_mm)
    level = suspicion_level(nodule.finding.malignancy)
    return f"{nodule.tracking_id}, {diameter:.1f} mm, {level} suspicion"


def _for_ohif(group, region: hd.sr.ImageRegion, nodule: Nodule) -> None:
    """What OHIF's EllipticalROI adapter needs to hydrate the key-slice group: the region again,
    INFERRED FROM, under the group's first NUM (the adapter looks for the SCOORD there, TID 300
    style, when the group has a NUM), and a Comment (``ohif_label``: its label in the panel)."""
    items = group[0].ContentSequence
    first_num = next(item for item in items if item.ValueType == "NUM")
    inferred = copy.deepcopy(region)
    inferred.RelationshipType = hd.sr.RelationshipTypeValues.INFERRED_FROM.value
    if "ContentSequence" not in first_num:
        first_num.ContentSequence = hd.sr.ContentSequence([])
    first_num.ContentSequence.append(inferred)
    items.append(
        hd.sr.TextContentItem(
            name=COMMENT,
            value=ohif_label(nodule),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )


def _nodule_groups(
    volume: Volume, nodule: Nodule, seg: pydicom.Dataset | None, producer: Producer
) -> list:
    has_segment = seg is not None and nodule.segment_number is not None
    measurements, evaluations = _characterisation(nodule, with_volume_method=has_segment)
    common = dict(
        finding_category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        finding_type=NODULE,
        finding_sites=[_finding_site(nodule)],
        algorithm_id=_algorithm(producer),
    )
    groups = []
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
    graphic, long_axis = in_plane_ellipse(volume, nodule)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.ELLIPSE,
        graphic_data=graphic,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=key.SOPClassUID,
            referenced_sop_instance_uid=key.SOPInstanceUID,
        ),
    )
    long_axis = round_mm(long_axis)
    planar_measurements = [_measurement(LONG_AXIS, long_axis, UCUM_MM, f"{long_axis:.1f}")]
    planar_evaluations = None
    if not has_segment:
        planar_measurements += measurements
        planar_evaluations = evaluations
    planar = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(nodule),
        referenced_region=region,
        measurements=planar_measurements,
        qualitative_evaluations=planar_evaluations,
        **common,
    )
    _for_ohif(planar, region, nodule)
    groups.append(planar)
    centre = hd.sr.ImageRegion3D(
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=np.asarray([nodule.finding.center_mm], dtype=np.float64),
        frame_of_reference_uid=volume.frame_of_reference_uid,
    )
    diameter = round_mm(nodule.finding.diameter_mm)
    groups.append(
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(nodule),
            referenced_region=centre,
            measurements=[_measurement(DIAMETER, diameter, UCUM_MM, f"{diameter:.1f}")],
            **common,
        )
    )
    return groups


def summary_text(nodules: Sequence[Nodule]) -> str:
    """The plain-language summary written into the SR (rounded as in the measurements)."""
    if not nodules:
        return (
            "No lung nodule found by an automated research tool. This does not exclude nodules;"
            " the images must be read by a radiologist."
        )
    largest = max(nodules, key=lambda n: (float(n.finding.diameter_mm), -n.number))
    count = f"{len(nodules)} nodule{'s' if len(nodules) != 1 else ''}"
    parts = [
        f"{count} found by an automated research tool; largest {largest.tracking_id},"
        f" {round_mm(largest.finding.diameter_mm):.1f} mm, {largest.site_text}."
    ]
    for nodule in nodules:
        f = nodule.finding
        parts.append(
            f"{nodule.tracking_id}: {nodule.site_text}, diameter {round_mm(f.diameter_mm):.1f} mm,"
            f" volume {round_mm3(f.volume_mm3):d} mm3, {suspicion_level(f.malignancy)} suspicion of"
            f" malignancy (probability of cancer {round_probability(f.malignancy):.2f}),"
            f" detection score {round_probability(f.score):.2f}."
        )
    parts.append("Nodules are numbered by decreasing probability of cancer, then detection score.")
    return " ".join(parts)


def _document_text(nodules: Sequence[Nodule]) -> hd.sr.ContainerContentItem:
    """TID 1500 "Qualitative Evaluations": the summary and the research-use disclaimer."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=SUMMARY,
                value=summary_text(nodules),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
            hd.sr.TextContentItem(
                name=COMMENT,
                value=DISCLAIMER,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
        ]
    )
    return container


def _library_images(volume: Volume, nodules: Sequence[Nodule]) -> list[pydicom.Dataset]:
    """Source slices the SR references (key slices, segment sources), in slice order; all
    slices when there is no nodule."""
    if not nodules:
        return list(volume.datasets)
    slices = {n.key_slice for n in nodules}
    for nodule in nodules:
        if nodule.mask is not None:
            slices.update(int(z) for z in np.flatnonzero(nodule.mask.any(axis=(1, 2))))
    return [volume.datasets[z] for z in sorted(slices)]


def _separate(items) -> None:
    """Set every CONTAINER below ``items`` to ContinuityOfContent SEPARATE."""
    for item in items:
        if item.get("ValueType") == "CONTAINER":
            item.ContinuityOfContent = "SEPARATE"
        if "ContentSequence" in item:
            _separate(item.ContentSequence)


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
        referenced_images=_library_images(volume, nodules),
    )
    report[0].ContentSequence.append(_document_text(nodules))
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
    sr.ContinuityOfContent = "SEPARATE"
    _separate(sr.ContentSequence)
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
