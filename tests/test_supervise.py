"""Process supervision (issue 11, defects 5 and 6, and /healthz): stages die with ``serve``, a
second ``serve`` and a taken port are refused with one line, node restarts and graceful stops
cost a job no attempt, and ``/healthz`` reports disk, database and every stage.

The model is replaced by ``tests/fake_predictor`` (an inference that waits for a file), so
these tests control exactly when an inference runs and ends, and never load torch.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import json
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from storage.models import Instance, Job, JobState, StageHeartbeat
from tests.peers import REPO, NodeProcess, free_port, listening, wait_for
from tests.results.synthetic_ct import SeriesSpec, write_series

FAKE = Path(__file__).parent / "fake_predictor"


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """Every node process started by the test runs the fake predictor; returns its folder."""
    folder = tmp_path / "fake-model"
    folder.mkdir()
    path = os.pathsep.join([str(FAKE), str(REPO), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("FAKE_PREDICTOR_DIR", str(folder))
    return folder


def children(pid: int) -> set[int]:
    """Every descendant of ``pid`` now (from /proc)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                kids = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
            except FileNotFoundError:
                continue
            for k in map(int, kids):
                if k not in found:
                    found.add(k)
                    todo.append(k)
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False




def send_series(port: int, files: list[Path], *, called: str = "DICOM_NODE") -> list[str]:
    """C-STORE ``files`` on one association; the SOP Instance UIDs answered Success."""
    ae = AE(ae_title="NODETEST")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    done = []
    for f in files:
        status = assoc.send_c_store(f)
        assert status and status.Status == 0x0000, status
        done.append(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
    assoc.release()
    return done


def the_job(node: NodeProcess) -> Job | None:
    with node.sessions()() as s:
        return s.scalar(select(Job))


def serve_run(node: NodeProcess, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(node.config)],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_kill_9_of_serve_leaves_no_stage_running_loses_nothing_and_a_fresh_serve_starts(tmp_path, fake_model):
    (fake_model / "release").touch()  # inference returns at once
    series = write_series(tmp_path / "series", SeriesSpec(n_slices=20))
    node = NodeProcess(tmp_path / "node", quiet_seconds=30)  # no job before the restart
    try:
        node.start(timeout=120)
        wait_for(lambda: len(children(node.proc.pid)) >= 4, timeout=60, what="the stages to start")
        stages = children(node.proc.pid)
        acknowledged = send_series(node.port, series[:10])
        # An association open when the supervisor dies: whatever it acknowledges must be kept.
        ae = AE(ae_title="NODETEST")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
        assert assoc.is_established
        os.kill(node.proc.pid, signal.SIGKILL)  # the supervisor only, not its process group
        node.proc.wait(10)
        for f in series[10:]:
            try:
                status = assoc.send_c_store(f)
            except Exception:  # noqa: BLE001 - the orphan listener went away
                break
            if not status or status.Status != 0x0000:
                break
            acknowledged.append(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assoc.abort()
        wait_for(lambda: not any(alive(p) for p in stages), timeout=60, what="every orphaned stage to exit")
        assert not listening(node.port), "an orphan still accepts associations"

        node.start(timeout=120)  # the killed supervisor's lock does not block, the port is free
        with node.sessions()() as s:
            indexed = {i.sop_instance_uid: i.path for i in s.scalars(select(Instance))}
        for uid in acknowledged:
            assert uid in indexed, f"acknowledged {uid} is not indexed"
            assert dcmread(node.data_dir / indexed[uid]).SOPInstanceUID == uid
        rest = [f for f in series if dcmread(f, stop_before_pixels=True).SOPInstanceUID not in indexed]
        send_series(node.port, rest)
        node.cli("setting", "set", "completion.quiet_seconds", "1")  # complete the series now
        wait_for(lambda: (j := the_job(node)) is not None and j.state is JobState.DONE, timeout=120,
                 what="the job to complete")
        with node.sessions()() as s:
            jobs = s.scalars(select(Job)).all()
        assert len(jobs) == 1 and jobs[0].attempts == 1
        assert len(list(fake_model.glob("started-*"))) == 1  # ran once
        assert node.stop() == 0
    finally:
        node.kill()


def test_second_serve_on_the_same_data_directory_is_refused_with_one_line(tmp_path):
    node = NodeProcess(tmp_path / "node")
    try:
        node.start(timeout=120)
        r = serve_run(node, timeout=60)
        assert r.returncode == 75, r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr[-2000:]
        assert f"already running on data directory {node.data_dir}" in lines[0]
        assert f"(pid {node.proc.pid})" in lines[0]
        assert node.proc.poll() is None  # the first one is untouched
    finally:
        node.kill()


@pytest.mark.parametrize("which", ["dicom", "web"])
def test_taken_port_is_reported_once_and_serve_exits_without_restarting(tmp_path, which):
    node = NodeProcess(tmp_path / "node", web=True)
    port = node.port if which == "dicom" else node.web_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        t0 = time.monotonic()
        r = serve_run(node, timeout=90)
    assert r.returncode == 78, r.stderr[-2000:]
    assert time.monotonic() - t0 < 90
    line = f"port {port} on 127.0.0.1 is already in use by another process"
    assert r.stderr.count(line) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "restarting" not in r.stderr
    assert "stage listen started" not in r.stderr  # refused before any stage ran


def test_standalone_listener_on_a_taken_port_says_so_in_one_line(tmp_path):
    node = NodeProcess(tmp_path / "node")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", node.port))
        squatter.listen()
        r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "listen", "--config", str(node.config)],
                           capture_output=True, text=True, cwd=REPO, timeout=90)
    assert r.returncode == 78
    assert r.stderr.count(f"port {node.port} on 127.0.0.1 is already in use by another process") == 1
    assert "Traceback" not in r.stderr


