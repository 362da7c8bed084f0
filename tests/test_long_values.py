"""Long header values, sent with DCMTK storescu, on SQLite and PostgreSQL.

Issue 11, defect 1: on PostgreSQL a 24-character AccessionNumber or a 200-character
StudyDescription overflowed a VARCHAR column, the instance got 0xA700 (transient: the sender
retries forever) and the ERROR log line carried SQLAlchemy's bound parameters, patient name and
ID included. Now such values are indexed in full (storage.limits), values beyond what the index
accepts are refused with a permanent status naming the attribute, and no log line carries a
value.
"""
from __future__ import annotations

import logging
import re
import subprocess
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select, text

from dicom_node.scp import Listener
from storage.models import Instance, Series, Study
from tests.peers import need

PATIENT_NAME = "Zyxwvut^Qwertzuiop"
PATIENT_ID = "PIDSECRET4711"


@pytest.fixture
def listener(make_node, db_url, caplog):
    caplog.set_level(logging.DEBUG)
    node = make_node(db_url)
    scp = Listener(node)
    scp.start(0)
    yield node, scp
    scp.stop()


def make_instance(path: Path, **attrs) -> Path:
    """A small, valid CT instance with ``attrs`` set (values longer than their VR allowed)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "CT", PATIENT_NAME, PATIENT_ID
    ds.StudyDate, ds.InstanceNumber, ds.SeriesNumber = "20260101", 1, 1
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(32)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the over-long values: that is the point
        ds.save_as(path, enforce_file_format=True)
    return path


def storescu_status(port: int, path: Path) -> int:
    """Send ``path`` with DCMTK storescu; the C-STORE response status it received."""
    r = subprocess.run([need("storescu"), "-d", "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1", str(port),
                        str(path)], capture_output=True, text=True, timeout=120)
    found = re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", r.stdout + r.stderr)
    assert found, f"no C-STORE response from the node (rc {r.returncode}): {(r.stdout + r.stderr)[-2000:]}"
    return int(found[-1], 16)


def assert_no_patient_data_in_logs(caplog) -> None:
    for record in caplog.records:
        line = caplog.handler.format(record)
        assert PATIENT_NAME not in line and "Zyxwvut" not in line, f"patient name logged: {line[:500]}"
        assert PATIENT_ID not in line, f"patient ID logged: {line[:500]}"
        assert "[parameters:" not in line, f"SQL parameters logged: {line[:500]}"


def test_valid_but_long_values_are_accepted_and_indexed_in_full(listener, tmp_path, caplog):
    node, scp = listener
    long = {"AccessionNumber": "A" * 24, "StudyDescription": "Study description " * 11,  # 198 characters
            "SeriesDescription": "S" * 100, "PatientID": PATIENT_ID + "X" * 51,  # LO at its 64 maximum
            "PatientName": PATIENT_NAME + "^" + "M" * 64 + "=" + "I" * 64 + "=" + "P" * 64}
    path = make_instance(tmp_path / "long.dcm", **long)
    assert storescu_status(scp.port, path) == 0x0000
    with node.sessions() as s:
        study = s.scalar(select(Study))
        series = s.scalar(select(Series))
        assert study.accession_number == long["AccessionNumber"]
        assert study.study_description == long["StudyDescription"].strip()
        assert study.patient_id == long["PatientID"] and study.patient_name == long["PatientName"]
        assert series.series_description == long["SeriesDescription"] and series.instance_count == 1
        inst = s.scalar(select(Instance))
    assert dcmread(node.store.path(inst.path)).AccessionNumber == long["AccessionNumber"]  # stored as received
    assert_no_patient_data_in_logs(caplog)


OVER_LIMIT = {
    "StudyInstanceUID": "1." + "2" * 98,  # 100 characters: VR UI allows 64
    "SOPInstanceUID": "1." + "3" * 98,
    "StudyDescription": "D" * 2000,  # beyond storage.limits.ACCEPTED_TEXT
    "AccessionNumber": "9" * 1500,
    "InstanceNumber": "99999999999",  # outside VR IS (32-bit)
}


@pytest.mark.parametrize("keyword", sorted(OVER_LIMIT))
def test_values_beyond_the_limits_are_refused_permanently_naming_the_attribute(listener, tmp_path, caplog, keyword):
    node, scp = listener
    path = make_instance(tmp_path / "over.dcm", **{keyword: OVER_LIMIT[keyword]})
    status = storescu_status(scp.port, path)
    assert status in (0xA900, 0xC000), f"status {status:#06x}: a refusal must be permanent, not 0xA700"
    with node.sessions() as s:
        assert s.scalars(select(Instance)).all() == []
    assert not [p for p in node.store.root.rglob("*.dcm")], "a refused instance left a file"
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any(keyword in m for m in refusals), refusals
    assert not any(OVER_LIMIT[keyword][:64] in m for m in refusals if keyword not in ("StudyInstanceUID", "SOPInstanceUID"))
    assert_no_patient_data_in_logs(caplog)


def test_a_database_error_logs_no_sql_parameters_and_no_patient_data(listener, db_url, tmp_path, caplog):
    """A write the database refuses (here a trigger) still answers 0xA700 (transient), and the
    ERROR line names the instance and the error kind, never the bound values."""
    node, scp = listener
    engine = node.sessions.kw["bind"]
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("CREATE TRIGGER refuse BEFORE UPDATE ON studies BEGIN SELECT RAISE(ABORT, 'no'); END")
        else:
            conn.exec_driver_sql("ALTER TABLE studies ADD CONSTRAINT refuse CHECK (patient_name IS NULL)")
    path = make_instance(tmp_path / "x.dcm")
    assert storescu_status(scp.port, path) == 0xA700
    errors = [caplog.handler.format(r) for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("cannot index" in e for e in errors), errors
    assert_no_patient_data_in_logs(caplog)


def test_log_records_are_scrubbed_of_sql_parameters_whoever_logs_them(tmp_path, caplog):
    """The safety net: an engine built without hide_parameters, its exception logged by a stage
    (as worker, dispatch and scheduler do with log.exception) carries no parameters."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import IntegrityError

    from storage import redact

    redact.install()
    engine = create_engine(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE p (name TEXT UNIQUE)"))
        conn.execute(text("INSERT INTO p VALUES (:n)"), {"n": PATIENT_NAME})
    caplog.set_level(logging.INFO)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO p VALUES (:n)"), {"n": PATIENT_NAME})
    except IntegrityError as exc:
        assert PATIENT_NAME in str(exc)  # SQLAlchemy would print it
        for name in ("dicom_node.worker", "dicom_node.dispatch", "dicom_node.scheduler"):
            logging.getLogger(name).exception("pass failed")
            logging.getLogger(name).error("pass failed: %s", exc)
            logging.getLogger(name).error(f"pass failed: {exc}")
    assert len(caplog.records) == 9
    assert_no_patient_data_in_logs(caplog)
    assert redact.scrub("x [parameters: ('a', 'b')]\n(Background on this error at: y)") == \
        "x [SQL parameters hidden]\n(Background on this error at: y)"
