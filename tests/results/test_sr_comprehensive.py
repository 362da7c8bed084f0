"""The Comprehensive SR fallback and the Predecessor Documents Sequence: valid per dciodvfy,
readable by highdicom, no SCOORD3D, the SEG reference kept, a stable UID."""
from __future__ import annotations

import copy
import subprocess

import highdicom as hd
import pytest
from pydicom import dcmread

from dicom_node.results import build_results
from dicom_node.results.sr_comprehensive import COMPREHENSIVE_SR, add_predecessor, comprehensive_sr
from dicom_node.volume import load_series
from tests.peers import need
from tests.test_delivery import lidc_files, one_nodule


def _types(items):
    for it in items:
        yield it.ValueType
        yield from _types(it.get("ContentSequence", []))


def _errors(path) -> list[str]:
    r = subprocess.run([need("dciodvfy"), "-new", str(path)], capture_output=True, text=True)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def sr3d():
    v = load_series(lidc_files())
    return build_results(v, one_nodule(v.array, v.spacing, v.origin, v.direction), algorithm_name="test",
                         algorithm_version="1", uid_seed="sr-comprehensive-test").sr


def test_comprehensive_sr_has_no_scoord3d_and_is_valid(sr3d, tmp_path):
    assert "SCOORD3D" in set(_types(sr3d.ContentSequence))
    sr = comprehensive_sr(sr3d)
    types = set(_types(sr.ContentSequence))
    assert "SCOORD3D" not in types and {"SCOORD", "IMAGE", "NUM"} <= types
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.SOPInstanceUID != sr3d.SOPInstanceUID
    assert comprehensive_sr(sr3d).SOPInstanceUID == sr.SOPInstanceUID  # the same object on every send
    assert "SCOORD3D" in set(_types(sr3d.ContentSequence))  # the source is unchanged
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert _errors(tmp_path / "sr.dcm") == []
    assert isinstance(hd.sr.srread(tmp_path / "sr.dcm"), hd.sr.ComprehensiveSR)


def test_comprehensive_sr_refuses_another_sop_class(sr3d):
    sr = comprehensive_sr(sr3d)
    with pytest.raises(ValueError, match="is not Comprehensive 3D SR"):
        comprehensive_sr(sr)


def test_predecessor_documents_sequence_is_valid(sr3d, tmp_path):
    sr3d = copy.deepcopy(sr3d)
    add_predecessor(sr3d, str(sr3d.StudyInstanceUID), "1.2.826.0.1.3680043.9.1", str(sr3d.SOPClassUID),
                    "1.2.826.0.1.3680043.9.1.1")
    sr3d.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert _errors(tmp_path / "sr.dcm") == []
    ref = dcmread(tmp_path / "sr.dcm").PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.826.0.1.3680043.9.1.1"
