"""SQLite: readers never take the write lock, so they never hold up the listener (issue 11, defect 2).

Every transaction used to be ``BEGIN IMMEDIATE``: a reader took the database write lock, and
readers that kept a transaction open a while (16 parallel logins) made the listener wait,
time out with "database is locked" and answer 0xA700 / refuse associations. Now read sessions
begin deferred (``storage.db``), and only write transactions take the lock.
"""
from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from dicom_node.scp import Listener
from storage.db import ReadOnlySessionError
from storage.models import Instance, Series, Setting
from tests.peers import need
from tests.test_long_values import make_instance


def make_series(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for i in range(n):
        make_instance(folder / f"{i:03}.dcm", StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=i + 1)
    return folder


def storescu_statuses(port: int, folder: Path) -> list[str]:
    r = subprocess.run([need("storescu"), "-v", "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1", str(port),
                        "+sd", str(folder)], capture_output=True, text=True, timeout=600)
    return re.findall(r"Received Store Response \(([^)]*)\)", r.stdout + r.stderr)


@pytest.fixture
def sqlite_listener(make_node, caplog):
    caplog.set_level(logging.INFO)
    node = make_node("")  # the default: SQLite in the data directory
    assert node.sessions.kw["bind"].dialect.name == "sqlite"
    scp = Listener(node)
    scp.start(0)
    yield node, scp
    scp.stop()


def assert_never_locked(caplog) -> None:
    locked = [r.getMessage() for r in caplog.records if "database is locked" in caplog.handler.format(r)]
    assert not locked, locked[:3]


def test_open_read_transactions_never_block_ingest(sqlite_listener, tmp_path, caplog):
    """16 readers each keep a read transaction open (as a slow request does) while storescu
    sends 30 instances: every one is acknowledged with Success, and no reader fails."""
    node, scp = sqlite_listener
    folder = make_series(tmp_path / "series", 30)
    ready, release = threading.Semaphore(0), threading.Event()
    errors: list[str] = []

    def reader() -> None:
        try:
            with node.sessions() as s:
                s.scalar(select(func.count(Instance.id)))  # the transaction is open from here
                ready.release()
                release.wait(40)
                s.scalar(select(func.count(Series.id)))
        except Exception as exc:  # noqa: BLE001 - recorded, asserted below
            errors.append(f"{type(exc).__name__}: {exc}")
            ready.release()

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(16)]
    for t in threads:
        t.start()
    for _ in threads:
        ready.acquire(timeout=10)
    try:
        t0 = time.monotonic()
        statuses = storescu_statuses(scp.port, folder)
        seconds = time.monotonic() - t0
        still_open = sum(t.is_alive() for t in threads)
    finally:
        release.set()
        for t in threads:
            t.join(60)
    assert statuses == ["Success"] * 30, statuses
    assert still_open == 16, "the readers should still have held their transactions during the ingest"
    assert not errors, errors[:3]
    with node.sessions() as s:
        assert s.scalar(select(func.count(Instance.id))) == 30
    assert seconds < 30, f"ingest took {seconds:.1f} s beside idle readers"
    assert_never_locked(caplog)


def test_web_readers_pollers_and_ingest_at_once(sqlite_listener, tmp_path, caplog):
    """16 clients hammer the web's database-backed GET routes while the scheduler and the
    dispatcher poll and storescu sends 60 instances: no HTTP 500, every instance Success."""
    from fastapi.testclient import TestClient

    from dicom_node.dispatch import run_dispatcher
    from dicom_node.scheduler import run_scheduler
    from dicom_node.web.app import create_app

    node, scp = sqlite_listener
    folder = make_series(tmp_path / "series", 60)
    stop = threading.Event()
    codes: list[int] = []
    lock = threading.Lock()
    pollers = [threading.Thread(target=run_scheduler, args=(node, stop, "v-test", 0.05), daemon=True),
               threading.Thread(target=run_dispatcher, args=(node, stop, "d-test", 2, 0.05), daemon=True)]
    with TestClient(create_app(node)) as client:
        def hammer(n: int) -> None:
            while not stop.is_set():
                if n % 2:
                    code = client.get("/metrics").status_code
                else:  # 503 there means a stage is not running (none runs here); the database must be ok
                    r = client.get("/healthz")
                    code = 200 if r.status_code in (200, 503) and r.json().get("database") == "ok" else r.status_code
                with lock:
                    codes.append(code)

        clients = [threading.Thread(target=hammer, args=(n,), daemon=True) for n in range(16)]
        for t in pollers + clients:
            t.start()
        try:
            time.sleep(0.5)
            statuses = storescu_statuses(scp.port, folder)
        finally:
            stop.set()
            for t in pollers + clients:
                t.join(60)
    assert statuses == ["Success"] * 60, statuses
    assert codes and set(codes) == {200}, sorted(set(codes))
    assert_never_locked(caplog)


def test_a_read_session_refuses_to_write(make_node):
    """The rule has one way in: ``sessions.begin()`` writes; ``sessions()`` only reads."""
    node = make_node("")
    with node.sessions() as s:
        s.add(Setting(key="x", value=1))
        with pytest.raises(ReadOnlySessionError):
            s.flush()
        s.rollback()
        with pytest.raises(ReadOnlySessionError):
            s.execute(Setting.__table__.delete())
    with node.sessions.begin() as s:
        s.add(Setting(key="x", value=1))
    with node.sessions() as s:
        assert s.get(Setting, "x").value == 1
