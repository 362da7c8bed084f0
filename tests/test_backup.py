"""``dicom-node backup`` / ``restore``: consistent while the node ingests, verified, refused when unsafe.

The main test sends the LIDC-IDRI series with real DCMTK ``storescu`` (in chunks, one
association each) into a running listener and backs the node up while the sending goes on.
Every instance acknowledged before the backup started must be in the backup with its file and
sha256; every instance the backup's database lists must have its file; the backup restores into
a fresh data folder (and a fresh database on PostgreSQL), and the restored node starts and lists
the studies over its API with the user created before the backup.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.peers import REPO, NodeProcess, need, need_lidc, pg_database, wait_port

SAMPLE = REPO.parent / "shared" / "data" / "dicom-samples" / "dcmqi" / "ct-3slice"
PASSWORD = "backup-test-password"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(node: NodeProcess) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (path, sha256) of every indexed instance."""
    from sqlalchemy import select

    from storage.models import Instance

    sessions = node.sessions()
    try:
        with sessions() as s:
            return {i.sop_instance_uid: (i.path, i.sha256) for i in s.scalars(select(Instance))}
    finally:
        sessions.kw["bind"].dispose()


def _storescu(port: int, files: list[Path]) -> int:
    return subprocess.run([need("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1", str(port),
                           *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          timeout=300).returncode


def _api(port: int, path: str, token: str | None = None, form: dict | None = None):
    data = urllib.parse.urlencode(form).encode() if form else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def _database(kind: str):
    if kind == "sqlite":
        yield ""
    else:
        with pg_database() as url:
            yield url


class Sender(threading.Thread):
    """Sends ``files`` in chunks of ``chunk`` with one storescu run each; records what was acknowledged."""

    def __init__(self, port: int, files: list[Path], chunk: int = 10):
        super().__init__(daemon=True)
        self.port, self.files, self.chunk = port, files, chunk
        self.acknowledged: list[str] = []  # SOP Instance UIDs of chunks storescu reported stored
        self.lock = threading.Lock()
        self.started_three = threading.Event()
        self.failures = 0

    def run(self) -> None:
        for n in range(0, len(self.files), self.chunk):
            part = self.files[n:n + self.chunk]
            if _storescu(self.port, part) == 0:
                uids = [dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in part]
                with self.lock:
                    self.acknowledged.extend(uids)
            else:
                self.failures += 1
            if n // self.chunk == 2:
                self.started_three.set()
        self.started_three.set()

    def snapshot(self) -> set[str]:
        with self.lock:
            return set(self.acknowledged)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_backup_while_ingesting_restores_every_acknowledged_instance(tmp_path, kind):
    lidc = sorted(need_lidc().iterdir())
    with _database(kind) as url_a, _database(kind) as url_b:
        node = NodeProcess(tmp_path / "a", quiet_seconds=3600, database_url=url_a)
        node.cli("user", "add", "admin", "--role", "admin", "--password-stdin", input=PASSWORD + "\n")
        listener = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "listen", "--config", str(node.config)],
                                    cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
        try:
            wait_port(node.port, timeout=120, proc=listener)
            if SAMPLE.is_dir():
                assert _storescu(node.port, sorted(SAMPLE.iterdir())) == 0
            (node.data_dir / "web-secret").write_text("k" * 64)  # as a web stage would have written it
            sender = Sender(node.port, lidc)
            sender.start()
            assert sender.started_three.wait(300)
            acknowledged_before = sender.snapshot() | {
                dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in (SAMPLE.iterdir() if SAMPLE.is_dir() else ())}
            indexed_before = set(_rows(node))  # committed before the backup started: must all be in it
            ingest_running = sender.is_alive()
            backup_dir = tmp_path / "backup"
            r = node.cli("backup", str(backup_dir))
            sender.join(600)
            assert sender.failures == 0
            print(f"backup taken while ingest was running: {ingest_running}; "
                  f"{len(acknowledged_before)} acknowledged before it started")
            assert "every instance checked against its sha256" in r.stdout
        finally:
            os.killpg(listener.pid, 9)
            listener.wait(10)

        manifest = json.loads((backup_dir / "manifest.json").read_text())
        entries = {e["sop_instance_uid"]: e for e in manifest["files"] if e["kind"] == "instance"}
        assert acknowledged_before <= indexed_before <= set(entries), "an instance acknowledged before the backup is not in it"
        assert manifest["missing"] == [] and manifest["database"]["kind"] == kind
        live = _rows(node)
        for uid, e in entries.items():
            assert _sha256(backup_dir / "files" / e["path"]) == e["sha256"] == live[uid][1]
        assert any(e["path"] == "web-secret" for e in manifest["files"])  # the web's key: tokens survive a restore

        # Restore into a fresh data folder (and database), then start the restored node.
        fresh = NodeProcess(tmp_path / "b", quiet_seconds=3600, database_url=url_b, web=True)
        r = fresh.cli("restore", str(backup_dir))
        assert "every file checked against the manifest's sha256" in r.stdout
        restored = _rows(fresh)
        assert set(restored) == set(entries)
        for uid, (path, sha) in restored.items():
            assert _sha256(fresh.data_dir / path) == sha == entries[uid]["sha256"]
        again = fresh.cli("restore", str(backup_dir), check=False)
        assert (fresh.data_dir / "web-secret").read_text() == "k" * 64
        assert again.returncode == 2 and "not empty" in again.stderr and "--force" in again.stderr

        fresh.start(timeout=180)
        try:
            wait_port(fresh.web_port, timeout=120, proc=fresh.proc)
            token = _api(fresh.web_port, "/api/token", form={"username": "admin", "password": PASSWORD})["access_token"]
            studies = _api(fresh.web_port, "/api/studies?page_size=100", token)
            uids = {dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in lidc[:1]}
            if SAMPLE.is_dir():
                uids |= {dcmread(next(SAMPLE.iterdir()), stop_before_pixels=True).StudyInstanceUID}
            assert uids <= {s["study_instance_uid"] for s in studies["items"]}, studies
        finally:
            fresh.stop()


def _small_node(tmp_path: Path, name: str) -> NodeProcess:
    node = NodeProcess(tmp_path / name, quiet_seconds=3600)
    node.cli("source", "list")  # creates and migrates the database
    return node


def _ingest_sample(node: NodeProcess) -> None:
    if not SAMPLE.is_dir():
        pytest.skip(f"{SAMPLE} not found (shared data absent)")
    listener = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "listen", "--config", str(node.config)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(node.port, timeout=120, proc=listener)
        assert _storescu(node.port, sorted(SAMPLE.iterdir())) == 0
    finally:
        os.killpg(listener.pid, 9)
        listener.wait(10)


def test_restore_refuses_a_damaged_backup_and_touches_nothing(tmp_path):
    node = _small_node(tmp_path, "a")
    _ingest_sample(node)
    node.cli("backup", str(tmp_path / "bk"))
    manifest = json.loads((tmp_path / "bk" / "manifest.json").read_text())
    victim = tmp_path / "bk" / "files" / next(e["path"] for e in manifest["files"] if e["kind"] == "instance")
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    target = NodeProcess(tmp_path / "b")
    r = target.cli("restore", str(tmp_path / "bk"), check=False)
    assert r.returncode == 2 and "damaged" in r.stderr, r.stderr
    assert not (target.data_dir / "dicom-node.sqlite3").exists()
    assert not (target.data_dir / "instances").exists()


def test_restore_refuses_a_backup_from_a_newer_schema(tmp_path):
    node = _small_node(tmp_path, "a")
    node.cli("backup", str(tmp_path / "bk"))
    path = tmp_path / "bk" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["database"]["alembic_revision"] = "9999"
    path.write_text(json.dumps(manifest))
    target = NodeProcess(tmp_path / "b")
    r = target.cli("restore", str(tmp_path / "bk"), check=False)
    assert r.returncode == 2 and "'9999'" in r.stderr and "newer version" in r.stderr, r.stderr
    assert not target.data_dir.exists() or not any(target.data_dir.iterdir())


def test_restore_refuses_while_a_node_holds_a_lock_in_the_data_dir(tmp_path):
    node = _small_node(tmp_path, "a")
    node.cli("backup", str(tmp_path / "bk"))
    target = NodeProcess(tmp_path / "b")
    target.data_dir.mkdir(parents=True)
    lock = target.data_dir / "serve.lock"
    lock.write_text("")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(lock)!r}, 'r+'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True)\n"
                               "time.sleep(300)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = target.cli("restore", str(tmp_path / "bk"), "--force", check=False)
        assert r.returncode == 2 and "running" in r.stderr and "serve.lock" in r.stderr, r.stderr
    finally:
        holder.kill()
        holder.wait(10)
    r = target.cli("restore", str(tmp_path / "bk"))  # the lock is free again: an unheld lock file is no node
    assert r.returncode == 0


