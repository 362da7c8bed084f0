"""What a reader of the SR and SEG gets (issue 10): each requirement asserted on the objects.

Text renderers (DCMTK dsr2html) show concept names and rounded values, the summary and the
disclaimer; highdicom reads the SCOORD3D centre and the finding sites with laterality; the
key-slice ellipse is one OHIF 3.x draws; the Image Library lists the referenced slices; one
numbering for SR tracking identifiers, SEG segments and key images; SEG colours from the one
palette; dciodvfy and dcmqi read both without errors or warnings.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.results import ResultSet, build_results
from dicom_node.results.sr import OHIF_ELLIPSE_PREFIX, tracking_label
from dicom_node.results.common import (
    CERTAINTY_OF_FINDING,
    COMMENT,
    DISCLAIMER,
    HIGH_SUSPICION_FROM,
    INTERMEDIATE_SUSPICION_FROM,
    LOWER_LOBE_OF_LUNG,
    MALIGNANCY,
    PROBABILITY_OF_CANCER,
    SEGMENT_PALETTE,
    SUM_OF_SEGMENTED_VOXELS,
    SUMMARY,
    SUSPICION_CODES,
    VOLUME,
    hex_rgb,
    order_findings,
    segment_colour,
    suspicion_level,
)
from model.finding import Finding

from .conftest import dciodvfy, errors, save, sphere_finding

LEFT, RIGHT = "7771000", "24028007"


def _oblique_finding(volume, center_mm, malignancy: float, score: float) -> Finding:
    """A cigar-shaped nodule lying diagonally in the axial plane (an oblique section)."""
    center = volume.lps_to_voxel(center_mm)
    sz, sy, sx = volume.spacing
    zz, yy, xx = np.mgrid[-3:4, -12:13, -12:13]
    frac = center - np.round(center)
    y, x = (yy - frac[1]) * sy, (xx - frac[2]) * sx
    u, v = (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)
    mask = (u / 7.0) ** 2 + (v / 2.5) ** 2 + ((zz - frac[0]) * sz / 3.0) ** 2 <= 1.0
    base = np.round(center).astype(int)
    return Finding(
        center_mm=tuple(float(c) for c in center_mm),
        center_voxel=tuple(float(c) for c in center),
        diameter_mm=26.8333415985107,
        volume_mm3=7108.01696777344,
        malignancy=malignancy,
        score=score,
        mask=mask,
        mask_offset=(int(base[0] - 3), int(base[1] - 12), int(base[2] - 12)),
    )


@pytest.fixture(scope="module")
def findings(synthetic_volume) -> list[Finding]:
    """In the model's order (by detection score), which is not the nodule order."""
    ball = sphere_finding(synthetic_volume, (4.0, 2.0, -10.0), 3.0, malignancy=0.2)
    return [
        dataclasses.replace(ball, score=0.97, malignancy=0.2),  # left (x > 0), low suspicion
        _oblique_finding(synthetic_volume, (-2.0, -1.0, 6.0), malignancy=0.99985151983124,
                         score=0.61),  # right, high suspicion
        dataclasses.replace(
            sphere_finding(synthetic_volume, (-6.0, -8.0, -20.0), 2.5, malignancy=0.5,
                           with_mask=False),
            score=0.8,
        ),  # right, intermediate, no mask
    ]


@pytest.fixture(scope="module")
def results(synthetic_volume, findings) -> ResultSet:
    return build_results(
        synthetic_volume,
        findings,
        algorithm_name="Res-MTNet",
        algorithm_version="0.1.0-test",
        want_key_images=True,
        uid_seed="sr-content",
    )


@pytest.fixture(scope="module")
def sr_path(tmp_path_factory, results) -> Path:
    return save(results.sr, tmp_path_factory.mktemp("sr") / "sr.dcm")


@pytest.fixture(scope="module")
def seg_path(tmp_path_factory, results) -> Path:
    return save(results.seg, tmp_path_factory.mktemp("seg") / "seg.dcm")


