"""Completion, eligibility and idempotent job creation, with a real DCMTK sender."""
from __future__ import annotations

import subprocess
import time

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.scheduler import schedule_once
from dicom_node.scp import Listener
from storage.models import Job, JobState, Series, Study, StudyStatus
from tests.peers import DATA, need, need_lidc


@pytest.fixture
def node_and_port(make_node, db_url):
    node = make_node(db_url, completion={"quiet_seconds": 0.5})
    scp = Listener(node)
    scp.start(0)
    yield node, scp.port
    scp.stop()


def send(port: int, *paths, options=()) -> None:
    r = subprocess.run([need("storescu"), *options, "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1", str(port),
                        "+sd", *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def jobs(node) -> list[Job]:
    with node.sessions() as s:
        return s.scalars(select(Job).order_by(Job.id)).all()


def test_series_waits_for_quiet_period_then_gets_one_job(node_and_port):
    node, port = node_and_port
    send(port, need_lidc())
    assert schedule_once(node, "v1") == 0  # arrived less than quiet_seconds ago
    time.sleep(0.6)
    assert schedule_once(node, "v1") == 1
    [job] = jobs(node)
    assert job.state is JobState.PENDING
    with node.sessions() as s:
        study = s.scalar(select(Study))
        assert study.status is StudyStatus.WAITING
        assert s.scalar(select(Series)).eligible is True


def test_resend_of_the_same_study_creates_no_new_job_but_a_changed_instance_does(node_and_port, tmp_path):
    node, port = node_and_port
    send(port, need_lidc())
    time.sleep(0.6)
    schedule_once(node, "v1")
    send(port, need_lidc())  # identical resend
    time.sleep(0.6)
    assert schedule_once(node, "v1") == 0  # identical instances change nothing
    with node.sessions.begin() as s:
        s.scalar(select(Series)).dirty = True  # even when re-evaluated (e.g. one instance resent late) ...
    assert schedule_once(node, "v1") == 1
    assert len(jobs(node)) == 1  # ... the same content gets no second job
    changed = dcmread(sorted(need_lidc().iterdir())[5])
    changed.PixelData = bytes(len(changed.PixelData))
    changed.save_as(tmp_path / "changed.dcm")
    send(port, tmp_path / "changed.dcm")
    time.sleep(0.6)
    schedule_once(node, "v1")
    assert len(jobs(node)) == 2  # new content: a new run


def test_new_model_version_reruns(node_and_port):
    node, port = node_and_port
    send(port, need_lidc())
    time.sleep(0.6)
    schedule_once(node, "v1")
    with node.sessions.begin() as s:
        s.scalar(select(Series)).dirty = True
    schedule_once(node, "v2")
    assert len(jobs(node)) == 2


def test_missing_slice_makes_the_series_not_eligible_with_reason(node_and_port, tmp_path):
    node, port = node_and_port
    files = sorted(need_lidc().iterdir(), key=lambda p: float(dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    del files[60]
    send(port, *files)
    time.sleep(0.6)
    schedule_once(node, "v1")
    assert jobs(node) == []
    with node.sessions() as s:
        series = s.scalar(select(Series))
        study = s.scalar(select(Study))
    assert series.eligible is False and "missing" in series.eligibility_reason.lower()
    assert study.status is StudyStatus.NOT_ELIGIBLE and "missing" in study.status_reason.lower()


def test_chest_radiograph_is_recorded_not_eligible_yet(node_and_port):
    node, port = node_and_port
    cr = DATA / "dicom-samples" / "pydicom-data" / "RG1_J2KR.dcm"
    if not cr.exists():
        pytest.skip(f"{cr} not found (shared data absent)")
    send(port, cr, options=["-xv"])  # as stored: JPEG 2000 lossless
    time.sleep(0.6)
    schedule_once(node, "v1")
    with node.sessions() as s:
        study = s.scalar(select(Study))
    assert study.status is StudyStatus.NOT_ELIGIBLE
    assert "not eligible yet" in study.status_reason