def test_restore_refuses_while_a_listener_runs_on_the_target_even_with_force(tmp_path):
    node = _small_node(tmp_path, "a")
    node.cli("backup", str(tmp_path / "bk"))
    target = _small_node(tmp_path, "b")
    listener = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "listen", "--config", str(target.config)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(target.port, timeout=120, proc=listener)
        r = target.cli("restore", str(tmp_path / "bk"), "--force", check=False)
        assert r.returncode == 2 and f"{listener.pid}" in r.stderr and "stop the node first" in r.stderr, r.stderr
        assert not list(target.data_dir.glob("pre-restore-*"))
    finally:
        os.killpg(listener.pid, 9)
        listener.wait(10)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_restore_force_moves_the_old_contents_aside(tmp_path, kind):
    with _database(kind) as url_a, _database(kind) as url_b:
        node = NodeProcess(tmp_path / "a", quiet_seconds=3600, database_url=url_a)
        node.cli("source", "list")
        _ingest_sample(node)
        node.cli("backup", str(tmp_path / "bk"))
        target = NodeProcess(tmp_path / "b", quiet_seconds=3600, database_url=url_b)
        target.cli("source", "add", "OLD_SOURCE")  # a migrated database with a row of its own
        (target.data_dir / "keep-me.txt").write_text("old")
        refused = target.cli("restore", str(tmp_path / "bk"), check=False)
        assert refused.returncode == 2 and "--force" in refused.stderr, refused.stderr
        r = target.cli("restore", str(tmp_path / "bk"), "--force")
        aside = next(target.data_dir.glob("pre-restore-*"))
        assert str(aside) in r.stdout
        assert (aside / "keep-me.txt").read_text() == "old"
        assert (aside / "dicom-node.sqlite3").exists() == (kind == "sqlite")
        assert set(_rows(target)) == set(_rows(node)) and len(_rows(target)) == 3
        assert "OLD_SOURCE" not in target.cli("source", "list").stdout  # the database is the backup's