@pytest.fixture(scope="module")
def dsr2html_text(tmp_path_factory, sr_path) -> str:
    tool = shutil.which("dsr2html")
    if tool is None:
        pytest.skip("dsr2html (Debian package dcmtk) is not installed")
    out = tmp_path_factory.mktemp("html") / "sr.html"
    subprocess.run([tool, str(sr_path), str(out)], check=True, capture_output=True, timeout=60)
    text = html.unescape(re.sub(r"<[^>]+>", " ", out.read_text(encoding="latin-1")))
    return re.sub(r"\s+", " ", text)


def _items(items):
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _items(item.ContentSequence)


def _concept(item) -> str:
    return item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""


# -- text renderers ----------------------------------------------------------------------------


def test_dsr2html_shows_concept_names_and_rounded_values(dsr2html_text):
    text = dsr2html_text
    # The values the issue quotes, now named and rounded to what they can carry.
    assert re.search(r"Diameter: 26\.8 mm", text), text
    assert re.search(r"Volume: 7108 mm3", text)
    assert re.search(r"Probability of cancer: 1\.00 1", text)
    assert re.search(r"Certainty of Finding: 0\.61 1", text)
    assert re.search(r"Long axis: \d+\.\d mm", text)
    assert re.search(r"Malignancy: High", text)
    assert "Measurement Method = Sum of segmented voxel method for volume" in text
    assert "26.8333" not in text and "7108.01" not in text and "0.99985" not in text


def test_dsr2html_shows_summary_and_disclaimer(dsr2html_text, results):
    assert "Summary: 3 nodules found by an automated research tool; largest Nodule 1, 26.8 mm," \
        " right lung." in dsr2html_text
    assert f"Comment: {DISCLAIMER}" in dsr2html_text
    assert results.summary in dsr2html_text
    assert "Nodule 1: right lung, diameter 26.8 mm, volume 7108 mm3, high suspicion of" \
        " malignancy (probability of cancer 1.00), detection score 0.61." in results.summary


def test_every_container_is_separate_so_items_render_with_their_names(results):
    containers = [i for i in _items(results.sr.ContentSequence) if i.ValueType == "CONTAINER"]
    assert results.sr.ContinuityOfContent == "SEPARATE"
    assert containers and {c.ContinuityOfContent for c in containers} == {"SEPARATE"}


def test_summary_and_disclaimer_are_text_items_in_the_document(results):
    root = results.sr.ContentSequence
    evaluations = [i for i in root if _concept(i) == "C0034375"]
    assert len(evaluations) == 1
    texts = {_concept(i): i.TextValue for i in evaluations[0].ContentSequence}
    assert texts[SUMMARY.value] == results.summary
    assert texts[COMMENT.value] == DISCLAIMER


def test_negative_report_says_so_in_words(tmp_path, synthetic_volume):
    results = build_results(synthetic_volume, [], algorithm_name="A", algorithm_version="1")
    assert results.summary.startswith("No lung nodule found by an automated research tool.")
    texts = [i.TextValue for i in _items(results.sr.ContentSequence) if i.ValueType == "TEXT"]
    assert results.summary in texts and DISCLAIMER in texts
    assert errors(dciodvfy(save(results.sr, tmp_path / "negative.dcm"))) == []


# -- highdicom reads the geometry and the sites -------------------------------------------------


def test_highdicom_reads_scoord3d_centre_and_finding_sites(sr_path, synthetic_volume, findings,
                                                           results):
    sr = hd.sr.srread(sr_path)
    planar = sr.content.get_planar_roi_measurement_groups()
    points = [g for g in planar if isinstance(g.roi, hd.sr.ImageRegion3D)]
    labels = [tracking_label(g.tracking_identifier) for g in points]
    assert labels == ["Nodule 1", "Nodule 2", "Nodule 3"]
    for group in points:
        number = int(group.tracking_identifier.split()[-1])
        finding = findings[results.numbers.index(number)]
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        assert group.roi.frame_of_reference_uid == synthetic_volume.frame_of_reference_uid
        np.testing.assert_allclose(group.roi.value, [finding.center_mm], atol=1e-4)
        assert group.tracking_uid == results.tracking_uids[finding_index(results, number)]
    for group in planar + sr.content.get_volumetric_roi_measurement_groups():
        number = int(group.tracking_identifier.split()[-1])
        finding = findings[finding_index(results, number)]
        side = LEFT if finding.center_mm[0] > 0 else RIGHT
        assert [(s.value.value, s.laterality.value) for s in group.finding_sites] == [
            ("39607008", side)
        ]


