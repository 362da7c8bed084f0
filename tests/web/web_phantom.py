"""Test data for the web tests: a synthetic chest CT series, its SEG, and database rows.

``write_phantom_series`` makes a small axial CT series (CT Image Storage, 96x96, 3 mm pixels,
2.5 mm slices) of an elliptical body with two lungs (-850 HU) and one solid nodule (+40 HU) of
known centre and diameter in the right lung (patient right = image left, LPS -x). The series is
written with pydicom exactly like a scanner's files, then stored and indexed through the
node's own file store and ``storage.repo.index_instance``, as the listener would.

``add_done_job`` inserts what the worker leaves behind (a finished job, findings, result
objects, summary columns on the study), so the API and pages can be tested without the model.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from storage import repo
from storage.models import FindingRow, Job, JobState, ResultObject, Series, Study, StudyStatus, utcnow

ROWS = COLS = 96
PIXEL_MM = 3.0
SLICE_MM = 2.5
N_SLICES = 30
ORIGIN = (-142.5, -142.5, -100.0)  # LPS of voxel (0, 0, 0)
NODULE_MM = (-60.0, -10.0, -62.5)  # right lung, LPS
NODULE_DIAMETER_MM = 14.0


@dataclass
class PhantomStudy:
    study_uid: str
    series_uid: str
    relpaths: list[str]
    datasets: list[Dataset]
    hu: np.ndarray  # (Z, Y, X)


def _volume() -> np.ndarray:
    z, y, x = np.mgrid[0:N_SLICES, 0:ROWS, 0:COLS].astype(np.float32)
    lx = ORIGIN[0] + x * PIXEL_MM
    ly = ORIGIN[1] + y * PIXEL_MM
    lz = ORIGIN[2] + z * SLICE_MM
    hu = np.full(z.shape, -1000.0, dtype=np.float32)
    body = (lx / 130) ** 2 + (ly / 95) ** 2 <= 1
    hu[body] = 40.0
    for cx in (-55.0, 55.0):
        lung = ((lx - cx) / 42) ** 2 + ((ly + 5) / 62) ** 2 <= 1
        hu[lung] = -850.0
    spine = (lx ** 2 + (ly - 70) ** 2) <= 14 ** 2
    hu[spine] = 700.0
    r = np.sqrt((lx - NODULE_MM[0]) ** 2 + (ly - NODULE_MM[1]) ** 2 + (lz - NODULE_MM[2]) ** 2)
    hu[r <= NODULE_DIAMETER_MM / 2] = 40.0
    rng = np.random.default_rng(7)
    hu += rng.normal(0, 12, hu.shape).astype(np.float32)
    return hu


def _slice_dataset(study_uid: str, series_uid: str, frame_uid: str, k: int, pixels: np.ndarray,
                   patient: tuple[str, str], accession: str, study_date: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.PatientName, ds.PatientID = patient
    ds.PatientBirthDate, ds.PatientSex = "19500101", "O"
    ds.AccessionNumber = accession
    ds.StudyDate, ds.StudyTime, ds.StudyID = study_date, "101500", "1"
    ds.StudyDescription = "CT CHEST (synthetic phantom)"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 2, k + 1
    ds.SeriesDescription = "Phantom 2.5 mm"
    ds.Manufacturer = "dicom-node tests"
    ds.ReferringPhysicianName = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], ORIGIN[2] + k * SLICE_MM]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
    ds.SliceThickness = SLICE_MM
    ds.SliceLocation = ORIGIN[2] + k * SLICE_MM
    ds.PositionReferenceIndicator = ""
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.KVP, ds.ConvolutionKernel = 120, "STANDARD"
    ds.PixelData = (np.round(pixels) + 1024).astype(np.int16).tobytes()
    return ds


def store_phantom(node, *, patient=("PHANTOM^ONE", "PH0001"), accession="ACC0001", study_date="20260105",
                  calling_ae="STORESCU") -> PhantomStudy:
    """Write the phantom series into the node's store and index it (as the listener does)."""
    hu = _volume()
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    relpaths, datasets = [], []
    for k in range(N_SLICES):
        ds = _slice_dataset(study_uid, series_uid, frame_uid, k, hu[k], patient, accession, study_date)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        rel = node.store.instance_relpath(study_uid, series_uid, ds.SOPInstanceUID)
        size, digest = node.store.write_atomic(rel, buf.getvalue())
        meta = repo.InstanceMeta(
            study_instance_uid=study_uid, series_instance_uid=series_uid, sop_instance_uid=ds.SOPInstanceUID,
            sop_class_uid=CTImageStorage, transfer_syntax_uid=ExplicitVRLittleEndian, modality="CT",
            instance_number=k + 1, series_number=2, series_description=ds.SeriesDescription,
            patient_name=str(ds.PatientName), patient_id=ds.PatientID, accession_number=accession,
            study_date=study_date, study_description=ds.StudyDescription)
        with node.sessions.begin() as s:
            repo.index_instance(s, meta, rel, size, digest, calling_ae, None)
        relpaths.append(rel)
        datasets.append(ds)
    return PhantomStudy(study_uid, series_uid, relpaths, datasets, hu)


def nodule_mask(hu: np.ndarray, origin, spacing_zyx, centre_mm, diameter_mm) -> np.ndarray:
    """Voxels within the nodule's sphere (+2 mm) that are denser than -400 HU: a threshold SEG."""
    z, y, x = np.mgrid[0:hu.shape[0], 0:hu.shape[1], 0:hu.shape[2]].astype(np.float32)
    lx = origin[0] + x * spacing_zyx[2]
    ly = origin[1] + y * spacing_zyx[1]
    lz = origin[2] + z * spacing_zyx[0]
    r = np.sqrt((lx - centre_mm[0]) ** 2 + (ly - centre_mm[1]) ** 2 + (lz - centre_mm[2]) ** 2)
    return (r <= diameter_mm / 2 + 2) & (hu > -400)