def test_port_changed_at_runtime_to_a_taken_one_stops_serve_instead_of_restart_looping(tmp_path):
    node = NodeProcess(tmp_path / "node")
    taken = free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            node.start(timeout=120)
            node.cli("setting", "set", "node.port", str(taken))
            assert node.proc.wait(90) == 78
        finally:
            node.kill()
    log = node.log_text()
    assert log.count(f"port {taken} on 127.0.0.1 is already in use by another process") == 1, log[-3000:]
    assert "restarting" not in log and "Traceback" not in log


def stage_pid(node: NodeProcess, stage: str) -> int:
    with node.sessions()() as s:
        rows = s.scalars(select(StageHeartbeat).where(StageHeartbeat.stage == stage)).all()
    pids = [int(r.identity.rsplit(":", 1)[1]) for r in rows if alive(int(r.identity.rsplit(":", 1)[1]))]
    assert len(pids) == 1, rows
    return pids[0]


def test_three_worker_kills_during_a_job_do_not_fail_it(tmp_path, fake_model):
    series = write_series(tmp_path / "series", SeriesSpec(n_slices=20))
    node = NodeProcess(tmp_path / "node")
    try:
        node.start(timeout=120)
        send_series(node.port, series)
        for n in range(1, 4):
            started = wait_for(lambda n=n: (fake_model / f"started-{n}").is_file(), timeout=180,
                               what=f"inference attempt {n}")
            assert started
            time.sleep(0.3)
            os.kill(int((fake_model / f"started-{n}").read_text()), signal.SIGKILL)
        wait_for(lambda: (fake_model / "started-4").is_file(), timeout=180, what="the fourth run")
        (fake_model / "release").touch()
        wait_for(lambda: the_job(node).state in (JobState.DONE, JobState.FAILED), timeout=120, what="the job")
        job = the_job(node)
        assert job.state is JobState.DONE, job.error
        assert job.attempts == 1 and job.lease_expiries == 3
    finally:
        node.kill()


def test_sigterm_during_inference_lets_it_finish_and_charges_no_attempt(tmp_path, fake_model):
    series = write_series(tmp_path / "series", SeriesSpec(n_slices=20))
    node = NodeProcess(tmp_path / "node")
    try:
        node.start(timeout=120)
        send_series(node.port, series)
        wait_for(lambda: (fake_model / "started-1").is_file(), timeout=180, what="the inference")
        node.proc.send_signal(signal.SIGTERM)
        time.sleep(40)  # longer than the old 30 s kill timeout; the default grace is 120 s
        assert node.proc.poll() is None, "serve did not wait for the running inference"
        assert alive(int((fake_model / "started-1").read_text()))
        (fake_model / "release").touch()
        assert node.proc.wait(60) == 0
        job = the_job(node)
        assert job.state is JobState.DONE and job.attempts == 1 and job.lease_expiries == 0
    finally:
        node.kill()