def finding_index(results: ResultSet, number: int) -> int:
    return results.numbers.index(number)


def test_lobe_only_when_given(tmp_path, synthetic_volume, findings):
    results = build_results(
        synthetic_volume, findings, algorithm_name="A", algorithm_version="1",
        lobes=[None, "right lower lobe", None],
    )
    sr = hd.sr.srread(save(results.sr, tmp_path / "lobe.dcm"))
    sites = {
        tracking_label(g.tracking_identifier): [(s.value.value, s.laterality.value)
                                                for s in g.finding_sites]
        for g in sr.content.get_planar_roi_measurement_groups()
    }
    assert sites["Nodule 1"] == [(LOWER_LOBE_OF_LUNG.value, RIGHT)]  # findings[1], given
    assert sites["Nodule 2"] == [("39607008", RIGHT)]  # no lobe given: the lung, never a guess
    assert sites["Nodule 3"] == [("39607008", LEFT)]
    assert "right lower lobe" in results.summary
    assert errors(dciodvfy(tmp_path / "lobe.dcm")) == []
    with pytest.raises(ValueError, match="unknown lobe 'lingula'"):
        build_results(synthetic_volume, findings, algorithm_name="A", algorithm_version="1",
                      lobes=["lingula", None, None])


def test_measurements_method_score_suspicion_and_algorithm(sr_path, findings, results):
    sr = hd.sr.srread(sr_path)
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    assert [tracking_label(g.tracking_identifier) for g in volumetric] == ["Nodule 1", "Nodule 3"]
    for group in volumetric:
        number = int(group.tracking_identifier.split()[-1])
        finding = findings[finding_index(results, number)]
        values = {m.name.value: m for m in group.get_measurements()}
        assert values[VOLUME.value].method == SUM_OF_SEGMENTED_VOXELS
        assert values[VOLUME.value].value == round(finding.volume_mm3)
        assert values[PROBABILITY_OF_CANCER.value].value == round(finding.malignancy, 2)
        assert values[CERTAINTY_OF_FINDING.value].value == round(finding.score, 2)
        level = SUSPICION_CODES[suspicion_level(finding.malignancy)]
        evaluations = group.get_qualitative_evaluations(name=MALIGNANCY)
        assert [q.value.value for q in evaluations] == [level.value]
        items = group[0].ContentSequence
        texts = {_concept(i): i.TextValue for i in items if i.ValueType == "TEXT"}
        assert texts["111001"] == "Res-MTNet" and texts["111003"] == "0.1.0-test"  # TID 4019


def test_suspicion_cut_offs():
    assert (INTERMEDIATE_SUSPICION_FROM, HIGH_SUSPICION_FROM) == (0.4, 0.7)
    assert [suspicion_level(p) for p in (0.0, 0.399, 0.4, 0.699, 0.7, 1.0)] == [
        "low", "low", "intermediate", "intermediate", "high", "high"
    ]


# -- OHIF ------------------------------------------------------------------------------------


