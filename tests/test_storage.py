"""storage: migrations, claims under concurrency, leases, the file store."""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from storage import repo
from storage.db import migrate, open_database
from storage.filestore import FileStore, safe_uid
from storage.models import Instance, Job, JobState, Series, Study, utcnow


def _jobs(sessions, n: int) -> None:
    with sessions.begin() as s:
        study = Study(study_instance_uid="1.2.3")
        for i in range(n):
            series = Series(series_instance_uid=f"1.2.3.{i}", study=study)
            s.add(Job(series=series, idempotency_key=f"key-{i}"))


def test_migrations_apply_twice_without_harm(db_url):
    sessions = open_database(db_url)
    migrate(sessions.kw["bind"])
    with sessions() as s:
        assert s.scalars(select(Job)).all() == []


def test_concurrent_claims_never_take_the_same_job(db_url):
    sessions = open_database(db_url)
    _jobs(sessions, 24)
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        while True:
            with sessions.begin() as s:
                job = repo.claim_job(s, f"w{n}", 60)
                if job is None:
                    return
                with lock:
                    claimed.append(job.id)
            time.sleep(0.001)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == list(range(1, 25))  # every job once, none twice


def test_expired_lease_is_claimed_again_and_renewal_is_refused_to_the_old_owner(db_url):
    sessions = open_database(db_url)
    _jobs(sessions, 1)
    with sessions.begin() as s:
        job = repo.claim_job(s, "dead-worker", 60)
        job.lease_until = utcnow() - timedelta(seconds=1)  # its worker died long ago
    with sessions.begin() as s:
        again = repo.claim_job(s, "new-worker", 60)
        # The attempt that died with its worker is not charged; the reclaim is counted apart.
        assert again is not None and again.attempts == 1 and again.lease_expiries == 1
        assert again.state is JobState.RUNNING
    with sessions.begin() as s:
        assert not repo.renew_lease(s, Job, again.id, "dead-worker", 60)
        assert repo.renew_lease(s, Job, again.id, "new-worker", 60)


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2.3/../../x", "1.2.840.x", "", "9" * 70])
def test_unsafe_uids_never_become_paths(tmp_path, uid):
    name = safe_uid(uid)
    assert "/" not in name and ".." not in name and len(name) <= 64
    store = FileStore(tmp_path)
    rel = store.instance_relpath(uid, uid, uid)
    assert store.path(rel).is_relative_to(tmp_path.resolve())


def test_valid_uid_is_kept_and_path_escape_is_refused(tmp_path):
    assert safe_uid("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"
    store = FileStore(tmp_path)
    with pytest.raises(ValueError, match="outside the file store"):
        store.path("../outside.dcm")


def test_atomic_write_leaves_no_temporary_file_and_reports_the_hash(tmp_path):
    import hashlib

    store = FileStore(tmp_path)
    size, sha = store.write_atomic("a/b.dcm", [b"abc", b"def"])
    assert (size, sha) == (6, hashlib.sha256(b"abcdef").hexdigest())
    assert (tmp_path / "a" / "b.dcm").read_bytes() == b"abcdef"
    assert list((tmp_path / "a").glob(".tmp-*")) == []


def test_a_job_whose_worker_keeps_dying_is_failed_not_retried_forever(make_node):
    from dicom_node.worker import work_once

    node = make_node(worker={"max_lease_expiries": 2})
    _jobs(node.sessions, 1)
    for _ in range(3):  # three workers claim it and die (their leases expire)
        with node.sessions.begin() as s:
            job = repo.claim_job(s, "doomed", 60)
            job.lease_until = utcnow() - timedelta(seconds=1)

    def must_not_run(*_args):
        raise AssertionError("the predictor must not run a fourth time")

    assert work_once(node, "w4", must_not_run, "v1")
    with node.sessions() as s:
        job = s.scalar(select(Job))
        assert job.state is JobState.FAILED and "worker stopped 3 times" in job.error
        assert job.attempts == 1 and job.lease_expiries == 3  # past the cap of 2 reclaims


def test_upgrading_a_populated_database_keeps_every_row_and_widens_the_text_columns(db_url):
    """Migration 0002 rebuilds tables on SQLite; with foreign keys enforced, dropping the old
    ``studies`` table would cascade-delete every series and instance (storage.db.migrate turns
    enforcement off for the migration). On PostgreSQL it alters the column types."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from storage.db import MIGRATIONS_DIR, make_engine

    engine = make_engine(db_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO studies (id, study_instance_uid, status, created_at, updated_at) "
                          "VALUES (1, '1.2', 'received', '2026-01-01', '2026-01-01')"))
        conn.execute(text("INSERT INTO series (id, study_id, series_instance_uid, instance_count, last_received_at, "
                          "dirty, is_result) VALUES (1, 1, '1.2.3', 1, '2026-01-01', true, false)"))
        conn.execute(text("INSERT INTO instances (series_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, "
                          "path, size_bytes, sha256, received_at) VALUES (1, '1.2.3.4', 'c', 't', 'p', 1, 's', "
                          "'2026-01-01')"))
    migrate(engine)
    sessions = open_database(db_url)
    with sessions.begin() as s:
        assert [len(s.scalars(select(m)).all()) for m in (Study, Series, Instance)] == [1, 1, 1]
        study = s.get(Study, 1)
        study.accession_number, study.study_description = "A" * 24, "D" * 200
    with sessions() as s:
        assert s.get(Study, 1).study_description == "D" * 200
    engine.dispose()


def test_every_migration_downgrades_and_upgrades_again(db_url):
    """Upgrade to head, downgrade to base (every ``downgrade()``, 0008's and 0010's included),
    upgrade to head again: the schema at head is the same both times and base leaves no table."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    from storage.db import MIGRATIONS_DIR, make_engine

    engine = make_engine(db_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))

    def run(step, target):
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            step(cfg, target)

    def schema():
        insp = inspect(engine)
        return {t: sorted(c["name"] for c in insp.get_columns(t)) for t in insp.get_table_names()
                if t != "alembic_version"}

    run(command.upgrade, "head")
    first = schema()
    assert "quiet_seconds" in first["sources"] and "complete_requested" in first["series"]
    run(command.downgrade, "0008")
    assert "quiet_seconds" not in schema()["sources"]
    run(command.downgrade, "base")
    assert schema() == {}
    run(command.upgrade, "head")
    assert schema() == first
    engine.dispose()
