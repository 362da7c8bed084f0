"""End to end with a real PACS: Orthanc pushes LIDC-IDRI-0001 to the node; the node's SR and SEG
come back into the same study and patient in Orthanc, valid per dciodvfy, and the SR puts the
reference nodule (56.2, 86.2, -115.9) mm within its radius with malignancy above 0.5."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from storage.models import FindingRow, ResultObject, Study, StudyStatus
from tests.peers import LIDC_NODULE_MM, NodeProcess, Orthanc, free_port, need, need_lidc, wait_for

pytestmark = pytest.mark.slow


def dciodvfy_errors(path) -> list[str]:
    r = subprocess.run([need("dciodvfy"), "-new", str(path)], capture_output=True, text=True)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


def test_orthanc_push_gets_sr_and_seg_back_in_the_same_study(tmp_path):
    series = need_lidc()
    pacs_dicom_port = free_port()
    node = NodeProcess(tmp_path / "node", sources=("ORTHANC",),
                       destinations=[{"name": "orthanc", "ae_title": "ORTHANC", "port": pacs_dicom_port}])
    pacs = Orthanc(tmp_path / "orthanc", node_ae="DICOM_NODE", node_port=node.port, dicom_port=pacs_dicom_port)
    pacs.start()
    try:
        node.start(timeout=120)
        study_id = pacs.upload(series)
        job = pacs.rest("POST", "/modalities/node/store", {"Resources": [study_id], "Synchronous": True})
        assert job.get("Description", "") is not None
        source = pacs.rest("GET", f"/studies/{study_id}")

        def results_in_pacs():
            mods = [pacs.rest("GET", f"/series/{sid}")["MainDicomTags"].get("Modality") for sid in
                    pacs.rest("GET", f"/studies/{study_id}")["Series"]]
            return sorted(mods) if {"SR", "SEG"} <= set(mods) else None

        modalities = wait_for(results_in_pacs, timeout=600, interval=1.0, what="SR and SEG in Orthanc")
        assert modalities == ["CT", "SEG", "SR"]
        study = pacs.rest("GET", f"/studies/{study_id}")
        assert study["ParentPatient"] == source["ParentPatient"]  # same patient, same study
        sessions = node.sessions()
        with sessions() as s:
            assert s.scalar(select(Study)).status is StudyStatus.DONE
            findings = s.scalars(select(FindingRow)).all()
            objects = s.scalars(select(ResultObject)).all()
        for obj in objects:
            assert dciodvfy_errors(node.data_dir / obj.path) == [], obj.kind
        ref = np.array(LIDC_NODULE_MM)
        hits = [f for f in findings
                if np.linalg.norm(np.array([f.center_x_mm, f.center_y_mm, f.center_z_mm]) - ref) <= max(f.diameter_mm, 20) / 2]
        assert hits, f"reference nodule not found among {[(f.center_x_mm, f.center_y_mm, f.center_z_mm) for f in findings]}"
        assert max(h.malignancy for h in hits) > 0.5
        # The SEG in Orthanc carries a mask for the nodule on the slices around its centre.
        seg_series = [sid for sid in study["Series"] if pacs.rest("GET", f"/series/{sid}")["MainDicomTags"]["Modality"] == "SEG"][0]
        seg_instance = pacs.rest("GET", f"/series/{seg_series}")["Instances"][0]
        seg = dcmread(__import__("io").BytesIO(pacs.rest("GET", f"/instances/{seg_instance}/file")))
        assert seg.FrameOfReferenceUID == dcmread(next(series.iterdir()), stop_before_pixels=True).FrameOfReferenceUID
        assert seg.pixel_array.any()
    finally:
        node.stop()
        pacs.stop()