def test_key_slice_ellipse_is_one_ohif_draws(sr_path, synthetic_volume, findings, results):
    """OHIF 3.13.2 (extensions/cornerstone-dicom-sr/src/utils/getRenderableData.ts) draws an SR
    ELLIPSE only if its major or minor axis is parallel to the column direction (|cos| within
    1e-4 of 1); otherwise it logs "OBLIQUE ELLIPSE NOT YET SUPPORTED" and draws nothing."""
    sr = hd.sr.srread(sr_path)
    ellipses = [g for g in sr.content.get_planar_roi_measurement_groups()
                if isinstance(g.roi, hd.sr.ImageRegion)]
    labels = [tracking_label(g.tracking_identifier) for g in ellipses]
    assert labels == ["Nodule 1", "Nodule 2", "Nodule 3"]
    for group in ellipses:
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.ELLIPSE
        uid = group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        image = next(d for d in synthetic_volume.datasets if d.SOPInstanceUID == uid)
        iop = np.asarray(image.ImageOrientationPatient, dtype=float)
        row_cos, col_cos = iop[:3], iop[3:]
        dy, dx = (float(v) for v in image.PixelSpacing)
        world = [
            np.asarray(image.ImagePositionPatient, float) + row_cos * dx * (c - 0.5)
            + col_cos * dy * (r - 0.5)
            for c, r in group.roi.value
        ]
        major = (world[1] - world[0]) / np.linalg.norm(world[1] - world[0])
        minor = (world[3] - world[2]) / np.linalg.norm(world[3] - world[2])
        assert min(abs(abs(col_cos @ major) - 1), abs(abs(col_cos @ minor) - 1)) < 1e-4
        assert np.linalg.norm(world[1] - world[0]) >= np.linalg.norm(world[3] - world[2]) - 1e-3
    # The oblique nodule (Nodule 1): its ellipse covers the mask section's extent.
    nodule1 = findings[finding_index(results, 1)]
    points = ellipses[0].roi.value - 0.5
    (c0, r0), (c1, r1) = points.min(axis=0), points.max(axis=0)
    z = int(round(nodule1.center_voxel[0]))
    rows, cols = np.nonzero(nodule1.mask[z - nodule1.mask_offset[0]])
    rows, cols = rows + nodule1.mask_offset[1], cols + nodule1.mask_offset[2]
    assert c0 <= cols.min() and cols.max() <= c1 and r0 <= rows.min() and rows.max() <= r1


def test_first_region_of_each_tracking_uid_is_the_key_slice_scoord(results):
    """OHIF merges the groups of one tracking UID and draws the first SCOORD/SCOORD3D found."""
    imaging = next(i for i in results.sr.ContentSequence if _concept(i) == "126010")
    first: dict[str, str] = {}
    for group in imaging.ContentSequence:
        uid = next(i.UID for i in group.ContentSequence if _concept(i) == "112040")
        for item in group.ContentSequence:
            if item.ValueType in ("SCOORD", "SCOORD3D"):
                first.setdefault(uid, f"{item.ValueType} {item.GraphicType}")
    assert list(first.values()) == ["SCOORD ELLIPSE"] * 3


def test_groups_are_what_ohif_hydrates(results, findings):
    """OHIF 3.13.2 lists an SR measurement (cornerstone-dicom-sr isRehydratable and
    hydrateStructuredReport; @cornerstonejs/adapters 4.8 MeasurementReport.generateToolState):
    the adapter is chosen by the tracking identifier ("Cornerstone3DTools@^0.1.0:EllipticalROI"
    prefix); when a group has a NUM, the adapter reads the SCOORD (and its source image) under the
    group's first NUM and fails the group otherwise; the label is the group's Comment."""
    imaging = next(i for i in results.sr.ContentSequence if _concept(i) == "126010")
    hydrated = []
    for group in imaging.ContentSequence:
        items = list(group.ContentSequence)
        identifier = next(i.TextValue for i in items if _concept(i) == "112039")
        assert identifier.startswith(OHIF_ELLIPSE_PREFIX)
        first_num = next(i for i in items if i.ValueType == "NUM")  # every group has one
        scoords = [c for c in first_num.get("ContentSequence", []) if c.ValueType == "SCOORD"]
        if not scoords:
            continue  # the adapter skips the group (volumetric, SCOORD3D centre)
        (inferred,) = scoords
        region = next(i for i in items if i.ValueType == "SCOORD")
        assert inferred.RelationshipType == "INFERRED FROM"
        assert inferred.GraphicType == region.GraphicType == "ELLIPSE"
        assert list(inferred.GraphicData) == list(region.GraphicData)
        source = inferred.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        assert source == region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        (comment,) = [i.TextValue for i in items if _concept(i) == "121106"]
        finding = findings[finding_index(results, int(identifier.split()[-1]))]
        level = suspicion_level(finding.malignancy)
        assert comment == f"{tracking_label(identifier)}, {round(finding.diameter_mm, 1):.1f} mm," \
                          f" {level} suspicion"
        hydrated.append(comment.split(",")[0])
    assert hydrated == ["Nodule 1", "Nodule 2", "Nodule 3"]  # one measurement per nodule