def test_sigterm_past_the_grace_requeues_the_job_uncharged(tmp_path, fake_model):
    series = write_series(tmp_path / "series", SeriesSpec(n_slices=20))
    node = NodeProcess(tmp_path / "node")
    node.config.write_text(node.config.read_text().replace("[worker]\n", "[worker]\nstop_grace_seconds = 3\n", 1))
    try:
        node.start(timeout=120)
        send_series(node.port, series)
        wait_for(lambda: (fake_model / "started-1").is_file(), timeout=180, what="the inference")
        t0 = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(60) == 0
        assert time.monotonic() - t0 < 3 + 15  # the worker left by itself, not killed at the timeout
        job = the_job(node)
        assert job.state is JobState.PENDING and job.attempts == 0 and job.lease_expiries == 0
        assert "back in the queue, attempt not charged" in node.log_text()
        (fake_model / "release").touch()
        node.start(timeout=120)
        wait_for(lambda: the_job(node).state is JobState.DONE, timeout=120, what="the job after the restart")
        assert the_job(node).attempts == 1
    finally:
        node.kill()


def get_health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_healthz_reports_each_stage_and_a_stale_one(tmp_path, fake_model):
    node = NodeProcess(tmp_path / "node", web=True)
    node.config.write_text(node.config.read_text().replace(
        "[database]", "min_free_disk_mb = 0\nheartbeat_seconds = 1\nstage_stale_seconds = 6\n[database]", 1))
    try:
        node.start(timeout=120)
        wait_for(lambda: listening(node.web_port), timeout=60, what="the web stage")
        status, body = wait_for(lambda: (h := get_health(node.web_port))[0] == 200 and h, timeout=60,
                                what="every stage's first heartbeat")
        assert set(body["stages"]) == {"listen", "schedule", "work", "dispatch", "web"}
        assert all(v["status"] == "ok" and v["age_seconds"] < 6 for v in body["stages"].values()), body
        assert body["database"] == "ok" and body["disk"]["status"] == "ok" and body["disk"]["free_bytes"] > 0
        status_cli = node.cli("status")  # the same checks from the command line
        assert status_cli.returncode == 0 and "dispatch  ok" in status_cli.stdout
        pid = stage_pid(node, "dispatch")
        os.kill(pid, signal.SIGSTOP)  # alive but not working
        try:
            status, body = wait_for(lambda: (h := get_health(node.web_port))[0] == 503 and h, timeout=60,
                                    what="the stopped dispatcher to go stale")
            assert body["stages"]["dispatch"]["status"] == "stale"
            assert any(p.startswith("stage dispatch: stale") for p in body["problems"]), body
            status_cli = node.cli("status", check=False)
            assert status_cli.returncode == 1 and "problem: stage dispatch: stale" in status_cli.stderr
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: get_health(node.web_port)[0] == 200, timeout=60, what="the dispatcher to recover")
    finally:
        node.kill()


