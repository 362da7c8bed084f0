"""build_results on a small synthetic series: SR + SEG (+ key images) are valid and say what we meant.

Each object is written, checked with dciodvfy (no "Error" lines), read back with highdicom and
pydicom (strict mode), and its content compared with the findings it was built from.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.results import ResultSet, build_results
from dicom_node.results.common import (
    ABSENT,
    DIAMETER,
    INTERMEDIATE,
    LONG_AXIS,
    MALIGNANCY,
    NODULE,
    PRESENCE_OF_PROPERTY,
    PROBABILITY_OF_CANCER,
    SUSPICION_CODES,
    VOLUME,
    suspicion_level,
)
from dicom_node.results.common import hex_rgb, segment_colour
from dicom_node.results.sr import tracking_label
from model.finding import Finding

from .conftest import dciodvfy, errors, save, sphere_finding

PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


@pytest.fixture(scope="module")
def findings(synthetic_volume) -> list[Finding]:
    return [
        sphere_finding(synthetic_volume, (0.0, 0.0, -10.0), 5.0, malignancy=0.8),
        sphere_finding(synthetic_volume, (6.0, 8.0, 4.0), 3.0, malignancy=0.55),
        sphere_finding(
            synthetic_volume, (-6.0, -8.0, -20.0), 2.5, malignancy=0.2, with_mask=False
        ),
    ]


@pytest.fixture(scope="module")
def results(synthetic_volume, findings) -> ResultSet:
    return build_results(
        synthetic_volume,
        findings,
        algorithm_name="Res-MTNet",
        algorithm_version="0.1.0-test",
        want_key_images=True,
        institution_name="Test Hospital",
    )


def _codes(items) -> list[tuple[str, str]]:
    return [(item.name.value, item.value.value) for item in items]


def _ellipses(groups):
    """The key-slice groups (SCOORD ELLIPSE); the others hold the SCOORD3D centre point."""
    return [g for g in groups if isinstance(g.roi, hd.sr.ImageRegion)]


def test_objects_file_under_the_source_study(synthetic_volume, results):
    source = synthetic_volume.datasets[0]
    for ds in [results.sr, results.seg, *results.key_images]:
        for keyword in PATIENT_AND_STUDY:
            assert str(ds.get(keyword)) == str(source.get(keyword)), keyword
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert "research" in ds.SeriesDescription and "not clinical" in ds.SeriesDescription
        assert len(ds.SeriesDescription) <= 64
        assert ds.InstitutionName == "Test Hospital"
    assert (
        len(
            {
                results.sr.SeriesInstanceUID,
                results.seg.SeriesInstanceUID,
                results.key_images[0].SeriesInstanceUID,
            }
        )
        == 3
    )
    assert [ds.Modality for ds in results.datasets()][:2] == ["SEG", "SR"]


def test_every_object_passes_dciodvfy(tmp_path, results):
    for name, ds in [("sr", results.sr), ("seg", results.seg), ("key", results.key_images[0])]:
        messages = dciodvfy(save(ds, tmp_path / f"{name}.dcm"))
        assert errors(messages) == [], f"{name}: {messages}"


def test_seg_has_one_segment_per_masked_nodule(tmp_path, synthetic_volume, findings, results):
    seg = hd.seg.segread(save(results.seg, tmp_path / "seg.dcm"))
    sr_groups = hd.sr.srread(
        save(results.sr, tmp_path / "sr.dcm")
    ).content.get_volumetric_roi_measurement_groups()

    assert seg.SegmentationType == "BINARY"
    assert seg.number_of_segments == 2
    assert seg.FrameOfReferenceUID == synthetic_volume.frame_of_reference_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == synthetic_volume.series_instance_uid
    for number, group in zip((1, 2), sr_groups):
        description = seg.get_segment_description(number)
        assert description.segment_label == f"Nodule {number}"
        assert description.tracking_uid == group.tracking_uid
        assert description.segmented_property_category.value == "49755003"
        assert description.segmented_property_type == NODULE
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        assert [c.value for c in description.anatomic_regions] == ["39607008"]

    # Frames: only (slice, segment) pairs that hold mask voxels, each referencing its slice.
    masks = []
    for finding in findings[:2]:
        full = np.zeros(synthetic_volume.array.shape, dtype=bool)
        (z0, y0, x0), (d, h, w) = finding.mask_offset, finding.mask.shape
        full[z0 : z0 + d, y0 : y0 + h, x0 : x0 + w] = finding.mask
        masks.append(full)
    touched = [z for z in range(synthetic_volume.array.shape[0]) if any(m[z].any() for m in masks)]
    uids = [synthetic_volume.datasets[z].SOPInstanceUID for z in touched]
    assert int(seg.NumberOfFrames) == sum(int(m[z].any()) for m in masks for z in touched)
    assert sorted(uid for _, _, uid in seg.get_source_image_uids()) == sorted(uids)
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2])
    for k, mask in enumerate(masks):
        np.testing.assert_array_equal(pixels[..., k].astype(bool), mask[touched])


def test_sr_reports_each_nodule(tmp_path, synthetic_volume, findings, results):
    sr = hd.sr.srread(save(results.sr, tmp_path / "sr.dcm"))
    seg_uid = results.seg.SOPInstanceUID
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert seg_uid in evidence

    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    planar = _ellipses(sr.content.get_planar_roi_measurement_groups())
    assert [tracking_label(g.tracking_identifier) for g in volumetric] == ["Nodule 1", "Nodule 2"]
    assert [tracking_label(g.tracking_identifier) for g in planar] == ["Nodule 1", "Nodule 2", "Nodule 3"]
    assert [g.tracking_uid for g in volumetric] == [g.tracking_uid for g in planar[:2]]
    assert len({g.tracking_uid for g in planar}) == 3

    for number, (group, finding) in enumerate(zip(volumetric, findings[:2]), start=1):
        assert group.finding_type == NODULE
        assert [site.value.value for site in group.finding_sites] == ["39607008"]
        side = "7771000" if finding.center_mm[0] > 0 else "24028007"
        assert [site.laterality.value for site in group.finding_sites] == [side]
        segment = group.referenced_segment
        assert segment.referenced_sop_instance_uid == seg_uid
        assert segment.referenced_segment_numbers == [number]
        values = {m.name.value: (m.value, m.unit.value) for m in group.get_measurements()}
        assert values[DIAMETER.value] == (pytest.approx(finding.diameter_mm, abs=0.05), "mm")
        assert values[VOLUME.value] == (pytest.approx(finding.volume_mm3, abs=0.5), "mm3")
        assert values[PROBABILITY_OF_CANCER.value] == (pytest.approx(finding.malignancy), "1")
        level = SUSPICION_CODES[suspicion_level(finding.malignancy)]
        assert (MALIGNANCY.value, level.value) in _codes(group.get_qualitative_evaluations())

    # Key-slice groups: an ellipse on the slice through the centre, and the long axis.
    for group, finding in zip(planar, findings):
        key = int(round(finding.center_voxel[0]))
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.ELLIPSE
        reference = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == synthetic_volume.datasets[key].SOPInstanceUID
        points = region.value  # (column, row) image coordinates, pixel centre at +0.5
        centre = points.mean(axis=0) - 0.5
        np.testing.assert_allclose(
            centre, (finding.center_voxel[2], finding.center_voxel[1]), atol=1.0
        )
        long_axis = {m.name.value: m.value for m in group.get_measurements()}[LONG_AXIS.value]
        assert finding.diameter_mm - 1.5 <= long_axis <= finding.diameter_mm + 1.5
    # The nodule without mask carries everything in its planar group.
    third = {m.name.value: m.value for m in planar[2].get_measurements()}
    assert third[PROBABILITY_OF_CANCER.value] == pytest.approx(0.2)
    assert (MALIGNANCY.value, "62482003") in _codes(planar[2].get_qualitative_evaluations())
    assert INTERMEDIATE == SUSPICION_CODES[suspicion_level(findings[1].malignancy)]


def test_result_set_maps_findings_to_tracking_uids_and_segments(results):
    assert results.segment_numbers == [1, 2, None]
    segments = {int(x.SegmentNumber): x.TrackingUID for x in results.seg.SegmentSequence}
    assert results.tracking_uids[:2] == [segments[1], segments[2]]
    assert len(set(results.tracking_uids)) == 3


def test_negative_study_gets_an_sr_that_says_so_and_no_seg(tmp_path, synthetic_volume):
    results = build_results(
        synthetic_volume,
        [],
        algorithm_name="Res-MTNet",
        algorithm_version="0.1.0",
        want_key_images=True,
    )
    assert results.seg is None and results.key_images == []
    path = save(results.sr, tmp_path / "negative.dcm")
    assert errors(dciodvfy(path)) == []

    sr = hd.sr.srread(path)
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    assert sr.content.get_planar_roi_measurement_groups() == []
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    assert groups[0].finding_type == NODULE
    assert (PRESENCE_OF_PROPERTY.value, ABSENT.value) in _codes(
        groups[0].get_qualitative_evaluations()
    )
    assert sr.StudyInstanceUID == synthetic_volume.study_instance_uid


def test_findings_without_masks_give_no_seg(synthetic_volume, findings):
    results = build_results(
        synthetic_volume, [findings[2]], algorithm_name="A", algorithm_version="1"
    )
    assert results.seg is None
    sr = hd.sr.Comprehensive3DSR.from_dataset(results.sr)
    assert len(sr.content.get_planar_roi_measurement_groups()) == 2  # key slice, centre point
    assert sr.content.get_volumetric_roi_measurement_groups() == []


def test_mask_outside_the_volume_is_dropped(synthetic_volume, findings):
    outside = Finding(
        center_mm=(0.0, 0.0, 0.0),
        center_voxel=(1.0, 1.0, 1.0),
        diameter_mm=3.0,
        volume_mm3=14.0,
        malignancy=0.1,
        score=0.5,
        mask=np.ones((2, 2, 2), bool),
        mask_offset=(500, 0, 0),
    )
    results = build_results(
        synthetic_volume, [outside, findings[0]], algorithm_name="A", algorithm_version="1"
    )
    # The outside one (malignancy 0.1) is Nodule 2 and has no segment; Nodule 1 keeps its mask.
    assert results.numbers == [2, 1] and results.segment_numbers == [None, 1]
    assert results.seg.SegmentSequence[0].SegmentLabel == "Nodule 1"
    assert len(results.seg.SegmentSequence) == 1


def test_key_images_outline_each_nodule(tmp_path, synthetic_volume, findings, results):
    assert len(results.key_images) == 3
    for number, (image, finding) in enumerate(zip(results.key_images, findings), start=1):
        path = save(image, tmp_path / f"key{number}.dcm")
        assert errors(dciodvfy(path)) == []
        reread = pydicom.dcmread(path)
        assert reread.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert reread.PhotometricInterpretation == "RGB" and reread.InstanceNumber == number
        rgb = reread.pixel_array
        colour = hex_rgb(segment_colour(number)[1])
        red = np.all(rgb == np.asarray(colour, dtype=rgb.dtype), axis=-1)
        rows, cols = np.nonzero(red)
        assert red.sum() > 4
        np.testing.assert_allclose((rows.mean(), cols.mean()), finding.center_voxel[1:], atol=1.5)


@pytest.mark.parametrize("which", ["sr", "seg", "key"])
def test_pydicom_round_trip(tmp_path, results, which):
    ds = {"sr": results.sr, "seg": results.seg, "key": results.key_images[0]}[which]
    written = save(ds, tmp_path / f"{which}.dcm")
    reread = pydicom.dcmread(written)
    assert reread.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert reread.SOPInstanceUID == ds.SOPInstanceUID
    assert len(reread) == len(ds)
    # Reading loses nothing: writing what was read gives the same bytes.
    rewritten = save(reread, tmp_path / f"{which}-again.dcm")
    assert rewritten.read_bytes() == written.read_bytes()


def test_uid_seed_makes_reruns_identical(synthetic_volume, findings):
    def build(seed):
        return build_results(
            synthetic_volume, findings[:1], algorithm_name="A", algorithm_version="1", uid_seed=seed
        )

    first, again, other = build("job-42"), build("job-42"), build("job-43")
    assert first.sr.SOPInstanceUID == again.sr.SOPInstanceUID
    assert first.seg.SOPInstanceUID == again.seg.SOPInstanceUID
    assert first.seg.SegmentSequence[0].TrackingUID == again.seg.SegmentSequence[0].TrackingUID
    assert first.sr.SOPInstanceUID != other.sr.SOPInstanceUID
    assert build(None).sr.SOPInstanceUID != build(None).sr.SOPInstanceUID


def test_bad_arguments_are_named(synthetic_volume, findings):
    with pytest.raises(ValueError, match="algorithm_name must not be empty"):
        build_results(synthetic_volume, findings, algorithm_name="", algorithm_version="1")
    with pytest.raises(ValueError, match=r"malignancy_threshold must be in \[0, 1\], got 2"):
        build_results(
            synthetic_volume,
            findings,
            algorithm_name="A",
            algorithm_version="1",
            malignancy_threshold=2,
        )
    flat = Finding(
        center_mm=(0, 0, 0),
        center_voxel=(1, 1, 1),
        diameter_mm=1,
        volume_mm3=1,
        malignancy=0.1,
        score=0.1,
        mask=np.ones((2, 2), bool),
    )
    with pytest.raises(
        ValueError, match=r"Finding.mask must be 3-D \(d, h, w\), got shape \(2, 2\)"
    ):
        build_results(synthetic_volume, [flat], algorithm_name="A", algorithm_version="1")
