"""The listener against real DCMTK and pynetdicom peers, on SQLite and PostgreSQL."""
from __future__ import annotations

import socket
import sys
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select

from dicom_node.scp import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, Listener
from storage import repo
from storage.models import AssociationLog, AssociationResult, Instance, Series
from tests.peers import need, need_lidc


@pytest.fixture
def listener(make_node, db_url):
    node = make_node(db_url)
    scp = Listener(node)
    scp.start(0)
    yield node, scp
    scp.stop()


def storescu(port: int, *paths: str, calling: str = "STORESCU", called: str = "DICOM_NODE") -> subprocess.CompletedProcess:
    return subprocess.run([need("storescu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port), "+sd", *paths],
                          capture_output=True, text=True, timeout=120)


def audit_rows(node) -> list[AssociationLog]:
    with node.sessions() as s:
        return s.scalars(select(AssociationLog).order_by(AssociationLog.id)).all()


def test_storescu_lidc_series_is_stored_indexed_and_audited(listener):
    node, scp = listener
    series_dir = need_lidc()
    r = storescu(scp.port, str(series_dir))
    assert r.returncode == 0, r.stderr
    sent = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in series_dir.iterdir()}
    with node.sessions() as s:
        rows = s.scalars(select(Instance)).all()
        assert {i.sop_instance_uid for i in rows} == set(sent)
        for inst in rows[:10]:
            stored = dcmread(node.store.path(inst.path))
            original = dcmread(sent[inst.sop_instance_uid])
            assert stored.PixelData == original.PixelData  # as received
            assert stored.PatientID == original.PatientID
        series = s.scalar(select(Series))
        assert series.instance_count == 133 and series.dirty
    time.sleep(0.3)
    log_rows = audit_rows(node)
    assert log_rows[-1].result is AssociationResult.ACCEPTED
    assert log_rows[-1].calling_ae == "STORESCU" and log_rows[-1].instances == 133
    assert log_rows[-1].duration_s is not None


def test_echoscu_is_answered(listener):
    _, scp = listener
    r = subprocess.run([need("echoscu"), "-aec", "DICOM_NODE", "-aet", "STORESCU", "127.0.0.1", str(scp.port)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_unknown_calling_ae_is_rejected_with_reason_and_audited(listener):
    node, scp = listener
    r = subprocess.run([need("echoscu"), "-aet", "INTRUDER", "-aec", "DICOM_NODE", "127.0.0.1", str(scp.port)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "Calling AE Title Not Recognized" in r.stderr
    row = audit_rows(node)[-1]
    assert row.result is AssociationResult.REJECTED and row.calling_ae == "INTRUDER"
    assert "not a configured source" in row.reason


def test_unknown_called_ae_is_rejected_with_reason(listener):
    node, scp = listener
    r = subprocess.run([need("echoscu"), "-aet", "STORESCU", "-aec", "SOMEONE_ELSE", "127.0.0.1", str(scp.port)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "Called AE Title Not Recognized" in r.stderr
    assert "SOMEONE_ELSE" in audit_rows(node)[-1].reason


def test_source_added_at_runtime_is_accepted_at_once(listener):
    node, scp = listener
    cmd = [need("echoscu"), "-aet", "NEWMODALITY", "-aec", "DICOM_NODE", "127.0.0.1", str(scp.port)]
    assert subprocess.run(cmd, capture_output=True, timeout=30).returncode != 0
    with node.sessions.begin() as s:
        repo.ensure_source(s, "NEWMODALITY")
    assert subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0


def test_ae_title_change_takes_effect_without_restart(listener):
    node, scp = listener
    with node.sessions.begin() as s:
        repo.set_setting(s, "node.ae_title", "RENAMED_NODE")
    old = subprocess.run([need("echoscu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1", str(scp.port)],
                         capture_output=True, timeout=30)
    new = subprocess.run([need("echoscu"), "-aet", "STORESCU", "-aec", "RENAMED_NODE", "127.0.0.1", str(scp.port)],
                         capture_output=True, timeout=30)
    assert old.returncode != 0 and new.returncode == 0


def test_random_bytes_on_the_port_are_refused_and_the_node_keeps_working(listener):
    node, scp = listener
    with socket.create_connection(("127.0.0.1", scp.port)) as sock:
        sock.sendall(bytes(range(256)) * 8)
        sock.settimeout(5)
        try:
            sock.recv(1024)  # an A-ABORT or a closed connection
        except (TimeoutError, ConnectionResetError):
            pass
    time.sleep(0.5)
    r = subprocess.run([need("echoscu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1", str(scp.port)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    reasons = [a.reason or "" for a in audit_rows(node)]
    assert any("without a valid association request" in x for x in reasons)


def _send_paths(port: int, paths: list[Path]) -> list[int]:
    ae = AE(ae_title="NODETEST")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(p).Status for p in paths]
    finally:
        assoc.release()


def test_truncated_dataset_is_refused_and_nothing_is_indexed(listener, tmp_path):
    node, scp = listener
    src = sorted(need_lidc().iterdir())[0]
    raw = src.read_bytes()
    ds = dcmread(src, stop_before_pixels=True)
    # Cut inside the patient module: the header is incomplete.
    cut = raw.find(b"\x10\x00\x20\x00")  # (0010,0020) PatientID
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[: cut + 6])
    statuses = _send_paths(scp.port, [truncated, src])
    assert statuses == [CANNOT_UNDERSTAND, SUCCESS]
    with node.sessions() as s:
        assert s.scalars(select(Instance.sop_instance_uid)).all() == [ds.SOPInstanceUID]


def test_duplicate_sop_instance_policy(listener, tmp_path):
    node, scp = listener
    src = sorted(need_lidc().iterdir())[0]
    assert _send_paths(scp.port, [src, src]) == [SUCCESS, SUCCESS]
    with node.sessions.begin() as s:
        assert s.scalar(select(func.count(Instance.id))) == 1
        first_sha = s.scalar(select(Instance.sha256))
        s.scalar(select(Series)).dirty = False
    changed = dcmread(src)
    changed.SeriesDescription = "corrected"
    path = tmp_path / "changed.dcm"
    changed.save_as(path)
    assert _send_paths(scp.port, [path]) == [SUCCESS]
    with node.sessions() as s:
        inst = s.scalar(select(Instance))
        assert s.scalar(select(func.count(Instance.id))) == 1
        assert inst.sha256 != first_sha
        assert s.scalar(select(Series)).dirty  # re-evaluated: a changed instance triggers a re-run
        assert dcmread(node.store.path(inst.path)).SeriesDescription == "corrected"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_full_disk_answers_out_of_resources_and_keeps_nothing_half_written(make_node, db_url, tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {r.stderr.decode().strip()}")
    try:
        node = make_node(db_url, node={"data_dir": str(mount)})
        scp = Listener(node)
        scp.start(0)
        try:
            files = sorted(need_lidc().iterdir())[:3]  # ~525 kB each: the second one does not fit
            statuses = _send_paths(scp.port, files)
        finally:
            scp.stop()
        assert statuses[0] == SUCCESS and OUT_OF_RESOURCES in statuses[1:]
        with node.sessions() as s:
            indexed = s.scalars(select(Instance)).all()
        assert len(indexed) == statuses.count(SUCCESS)
        on_disk = [p for p in mount.rglob("*") if p.is_file() and p.suffix == ".dcm"]
        assert len(on_disk) == len(indexed)  # no partial file left behind
        assert not [p for p in mount.rglob(".tmp-*")]
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_listener_does_not_import_torch():
    r = subprocess.run([sys.executable, "-c", "import sys, dicom_node.scp, dicom_node.stages, dicom_node.cli; "
                        "assert 'torch' not in sys.modules, 'torch imported'"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_sender_that_aborts_mid_association_keeps_what_was_acknowledged(listener):
    node, scp = listener
    files = sorted(need_lidc().iterdir())[:5]
    ae = AE(ae_title="NODETEST")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="DICOM_NODE")
    statuses = [assoc.send_c_store(p).Status for p in files[:3]]
    assoc.abort()
    assert statuses == [SUCCESS] * 3
    time.sleep(0.5)
    row = audit_rows(node)[-1]
    assert row.result is AssociationResult.ABORTED and row.instances == 3
    with node.sessions() as s:
        assert len(s.scalars(select(Instance)).all()) == 3


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_port_change_rebinds_without_restart(make_node, db_url):
    from dicom_node.scp import run_listener
    from tests.peers import free_port, wait_port

    first, second = free_port(), free_port()
    node = make_node(db_url, node={"port": first})
    stop = threading.Event()
    thread = threading.Thread(target=run_listener, args=(node, stop, 0.2), daemon=True)
    thread.start()
    try:
        wait_port(first)
        with node.sessions.begin() as s:
            repo.set_setting(s, "node.port", second)
        wait_port(second, timeout=10)
        r = subprocess.run([need("echoscu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1", str(second)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
    finally:
        stop.set()
        thread.join(10)