def test_image_library_lists_the_referenced_slices(results, synthetic_volume):
    library = next(i for i in results.sr.ContentSequence if _concept(i) == "111028")
    group = next(i for i in library.ContentSequence if _concept(i) == "126200")
    listed = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in group.ContentSequence]
    imaging = next(i for i in results.sr.ContentSequence if _concept(i) == "126010")
    referenced = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for i in _items(imaging.ContentSequence)
        if i.ValueType in ("IMAGE", "SCOORD") and "ReferencedSOPSequence" in i
        and i.ReferencedSOPSequence[0].ReferencedSOPClassUID == pydicom.uid.CTImageStorage
    }
    referenced |= {
        i.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for i in _items(imaging.ContentSequence) if i.ValueType == "SCOORD"
    }
    assert sorted(listed) == sorted(referenced)
    order = [d.SOPInstanceUID for d in synthetic_volume.datasets]
    assert listed == sorted(listed, key=order.index)  # slice order, no duplicates


# -- one numbering, one palette ------------------------------------------------------------------


def test_one_numbering_everywhere(findings, results):
    # Rule: descending malignancy, then descending score, then given order.
    assert order_findings(findings) == [1, 2, 0]
    assert results.numbers == [3, 1, 2]
    sr = hd.sr.Comprehensive3DSR.from_dataset(results.sr)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert {g.tracking_identifier.rsplit(":", 1)[0] + ":" for g in groups} == {OHIF_ELLIPSE_PREFIX}
    by_uid = {g.tracking_uid: tracking_label(g.tracking_identifier) for g in groups}
    for segment in results.seg.SegmentSequence:
        assert segment.SegmentLabel == by_uid[segment.TrackingUID] == segment.TrackingID
    assert [s.SegmentLabel for s in results.seg.SegmentSequence] == ["Nodule 1", "Nodule 3"]
    for i, uid in enumerate(results.tracking_uids):
        assert by_uid[uid] == f"Nodule {results.numbers[i]}"
    for number, image in enumerate(results.key_images, start=1):
        assert image.InstanceNumber == number
        assert image.ImageComments.startswith(f"Nodule {number}: ")


def test_seg_colours_come_from_the_palette(seg_path, results):
    seg = hd.seg.segread(seg_path)
    for segment in seg.SegmentSequence:
        number = int(segment.SegmentLabel.split()[-1])
        lab, hex_colour = segment_colour(number)
        assert tuple(segment.RecommendedDisplayCIELabValue) == lab
        rgb = hd.color.CIELabColor.from_dicom_value(lab).to_rgb()
        assert np.allclose(rgb, hex_rgb(hex_colour), atol=1)
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("Res-MTNet", "0.1.0-test")
    # Key images outline each nodule in the same colour.
    for number, image in enumerate(results.key_images, start=1):
        colour = np.asarray(hex_rgb(segment_colour(number)[1]), dtype=np.uint8)
        assert np.all(image.pixel_array == colour, axis=-1).sum() > 4
    assert segment_colour(len(SEGMENT_PALETTE) + 1) == segment_colour(1)
    with pytest.raises(ValueError, match="nodule numbers start at 1, got 0"):
        segment_colour(0)


# -- validators ----------------------------------------------------------------------------------


def test_dciodvfy_no_errors(sr_path, seg_path):
    for path in (sr_path, seg_path):
        messages = dciodvfy(path)
        assert errors(messages) == [], messages


def _dcmqi_tool(name: str) -> str:
    tool = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(tool).exists():
        pytest.skip(f"{name} (PyPI package dcmqi) is not installed")
    return tool


def test_dcmqi_reads_the_seg_with_colours_and_without_warnings(tmp_path, seg_path):
    tool = _dcmqi_tool("segimage2itkimage")
    result = subprocess.run(
        [tool, "--inputDICOM", str(seg_path), "--outputDirectory", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    noisy = [line for line in output.splitlines()
             if re.match(r"\s*(W:|E:|WARNING|ERROR)", line) or "Failed" in line]
    assert noisy == [], output
    meta = json.loads((tmp_path / "meta.json").read_text())
    colours = {s["SegmentLabel"]: s["recommendedDisplayRGBValue"]
               for group in meta["segmentAttributes"] for s in group}
    for label, rgb in colours.items():
        assert np.allclose(rgb, hex_rgb(segment_colour(int(label.split()[-1]))[1]), atol=1)