def test_healthz_says_503_and_why_when_the_disk_is_below_the_watermark(tmp_path):
    from fastapi.testclient import TestClient

    from dicom_node.config import Settings
    from dicom_node.node import open_node
    from dicom_node.stages import StageHeartbeat as Beat
    from dicom_node.web.app import create_app

    data_dir = tmp_path / "var"
    settings = Settings(node={"data_dir": str(data_dir), "port": 0, "host": "127.0.0.1",
                              "min_free_disk_mb": 1e12, "required_stages": ["listen"]},
                        web={"secret_key": "test-secret"})
    node = open_node(settings)
    Beat(node.sessions, "listen", 1).beat()  # the listener is up: only the disk is wrong
    with TestClient(create_app(node)) as client:
        r = client.get("/healthz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "error" and body["disk"]["status"] == "low"
    assert body["disk"]["free_bytes"] < body["disk"]["min_free_bytes"]
    assert body["stages"]["listen"]["status"] == "ok"
    assert len(body["problems"]) == 1 and "below the 1e+12 MiB watermark" in body["problems"][0]


def _one_job(node) -> int:
    from storage.models import Series, Study

    with node.sessions.begin() as s:
        study = Study(study_instance_uid="1.2.3")
        series = Series(series_instance_uid="1.2.3.4", study=study, modality="CT", instance_count=0)
        job = Job(series=series, idempotency_key="k", max_attempts=3)
        s.add(job)
        s.flush()
        return job.id


def _expire(node, job_id: int) -> None:
    from datetime import timedelta

    from storage.models import utcnow

    with node.sessions.begin() as s:
        s.get(Job, job_id).lease_until = utcnow() - timedelta(seconds=1)


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_lease_expiries_are_not_attempts_but_have_their_own_cap(db_url, make_node):
    from dicom_node.worker import work_once
    from storage import repo

    node = make_node(db_url, worker={"max_lease_expiries": 2})
    job_id = _one_job(node)
    with node.sessions.begin() as s:
        job = repo.claim_job(s, "w1", 60)
        assert (job.attempts, job.lease_expiries) == (1, 0)
    with node.sessions.begin() as s:
        assert repo.claim_job(s, "w2", 60) is None  # the lease holds
    for n in (1, 2):  # the worker dies twice: reclaimed, attempt not charged
        _expire(node, job_id)
        with node.sessions.begin() as s:
            job = repo.claim_job(s, f"w{n + 2}", 60)
            assert (job.id, job.attempts, job.lease_expiries, job.claimed_by) == (job_id, 1, n, f"w{n + 2}")
    with node.sessions.begin() as s:  # a graceful stop puts it back uncharged
        assert repo.release_job(s, job_id, "w4", "stopping")
        assert not repo.release_job(s, job_id, "w4", "stopping")
    with node.sessions.begin() as s:
        job = repo.claim_job(s, "w5", 60)
        assert (job.state, job.attempts, job.lease_expiries) == (JobState.RUNNING, 1, 2)
    _expire(node, job_id)  # a third death: past the cap of 2, the poison job is failed
    assert work_once(node, "w6", lambda *a: pytest.fail("must not run"), "v")
    with node.sessions() as s:
        job = s.get(Job, job_id)
        assert job.state is JobState.FAILED and job.attempts == 1 and job.lease_expiries == 3
        assert "worker stopped 3 times" in job.error


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_an_attempt_is_charged_when_the_job_itself_fails(db_url, make_node, tmp_path):
    from dicom_node.worker import work_once
    from storage.models import Instance, Series

    node = make_node(db_url)
    job_id = _one_job(node)
    paths = write_series(tmp_path / "series", SeriesSpec(n_slices=20))
    with node.sessions.begin() as s:
        series = s.get(Series, 1)
        for n, p in enumerate(paths):
            rel = f"in/{n}.dcm"
            node.store.write_atomic(rel, p.read_bytes())
            s.add(Instance(series=series, sop_instance_uid=f"1.2.3.4.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                           transfer_syntax_uid="1.2.840.10008.1.2.1", path=rel, size_bytes=1, sha256=str(n)))

    def broken(*_args):
        raise RuntimeError("model exploded")

    for attempt in (1, 2, 3):
        assert work_once(node, "w", broken, "v")
        with node.sessions() as s:
            job = s.get(Job, job_id)
            assert job.attempts == attempt and job.lease_expiries == 0
            assert job.state is (JobState.PENDING if attempt < 3 else JobState.FAILED), job.error
    assert "model exploded" in job.error


def listener_pids(node: NodeProcess) -> set[int]:
    with node.sessions()() as s:
        rows = s.scalars(select(StageHeartbeat).where(StageHeartbeat.stage == "listen")).all()
    return {pid for pid in (int(r.identity.rsplit(":", 1)[1]) for r in rows) if alive(pid)}


def test_listeners_share_the_port_and_a_killed_one_is_restarted(tmp_path):
    """``[node] listeners = 2``: two listener processes on one port (SO_REUSEPORT), every
    instance of concurrent associations stored, a listener killed with -9 started again."""
    from concurrent.futures import ThreadPoolExecutor

    series = write_series(tmp_path / "series", SeriesSpec(n_slices=6))
    node = NodeProcess(tmp_path / "node")
    node.config.write_text(node.config.read_text().replace("[node]\n", "[node]\nlisteners = 2\nheartbeat_seconds = 1\n", 1))
    try:
        node.start(timeout=120)
        pids = wait_for(lambda: len(p := listener_pids(node)) == 2 and p, timeout=60, what="two listener heartbeats")
        assert pids <= children(node.proc.pid)
        with ThreadPoolExecutor(6) as pool:
            stored = [uid for done in pool.map(lambda _: send_series(node.port, series), range(6)) for uid in done]
        assert len(stored) == 36
        with node.sessions()() as s:
            assert s.scalar(select(Instance.id).limit(1)) is not None
            assert len(s.scalars(select(Instance.sop_instance_uid)).all()) == 6  # the same 6, sent 6 times
        killed = min(pids)
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: len(p := listener_pids(node)) == 2 and killed not in p, timeout=90,
                 what="the killed listener to be started again")
        assert len(send_series(node.port, series)) == 6
    finally:
        node.kill()
    assert "Traceback" not in node.log_text()
