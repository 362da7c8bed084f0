"""build_results on the real LIDC-IDRI-0001 series (512x512x133), skipped when the data is absent.

A hand-made finding (a 12 mm-radius ball) sits on the reference nodule at (56.2, 86.2, -115.9) mm;
a second one without mask sits elsewhere. The SEG must stay small (only frames with mask) and
quick to build, and every object must pass dciodvfy and read back with highdicom.
"""

from __future__ import annotations

import time

import highdicom as hd
import numpy as np
import pytest

from dicom_node.results import build_results
from dicom_node.results.common import DIAMETER, HIGH, MALIGNANCY, PROBABILITY_OF_CANCER

from .conftest import LIDC_NODULE_MM, dciodvfy, errors, save, sphere_finding


@pytest.fixture(scope="module")
def lidc_results(lidc_volume):
    findings = [
        sphere_finding(lidc_volume, LIDC_NODULE_MM, 12.0, malignancy=0.93),
        sphere_finding(lidc_volume, (-60.0, 40.0, -150.0), 4.0, malignancy=0.1, with_mask=False),
    ]
    started = time.perf_counter()
    results = build_results(
        lidc_volume,
        findings,
        algorithm_name="Res-MTNet",
        algorithm_version="0.1.0-test",
        want_key_images=True,
    )
    return findings, results, time.perf_counter() - started


def test_lidc_results_are_valid_and_quick(tmp_path, lidc_results):
    _, results, seconds = lidc_results
    assert seconds < 10.0, f"building SR+SEG+key images took {seconds:.1f} s"
    for name, ds in [
        ("sr", results.sr),
        ("seg", results.seg),
        *[(f"key{i}", k) for i, k in enumerate(results.key_images)],
    ]:
        messages = dciodvfy(save(ds, tmp_path / f"{name}.dcm"))
        assert errors(messages) == [], f"{name}: {messages}"


def test_lidc_seg_references_the_source_slices(tmp_path, lidc_volume, lidc_results):
    findings, results, _ = lidc_results
    seg = hd.seg.segread(save(results.seg, tmp_path / "seg.dcm"))
    z0, d = findings[0].mask_offset[0], findings[0].mask.shape[0]
    slices = [z for z in range(z0, z0 + d) if findings[0].mask[z - z0].any()]

    assert seg.number_of_segments == 1
    # 12 mm radius around z index 89.64 with 2.5 mm slices: indices 85..94.
    assert int(seg.NumberOfFrames) == len(slices) == 10
    assert seg.FrameOfReferenceUID == lidc_volume.frame_of_reference_uid
    assert seg.StudyInstanceUID == lidc_volume.study_instance_uid
    assert seg.PatientID == "LIDC-IDRI-0001"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == lidc_volume.series_instance_uid
    expected = sorted(lidc_volume.datasets[z].SOPInstanceUID for z in slices)
    assert sorted(uid for _, _, uid in seg.get_source_image_uids()) == expected
    pixels = seg.get_pixels_by_source_instance(
        [lidc_volume.datasets[z].SOPInstanceUID for z in slices]
    )
    centre = np.round(lidc_volume.lps_to_voxel(LIDC_NODULE_MM)).astype(int)
    assert pixels[slices.index(centre[0]), centre[1], centre[2], 0] == 1


def test_lidc_sr_content(tmp_path, lidc_volume, lidc_results):
    findings, results, _ = lidc_results
    sr = hd.sr.srread(save(results.sr, tmp_path / "sr.dcm"))
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    planar = [
        g for g in sr.content.get_planar_roi_measurement_groups()
        if isinstance(g.roi, hd.sr.ImageRegion)
    ]
    centres = [
        g for g in sr.content.get_planar_roi_measurement_groups()
        if isinstance(g.roi, hd.sr.ImageRegion3D)
    ]

    assert len(volumetric) == 1 and len(planar) == 2 and len(centres) == 2
    np.testing.assert_allclose(centres[0].roi.value, [LIDC_NODULE_MM], atol=1e-3)
    # x = +56.2 mm is the patient's left.
    assert [s.laterality.value for s in volumetric[0].finding_sites] == ["7771000"]
    group = volumetric[0]
    assert (
        group.tracking_uid == results.seg.SegmentSequence[0].TrackingUID == planar[0].tracking_uid
    )
    assert group.referenced_segment.referenced_sop_instance_uid == results.seg.SOPInstanceUID
    values = {m.name.value: m.value for m in group.get_measurements()}
    assert values[DIAMETER.value] == pytest.approx(24.0)
    assert values[PROBABILITY_OF_CANCER.value] == pytest.approx(0.93)
    evaluations = [(q.name.value, q.value.value) for q in group.get_qualitative_evaluations()]
    assert (MALIGNANCY.value, HIGH.value) in evaluations
    # Key slice: the slice through the centre (z index 90, z = -115.0 mm).
    key = planar[0].roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert key == lidc_volume.datasets[90].SOPInstanceUID
    assert float(lidc_volume.datasets[90].ImagePositionPatient[2]) == pytest.approx(-115.0)
    assert (
        sr.PatientID == "LIDC-IDRI-0001" and sr.StudyInstanceUID == lidc_volume.study_instance_uid
    )