def test_backup_refuses_a_non_empty_destination_or_one_inside_the_data_dir(tmp_path):
    node = _small_node(tmp_path, "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    r = node.cli("backup", str(tmp_path / "full"), check=False)
    assert r.returncode == 2 and "not empty" in r.stderr
    r = node.cli("backup", str(node.data_dir / "bk"), check=False)
    assert r.returncode == 2 and "inside the data folder" in r.stderr


def test_postgresql_backup_without_pg_dump_says_so(tmp_path):
    with pg_database() as url:
        node = NodeProcess(tmp_path / "a", database_url=url)
        node.cli("source", "list")
        env_path = os.environ["PATH"]
        r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "backup", str(tmp_path / "bk"),
                            "--config", str(node.config)], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "PATH": str(Path(sys.executable).parent)}, timeout=120)
        assert env_path
        assert r.returncode == 2 and "pg_dump is not on PATH" in r.stderr, r.stderr


def test_files_replaced_or_deleted_after_the_snapshot_are_reported_and_restored_consistently(make_node, db_url, tmp_path):
    """Between the database snapshot and the file copy, one instance is replaced by a resend
    (new content, acknowledged after the snapshot) and one is deleted: the backup keeps the new
    file and says so, lists the missing one; restore updates the replaced row and re-opens its series."""
    from sqlalchemy import select

    from dicom_node.backup import backup, restore
    from storage import repo
    from storage.models import Instance, Series

    node = make_node(db_url)
    study, series = "1.2.826.0.1.3680043.10.1137.7", "1.2.826.0.1.3680043.10.1137.7.1"
    rels = []
    with node.sessions.begin() as s:
        for k in range(4):
            sop = f"{series}.{k + 1}"
            rel = node.store.instance_relpath(study, series, sop)
            size, sha = node.store.write_atomic(rel, os.urandom(2000))
            meta = repo.InstanceMeta(study, series, sop, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                                     "CT", k + 1, 1, None, None, None, None, None, None)
            repo.index_instance(s, meta, rel, size, sha, "STORESCU", None)
            rels.append((sop, rel, meta))
    with node.sessions.begin() as s:
        s.execute(Series.__table__.update().values(dirty=False))
    new_bytes = os.urandom(3000)

    def meddle(done: int, total: int) -> None:
        if done == 1:  # after the snapshot, before the other files are copied
            sop, rel, meta = rels[2]
            size, sha = node.store.write_atomic(rel, new_bytes)
            with node.sessions.begin() as s:
                assert repo.index_instance(s, meta, rel, size, sha, "STORESCU", None) == "replaced"
            (node.settings.node.data_dir / rels[3][1]).unlink()

    report = backup(node.settings.database_url, node.settings.node.data_dir, tmp_path / "bk", progress=meddle)
    assert report.replaced == [rels[2][1]] and report.missing == [rels[3][1]] and not report.complete
    manifest = json.loads((tmp_path / "bk" / "manifest.json").read_text())
    entry = next(e for e in manifest["files"] if e["path"] == rels[2][1])
    assert entry["sha256"] == hashlib.sha256(new_bytes).hexdigest() != entry["db_sha256"]
    assert manifest["missing"] == [rels[3][1]]

    with contextlib.ExitStack() as stack:
        target_url = (f"sqlite:///{tmp_path / 'restored' / 'db.sqlite3'}" if db_url.startswith("sqlite")
                      else stack.enter_context(pg_database()))
        held = []

        def try_serve_lock(done: int, total: int) -> None:  # what a `serve` starting now would do
            import fcntl

            with open(tmp_path / "restored" / "serve.lock", "a") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held.append(False)
                except BlockingIOError:
                    held.append(True)

        out = restore(tmp_path / "bk", target_url, tmp_path / "restored", progress=try_serve_lock)
        assert held and all(held)  # restore holds serve's lock throughout
        assert out.replaced_fixed == 1 and out.missing == [rels[3][1]]
        from storage.db import open_database

        sessions = open_database(target_url)
        try:
            with sessions() as s:
                row = s.scalar(select(Instance).where(Instance.sop_instance_uid == rels[2][0]))
                assert row.sha256 == hashlib.sha256(new_bytes).hexdigest() and row.size_bytes == 3000
                assert s.scalar(select(Series.dirty).where(Series.series_instance_uid == series)) is True
            assert _sha256(tmp_path / "restored" / rels[2][1]) == row.sha256
        finally:
            sessions.kw["bind"].dispose()
