"""kill -9 during ingest and during processing: nothing acknowledged is lost, the job completes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from storage.models import Instance, Job, JobState, Study, StudyStatus, Transfer, TransferState
from tests.peers import REPO, NodeProcess, StoreSCP, need_lidc, wait_for, wait_port


def test_kill_9_during_ingest_keeps_every_acknowledged_instance(tmp_path):
    files = sorted(need_lidc().iterdir())
    node = NodeProcess(tmp_path / "node")
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "listen", "--config", str(node.config)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_port(node.port, proc=proc)
    acknowledged: list[str] = []
    ae = AE(ae_title="NODETEST")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
    assert assoc.is_established
    for n, f in enumerate(files):
        if n == 50:
            # Kill the listener while the next C-STORE is in flight.
            threading.Timer(0.01, os.killpg, (proc.pid, signal.SIGKILL)).start()
        try:
            status = assoc.send_c_store(f)
        except Exception:  # noqa: BLE001 - the connection is gone
            break
        if status is None or "Status" not in status:
            break
        if status.Status == 0x0000:
            acknowledged.append(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    assert 50 <= len(acknowledged) < len(files)
    sessions = node.sessions()
    with sessions() as s:
        indexed = {i.sop_instance_uid: i.path for i in s.scalars(select(Instance))}
    data_dir = node.data_dir
    for uid in acknowledged:
        assert uid in indexed, f"acknowledged {uid} is not indexed"
        assert dcmread(data_dir / indexed[uid]).SOPInstanceUID == uid  # complete and readable


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_kill_9_during_processing_then_restart_completes_the_job(tmp_path, db_url):
    series = need_lidc()
    peer = StoreSCP(tmp_path / "pacs").start()
    node = NodeProcess(tmp_path / "node", destinations=[{"name": "pacs", "ae_title": "STORESCP", "port": peer.port}],
                       database_url=db_url if db_url.startswith("postgresql") else "")
    try:
        node.start(timeout=120)
        r = subprocess.run(["storescu", "-aec", "DICOM_NODE", "127.0.0.1", str(node.port), "+sd", str(series)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        sessions = node.sessions()

        def running():
            with sessions() as s:
                return s.scalar(select(Job).where(Job.state == JobState.RUNNING))

        wait_for(running, timeout=120, interval=0.1, what="the job to start")
        time.sleep(1.0)  # well inside inference
        node.kill()
        with sessions() as s:
            job = s.scalar(select(Job))
            assert job.state is JobState.RUNNING and s.scalar(select(Transfer)) is None
        node.start(timeout=120)

        def sent():
            with sessions() as s:
                t = s.scalar(select(Transfer))
                return t is not None and t.state is TransferState.SENT

        wait_for(sent, timeout=400, what="SR and SEG sent after restart")
        with sessions() as s:
            job = s.scalar(select(Job))
            assert job.state is JobState.DONE and job.attempts == 1 and job.lease_expiries == 1
            assert s.scalar(select(Study)).status is StudyStatus.DONE
            assert len(s.scalars(select(Job)).all()) == 1
        modalities = sorted(dcmread(f, stop_before_pixels=True).Modality for f in peer.files())
        assert modalities == ["SEG", "SR"]  # exactly one copy of each
    finally:
        node.stop()
        peer.stop()


@pytest.mark.slow
def test_kill_9_of_the_supervisor_alone_during_processing_leaves_no_orphan_and_the_job_completes_once(tmp_path):
    """The issue's fault test with the real model: SIGKILL of ``serve`` only (not its group) while
    the worker runs the model. Every stage exits by itself (the worker may first finish its
    inference within ``stop_grace_seconds``), a fresh ``serve`` starts, and the job is done
    exactly once with one attempt: one SR and one SEG reach the destination."""
    from tests.test_supervise import alive, children

    series = need_lidc()
    peer = StoreSCP(tmp_path / "pacs").start()
    node = NodeProcess(tmp_path / "node", destinations=[{"name": "pacs", "ae_title": "STORESCP", "port": peer.port}])
    try:
        node.start(timeout=120)
        stages = children(node.proc.pid)
        r = subprocess.run(["storescu", "-aec", "DICOM_NODE", "127.0.0.1", str(node.port), "+sd", str(series)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        sessions = node.sessions()

        def running():
            with sessions() as s:
                return s.scalar(select(Job).where(Job.state == JobState.RUNNING))

        wait_for(running, timeout=120, interval=0.1, what="the job to start")
        time.sleep(1.0)  # inside inference
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(10)
        wait_for(lambda: not any(alive(p) for p in stages), timeout=300, what="every orphaned stage to exit")
        node.start(timeout=120)

        def sent():
            with sessions() as s:
                t = s.scalar(select(Transfer))
                return t is not None and t.state is TransferState.SENT

        wait_for(sent, timeout=400, what="SR and SEG sent")
        with sessions() as s:
            jobs = s.scalars(select(Job)).all()
            assert len(jobs) == 1 and jobs[0].state is JobState.DONE and jobs[0].attempts == 1
        modalities = sorted(dcmread(f, stop_before_pixels=True).Modality for f in peer.files())
        assert modalities == ["SEG", "SR"]
        assert node.stop() == 0
    finally:
        node.kill()
        peer.stop()
