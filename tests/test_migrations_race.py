"""Stages started at the same moment against an empty database must not race the migrations.

Issue 11: several processes migrating a fresh PostgreSQL database at once; one crashed with an
``alembic_version`` IntegrityError (both created the schema). ``storage.db.migrate`` now holds
a PostgreSQL advisory lock (SQLite: the write lock) while it migrates.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
from sqlalchemy import create_engine, text

from tests.peers import REPO, pg_database

# Each process imports first, then waits for the same wall-clock instant, then migrates.
SCRIPT = """
import sys, time
from storage.db import open_database
start_at = float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))
open_database(sys.argv[1])
"""


def migrate_at_once(url: str, n: int) -> list[subprocess.CompletedProcess]:
    start_at = time.time() + 6 + n  # time for every interpreter to import on a busy machine
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, url, str(start_at)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from storage.db import MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg).get_current_head()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_concurrent_migrations_on_a_fresh_database_all_succeed(backend, tmp_path):
    def check(url: str) -> None:
        results = migrate_at_once(url, 6)
        failed = [r.stderr[-1500:] for r in results if r.returncode != 0]
        assert not failed, failed[0]
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head_revision()]
                assert conn.execute(text("SELECT count(*) FROM instances")).scalar() == 0
        finally:
            engine.dispose()

    if backend == "sqlite":
        check(f"sqlite:///{tmp_path / 'fresh.sqlite3'}")
        return
    with pg_database("dicomnode_migrace") as url:
        check(url)