def write_seg(node, job_id: int, datasets: list[Dataset], mask: np.ndarray) -> tuple[str, str, str]:
    """A binary DICOM SEG (highdicom) with one segment; returns (relpath, SOP UID, series UID)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Nodule 1",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="test-threshold", version="1", family=codes.DCM.ArtificialIntelligence))
    keep = [k for k in range(mask.shape[0]) if mask[k].any()]
    seg = hd.seg.Segmentation(
        source_images=[datasets[k] for k in keep], pixel_array=mask[keep].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[desc],
        series_instance_uid=generate_uid(), series_number=900, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="dicom-node tests", manufacturer_model_name="threshold", software_versions="1",
        device_serial_number="0", series_description="Research nodule segmentation (automated, non-clinical)")
    buf = io.BytesIO()
    seg.save_as(buf)
    rel = node.store.result_relpath(job_id, "seg", seg.SOPInstanceUID)
    node.store.write_atomic(rel, buf.getvalue())
    return rel, str(seg.SOPInstanceUID), str(seg.SeriesInstanceUID)


def write_dummy_sr(node, job_id: int, study_uid: str) -> tuple[str, str, str]:
    """A minimal SR-class file (header only) standing in for the worker's TID 1500 report."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, generate_uid(), "SR"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    rel = node.store.result_relpath(job_id, "sr", ds.SOPInstanceUID)
    node.store.write_atomic(rel, buf.getvalue())
    return rel, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)


def add_done_job(node, series_uid: str, findings: list[dict], *, seg_from: PhantomStudy | None = None,
                 seg_mask: np.ndarray | None = None, key: str | None = None, inference_seconds: float = 3.5) -> int:
    """What the worker leaves: a done job, findings, SR (+ SEG) rows, study summary columns."""
    with node.sessions.begin() as s:
        series = s.query(Series).filter_by(series_instance_uid=series_uid).one()
        study = s.get(Study, series.study_id)
        now = utcnow()
        job = Job(series_id=series.id, kind="infer", idempotency_key=key or f"{series_uid}:model-v1",
                  state=JobState.DONE, attempts=1, max_attempts=3, inference_seconds=inference_seconds,
                  created_at=now - timedelta(seconds=30), started_at=now - timedelta(seconds=10), finished_at=now)
        s.add(job)
        s.flush()
        for i, f in enumerate(findings, start=1):
            s.add(FindingRow(job_id=job.id, study_id=study.id, number=i, tracking_uid=generate_uid(),
                             segment_number=1 if (i == 1 and seg_mask is not None) else None,
                             center_x_mm=f["center_mm"][0], center_y_mm=f["center_mm"][1], center_z_mm=f["center_mm"][2],
                             center_voxel=None, diameter_mm=f["diameter_mm"], volume_mm3=f.get("volume_mm3", 0.0),
                             malignancy=f["malignancy"], score=f.get("score", 0.9), location=f.get("location")))
        rel, sop, ser = write_dummy_sr(node, job.id, study.study_instance_uid)
        s.add(ResultObject(job_id=job.id, kind="sr", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                           sop_instance_uid=sop, series_instance_uid=ser, path=rel))
        if seg_from is not None and seg_mask is not None:
            rel, sop, ser = write_seg(node, job.id, seg_from.datasets, seg_mask)
            s.add(ResultObject(job_id=job.id, kind="seg", sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                               sop_instance_uid=sop, series_instance_uid=ser, path=rel))
        series.eligible = True
        series.dirty = False
        study.status = StudyStatus.DONE
        study.status_reason = None
        study.findings_count = len(findings)
        study.max_diameter_mm = max((f["diameter_mm"] for f in findings), default=None)
        study.max_malignancy = max((f["malignancy"] for f in findings), default=None)
        return job.id


def add_study_row(s, uid: str, *, status=StudyStatus.DONE, malignancy=None, diameter=None, count=None,
                  patient=("DOE^JANE", "P1"), accession="A1", study_date="20260101", modalities="CT",
                  reason=None, description="CT CHEST") -> Study:
    """A study row only (for list, filter and order tests)."""
    row = Study(study_instance_uid=uid, patient_name=patient[0], patient_id=patient[1], accession_number=accession,
                study_date=study_date, modalities=modalities, status=status, status_reason=reason,
                findings_count=count, max_diameter_mm=diameter, max_malignancy=malignancy,
                study_description=description)
    s.add(row)
    return row


def lidc_files(series_dir: Path) -> list[Path]:
    return sorted(p for p in series_dir.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ""))


def store_files(node, files: list[Path], calling_ae: str = "STORESCU") -> tuple[str, str, list[Dataset]]:
    """Store and index existing DICOM files (e.g. the LIDC series) as the listener would."""
    study_uid = series_uid = ""
    headers = []
    for path in files:
        data = path.read_bytes()
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        rel = node.store.instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        size, digest = node.store.write_atomic(rel, data)
        meta = repo.InstanceMeta(
            study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, modality=ds.get("Modality"),
            instance_number=int(ds.get("InstanceNumber") or 0), series_number=int(ds.get("SeriesNumber") or 0),
            series_description=ds.get("SeriesDescription"), patient_name=str(ds.get("PatientName") or ""),
            patient_id=ds.get("PatientID"), accession_number=ds.get("AccessionNumber"),
            study_date=ds.get("StudyDate"), study_description=ds.get("StudyDescription"))
        with node.sessions.begin() as s:
            repo.index_instance(s, meta, rel, size, digest, calling_ae, None)
        study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        headers.append(ds)
    return study_uid, series_uid, headers
