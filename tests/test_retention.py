"""Retention: old studies deleted (files, rows, audit), never one with pending work; the disk
watermark; dry run; paused during a backup; the scheduler's loop; the storage view (API, page, CLI).

Each test runs on SQLite and on PostgreSQL (``db_url``). Studies are stored through the real
file store and indexed with the listener's own ``repo.index_instance``; their age is set by
moving ``Series.last_received_at`` back. The disk watermark test measures a simulated small
disk: its capacity is fixed and its use is the bytes actually under ``data_dir/instances``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import namedtuple
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from dicom_node.retention import Policy, run_once
from storage import repo
from storage.models import (
    AuditEvent,
    Instance,
    Job,
    JobState,
    ResultObject,
    Series,
    Study,
    Transfer,
    TransferState,
    utcnow,
)
from tests.peers import REPO

ROOT = "1.2.826.0.1.3680043.10.1137"
DiskUsage = namedtuple("DiskUsage", "total used free")


def add_study(node, n: int, age_days: float, size: int = 50_000, dirty: bool = False) -> str:
    """A study of one series with ``n`` instances of ``size`` bytes, last received ``age_days`` ago."""
    add_study.count = getattr(add_study, "count", 0) + 1
    study_uid = f"{ROOT}.{os.getpid()}.{add_study.count}"
    series_uid = f"{study_uid}.1"
    with node.sessions.begin() as s:
        for k in range(n):
            sop = f"{series_uid}.{k + 1}"
            rel = node.store.instance_relpath(study_uid, series_uid, sop)
            nbytes, sha = node.store.write_atomic(rel, os.urandom(size))
            meta = repo.InstanceMeta(study_uid, series_uid, sop, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                                     "CT", k + 1, 1, "test", "PATIENT^NAME", "PID", "ACC", "20240101", "study")
            repo.index_instance(s, meta, rel, nbytes, sha, "STORESCU", None)
        s.flush()
        s.execute(update(Series).where(Series.series_instance_uid == series_uid)
                  .values(dirty=dirty, last_received_at=utcnow() - timedelta(days=age_days)))
    return study_uid


def add_job(node, study_uid: str, state: JobState, transfer: TransferState | None = None, result: bool = False) -> None:
    with node.sessions.begin() as s:
        series = s.scalar(select(Series).join(Study).where(Study.study_instance_uid == study_uid))
        job = Job(series_id=series.id, idempotency_key=f"{study_uid}:{state.value}:{transfer}", state=state)
        s.add(job)
        s.flush()
        ids = []
        if result:
            sop = f"{study_uid}.9.1"
            rel = node.store.result_relpath(job.id, "sr", sop)
            node.store.write_atomic(rel, b"x" * 1000)
            ro = ResultObject(job_id=job.id, kind="sr", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                              sop_instance_uid=sop, series_instance_uid=f"{study_uid}.9", path=rel)
            s.add(ro)
            s.flush()
            ids = [ro.id]
        if transfer is not None:
            dest = repo.ensure_destination(s, "pacs", "PACS", "127.0.0.1", 104, ["sr"])
            s.flush()
            s.add(Transfer(job_id=job.id, destination_id=dest.id, result_object_ids=ids, state=transfer))


def studies(node) -> set[str]:
    with node.sessions() as s:
        return set(s.scalars(select(Study.study_instance_uid)))


def files(node) -> list[Path]:
    return list((node.settings.node.data_dir / "instances").rglob("*.dcm"))


def test_old_study_is_deleted_with_its_files_rows_and_an_audit_event(make_node, db_url):
    node = make_node(db_url)
    old = add_study(node, 3, age_days=40)
    add_job(node, old, JobState.DONE, TransferState.SENT, result=True)
    new = add_study(node, 2, age_days=5)
    assert len(files(node)) == 5
    _, report = run_once(node, Policy(max_age_days=30))
    assert [c.usage.study_instance_uid for c in report.deleted] == [old]
    assert studies(node) == {new}
    assert len(files(node)) == 2 and not (node.settings.node.data_dir / "instances" / old).exists()
    assert not any((node.settings.node.data_dir / "results").iterdir())
    with node.sessions() as s:
        assert s.scalar(select(Instance).join(Series).join(Study).where(Study.study_instance_uid == old)) is None
        assert s.scalars(select(Job)).all() == [] and s.scalars(select(Transfer)).all() == []
        event = s.scalar(select(AuditEvent).where(AuditEvent.action == "study.delete"))
        assert event.actor == "retention" and event.target == old
        assert event.detail["reason"] == "age" and event.detail["instances"] == 3 and event.detail["bytes"] == 150_000
        assert "PATIENT" not in str(event.detail) and "PID" not in str(event.detail)


@pytest.mark.parametrize("work", ["queued job", "running job", "pending transfer", "sending transfer", "receiving"])
def test_old_study_with_pending_work_is_kept(make_node, db_url, work):
    node = make_node(db_url)
    if work == "receiving":
        busy = add_study(node, 2, age_days=40, dirty=True)
    else:
        busy = add_study(node, 2, age_days=40)
        state = {"queued job": JobState.PENDING, "running job": JobState.RUNNING}.get(work, JobState.DONE)
        transfer = {"pending transfer": TransferState.PENDING, "sending transfer": TransferState.SENDING}.get(work)
        add_job(node, busy, state, transfer, result=transfer is not None)
    idle = add_study(node, 1, age_days=40)
    candidates, report = run_once(node, Policy(max_age_days=30))
    assert [c.usage.study_instance_uid for c in candidates] == [idle]
    assert studies(node) == {busy}
    assert len(files(node)) == 2


def test_a_study_receiving_while_retention_deletes_it_is_kept(make_node, db_url):
    """The listener's transaction indexing a new instance into an old study is open when the
    retention pass starts: the deletion waits for it, sees the series receiving, and keeps it."""
    node = make_node(db_url)
    old = add_study(node, 1, age_days=40)
    series_uid = f"{old}.1"
    sop = f"{series_uid}.99"
    rel = node.store.instance_relpath(old, series_uid, sop)
    nbytes, sha = node.store.write_atomic(rel, os.urandom(1000))
    meta = repo.InstanceMeta(old, series_uid, sop, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                             "CT", 99, 1, "test", None, None, None, None, None)
    listener = node.sessions.writer()  # a write session, as the listener's (storage.db)
    listener.begin()
    repo.index_instance(listener, meta, rel, nbytes, sha, "STORESCU", None)
    listener.flush()
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", run_once(node, Policy(max_age_days=30))))
    t.start()
    t.join(2.0)  # retention is now waiting for the listener's lock
    listener.commit()  # the instance is acknowledged from here on
    listener.close()
    t.join(60)
    assert not t.is_alive()
    assert studies(node) == {old}
    assert (node.settings.node.data_dir / rel).exists() and len(files(node)) == 2


def test_disk_watermark_deletes_the_oldest_until_enough_is_free(make_node, db_url):
    node = make_node(db_url)
    instances = node.settings.node.data_dir / "instances"

    def small_disk(_path):  # 500 kB capacity; in use: the bytes of the stored instances
        used = sum(p.stat().st_size for p in instances.rglob("*") if p.is_file())
        return DiskUsage(500_000, used, 500_000 - used)

    protected = add_study(node, 2, age_days=4)  # the oldest, but its job is queued
    add_job(node, protected, JobState.PENDING)
    b = add_study(node, 2, age_days=3)
    c = add_study(node, 2, age_days=2)
    d = add_study(node, 2, age_days=1)
    assert small_disk(None).free == 100_000  # 20% free
    policy = Policy(min_free_disk_percent=50)  # needs 250 kB free: two 100 kB studies go
    planned, _ = run_once(node, policy, apply=False, disk_usage=small_disk)
    assert [x.usage.study_instance_uid for x in planned] == [b, c] and {x.reason for x in planned} == {"disk"}
    assert studies(node) == {protected, b, c, d}  # a dry run deletes nothing
    _, report = run_once(node, policy, disk_usage=small_disk)
    assert [x.usage.study_instance_uid for x in report.deleted] == [b, c]
    assert studies(node) == {protected, d}
    assert small_disk(None).free == 300_000
    _, again = run_once(node, policy, disk_usage=small_disk)
    assert again.deleted == []  # enough is free now


def test_nothing_is_deleted_while_a_backup_runs(make_node, db_url):
    from dicom_node.backup import MARKER

    node = make_node(db_url)
    old = add_study(node, 1, age_days=40)
    marker = node.settings.node.data_dir / MARKER
    marker.write_text("{}")
    _, report = run_once(node, Policy(max_age_days=30))
    assert report.paused and studies(node) == {old}
    os.utime(marker, (0, 0))  # a marker left by a killed backup goes stale
    _, report = run_once(node, Policy(max_age_days=30))
    assert studies(node) == set()


def test_retention_pauses_during_a_real_backup(make_node, db_url, tmp_path):
    from dicom_node.backup import backup

    node = make_node(db_url)
    old = add_study(node, 2, age_days=40)
    seen = []

    def during(done: int, total: int) -> None:
        seen.append(run_once(node, Policy(max_age_days=30))[1].paused)

    report = backup(node.settings.database_url, node.settings.node.data_dir, tmp_path / "bk", progress=during)
    assert report.complete and seen and all(p == "a backup is running" for p in seen)
    assert studies(node) == {old}
    _, after = run_once(node, Policy(max_age_days=30))  # the marker is gone with the backup
    assert after.paused is None and studies(node) == set()


def test_the_scheduler_stage_runs_retention(make_node, db_url):
    from dicom_node.scheduler import run_scheduler

    node = make_node(db_url, retention={"max_age_days": 30, "interval_seconds": 0.2})
    old = add_study(node, 1, age_days=40)
    keep = add_study(node, 1, age_days=1)
    stop = threading.Event()
    t = threading.Thread(target=run_scheduler, args=(node, stop, "test-model"), kwargs={"poll_seconds": 0.2})
    t.start()
    try:
        from tests.peers import wait_for

        wait_for(lambda: studies(node) == {keep}, timeout=60, what="retention in the scheduler stage")
    finally:
        stop.set()
        t.join(30)
    assert old not in studies(node)


def test_storage_view_api_page_and_cli(make_node, db_url, tmp_path):
    from fastapi.testclient import TestClient

    from dicom_node.web.app import create_app
    from dicom_node.web.security import hash_password
    from storage import users
    from tests.web.webtools import page_login

    node = make_node(db_url, retention={"max_age_days": 30}, web={"secret_key": "retention-test-key"})
    old = add_study(node, 3, age_days=40)
    busy = add_study(node, 2, age_days=50)
    add_job(node, busy, JobState.RUNNING)
    add_study(node, 1, age_days=1)
    with node.sessions.begin() as s:
        users.add_user(s, "admin", "admin", hash_password("admin-password-1"))
        users.add_user(s, "rad", "radiologist", hash_password("radiologist-pass-1"))
    with TestClient(create_app(node)) as client:
        token = client.post("/api/token", data={"username": "admin", "password": "admin-password-1"}).json()["access_token"]
        r = client.get("/api/storage", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["studies"] == 3 and body["instances"] == 6 and body["instance_bytes"] == 300_000
        assert body["disk"]["total_bytes"] > 0 and 0 <= body["disk"]["free_percent"] <= 100
        assert [c["study_instance_uid"] for c in body["retention"]["next"]] == [old]
        assert body["retention"]["protected_studies"] == 1
        assert body["largest"][0]["study_instance_uid"] == old and body["largest"][0]["bytes"] == 150_000
        assert {x["study_instance_uid"]: x["protected"] for x in body["largest"]}[busy] == "a job is running"
        assert client.get("/api/storage?limit=0", headers={"Authorization": f"Bearer {token}"}).status_code == 422
        rad = client.post("/api/token", data={"username": "rad", "password": "radiologist-pass-1"}).json()["access_token"]
        assert client.get("/api/storage", headers={"Authorization": f"Bearer {rad}"}).status_code == 403
        page_login(client, ("admin", "admin-password-1"))
        page = client.get("/admin/storage")
        assert page.status_code == 200 and old in page.text and "a job is running" in page.text
        assert "PATIENT" not in page.text
    assert len(studies(node)) == 3  # the view deleted nothing

    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[node]\ndata_dir = "{node.settings.node.data_dir}"\n[database]\nurl = "{db_url}"\n'
                   "[retention]\nmax_age_days = 30\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dicom_node.cli", "retention", *args, "--config", str(cfg)],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)

    dry = cli("--dry-run")
    assert dry.returncode == 0 and f"would delete study {old}: age" in dry.stdout
    assert f"kept study {busy}: a job is running" in dry.stdout and f"would delete study {busy}" not in dry.stdout
    assert old in studies(node)
    applied = cli("--apply")
    assert applied.returncode == 0 and f"deleted study {old}: age" in applied.stdout, applied.stderr
    assert old not in studies(node) and busy in studies(node)
