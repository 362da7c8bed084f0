"""Backup and restore of a node: its database and its file store, consistent while it runs.

A backup is a folder::

  manifest.json      written last (a folder without it is not a backup): format, time, versions,
                     the database kind, file and Alembic revision, and one entry per file
                     ``{"path", "kind", "size", "sha256"}`` (sizes in bytes, sha256 hex)
  database.sqlite3   SQLite: a copy made with the sqlite3 online backup API
  database.pgdump    PostgreSQL: ``pg_dump --format=custom``
  files/<path>       every instance and result object the backed-up database references, and
                     the data folder's own top-level files (the web secret key), at their
                     paths relative to ``data_dir``

Consistency while the node runs: the database is copied first, as one snapshot (SQLite's
online backup runs in one read transaction; for PostgreSQL the file list is read in a
REPEATABLE READ transaction whose snapshot ``pg_dump --snapshot`` shares). The listener indexes
an instance only after its file is durable under its final name, and files are never changed
in place (``storage.filestore`` writes a temporary file and renames it), so every file the
snapshot references exists and can be copied afterwards. Each instance copied is checked
against the sha256 in the snapshot. The one change a running node can make to a referenced
file is to replace it (a resend of a SOP Instance UID with new content, acknowledged after the
snapshot): such a file is kept with its new hash, the entry records ``db_sha256``, and
``restore`` updates the row and marks the series for re-evaluation. While a backup runs it
keeps ``data_dir/backup-in-progress.<pid>`` fresh, and retention deletes nothing.

``restore`` verifies every file of the backup against the manifest while it copies it into a
staging folder inside ``data_dir``, refuses to run while a node holds a lock file in
``data_dir`` or a process of this host has its SQLite database open (or, on PostgreSQL, while
other sessions are connected to the database) and holds ``serve.lock`` itself, refuses a
non-empty ``data_dir`` or database without ``force`` (with ``force`` the old contents are moved
to ``data_dir/pre-restore-<time>/``, nothing is deleted), then moves the files into place,
loads the database and applies the migrations of this version.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
FILES = "files"
SQLITE_FILE = "database.sqlite3"
PGDUMP_FILE = "database.pgdump"
#: ``MARKER`` or ``MARKER.<pid>``: kept fresh (mtime) by a running backup; retention pauses while
#: one is younger than MARKER_FRESH_SECONDS (a killed backup's marker goes stale).
MARKER = "backup-in-progress"
MARKER_FRESH_SECONDS = 600.0
CHUNK = 1 << 20
#: The lock ``dicom-node serve`` holds on its data folder while it runs.
SERVE_LOCK = "serve.lock"
#: Entries of a data folder that are never backed up or counted as content.
_SKIP_SUFFIXES = (".lock", ".pid", "-wal", "-shm", "-journal")


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says why and what to do."""


@dataclass
class BackupReport:
    dest: Path
    database: str  # "sqlite" or "postgresql"
    instances: int = 0
    results: int = 0
    other_files: int = 0
    bytes: int = 0
    missing: list[str] = field(default_factory=list)  # paths referenced but absent
    replaced: list[str] = field(default_factory=list)  # instances replaced after the snapshot

    @property
    def complete(self) -> bool:
        return not self.missing


@dataclass
class RestoreReport:
    data_dir: Path
    database: str
    files: int = 0
    bytes: int = 0
    moved_aside: Path | None = None
    replaced_fixed: int = 0
    missing: list[str] = field(default_factory=list)


def dialect(database_url: str) -> str:
    """"sqlite" or "postgresql" for ``database_url``; BackupError for anything else."""
    name = make_url(database_url).get_backend_name()
    if name not in ("sqlite", "postgresql"):
        raise BackupError(f"cannot back up a {name!r} database; only SQLite and PostgreSQL are supported")
    return name


def sqlite_path(database_url: str) -> Path:
    db = make_url(database_url).database
    if not db or db == ":memory:":
        raise BackupError(f"SQLite URL {make_url(database_url)!r} names no database file")
    return Path(db)


def _pg_env(database_url: str) -> dict[str, str]:
    """libpq environment for ``pg_dump``/``pg_restore`` (the password never goes on a command line)."""
    url = make_url(database_url)
    env = {**os.environ}
    for key, value in (("PGHOST", url.host), ("PGPORT", url.port), ("PGUSER", url.username),
                       ("PGPASSWORD", url.password), ("PGDATABASE", url.database)):
        if value is not None:
            env[key] = str(value)
    for key, value in url.query.items():  # e.g. sslmode=require
        if key == "sslmode":
            env["PGSSLMODE"] = str(value)
    return env


def _psycopg_connect(database_url: str):
    import psycopg

    url = make_url(database_url).set(drivername="postgresql")
    return psycopg.connect(url.render_as_string(hide_password=False))


def _pg_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BackupError(f"{name} is not on PATH; install the PostgreSQL client tools "
                          f"(Debian: apt-get install postgresql-client) to back up or restore a PostgreSQL database")
    return path


# --- locks: is a node running on this data folder? ----------------------------------------------

def running_node(data_dir: Path, database_file: Path | None = None) -> str | None:
    """Why a node seems to run on ``data_dir`` (a lock file in it is held), or None.

    Every ``*.lock`` file directly in ``data_dir`` is tried with both ``flock`` and POSIX
    ``lockf`` (they do not see each other on Linux); a ``*.pid`` file counts when its process
    is alive; and a process of this host that has the SQLite ``database_file`` open counts.
    """
    data_dir = Path(data_dir)
    if database_file is not None and Path(database_file).exists():
        pids = processes_with_open(Path(database_file))
        if pids:
            return (f"process(es) {', '.join(map(str, pids[:5]))} have the database {database_file} open "
                    "(stop the node first)")
    if not data_dir.is_dir():
        return None
    for path in sorted(data_dir.glob("*.lock")):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            for lock, unlock in ((lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB), lambda: fcntl.flock(fd, fcntl.LOCK_UN)),
                                 (lambda: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB), lambda: fcntl.lockf(fd, fcntl.LOCK_UN))):
                try:
                    lock()
                except OSError:
                    return f"{path} is locked by a running process (stop the node first)"
                unlock()
        finally:
            os.close(fd)
    for path in sorted(data_dir.glob("*.pid")):
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if pid != os.getpid() and _alive(pid):
            return f"{path} names process {pid}, which is running (stop the node first)"
    return None


def processes_with_open(path: Path) -> list[int]:
    """Ids of the other processes of this host (those /proc lets us see) that have ``path`` open."""
    target = str(Path(path).resolve())
    pids = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        pid = int(fd_dir.parent.name)
        if pid == os.getpid():
            continue
        try:
            for fd in fd_dir.iterdir():
                try:
                    if os.readlink(fd) == target:
                        pids.append(pid)
                        break
                except OSError:
                    continue
        except OSError:
            continue
    return sorted(pids)


def _hold_lock(path: Path) -> int:
    """An exclusive ``flock`` on ``path`` (created if needed); the descriptor, to close when done."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise BackupError(f"{path} is locked by a running process (stop the node first)") from None
    return fd


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def backup_running(data_dir: Path, now: float | None = None) -> bool:
    """True while a backup of ``data_dir`` is copying files (its marker is fresh)."""
    now = now or time.time()
    for marker in Path(data_dir).glob(f"{MARKER}*"):
        try:
            if now - marker.stat().st_mtime < MARKER_FRESH_SECONDS:
                return True
        except FileNotFoundError:
            continue
    return False


# --- files --------------------------------------------------------------------------------------

def _inside(root: Path, relpath: str) -> Path:
    joined = Path(os.path.normpath(root / relpath))
    if not str(joined).startswith(str(root) + os.sep):
        raise BackupError(f"path {relpath!r} leaves {root}")
    return joined


def _copy_hashed(src: Path, dst: Path) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` (temporary file, fsync, rename); returns (bytes, sha256 hex)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".tmp-{dst.name}")
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while chunk := fin.read(CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    shutil.copymode(src, tmp)
    os.replace(tmp, dst)
    return size, digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _top_level_files(data_dir: Path, database_file: Path | None) -> list[str]:
    """The data folder's own files (e.g. ``web-secret``), not the database or locks."""
    names = []
    for p in sorted(data_dir.iterdir()):
        if not p.is_file() or p.is_symlink() or p.name.startswith("."):
            continue
        if p.name.startswith(MARKER) or p.name.endswith(_SKIP_SUFFIXES):
            continue
        if database_file is not None and p.name.startswith(database_file.name) and p.parent == database_file.parent:
            continue
        names.append(p.name)
    return names


# --- backup -------------------------------------------------------------------------------------

_INSTANCES_SQL = "SELECT sop_instance_uid, path, size_bytes, sha256 FROM instances ORDER BY id"
_RESULTS_SQL = "SELECT sop_instance_uid, path FROM result_objects ORDER BY id"
_REVISION_SQL = "SELECT version_num FROM alembic_version"


def _snapshot_sqlite(database_url: str, dest_db: Path) -> tuple[list, list, str | None]:
    src_path = sqlite_path(database_url)
    if not src_path.exists():
        raise BackupError(f"SQLite database {src_path} does not exist")
    src = sqlite3.connect(src_path, timeout=60)
    dst = sqlite3.connect(dest_db)
    try:
        src.execute("PRAGMA busy_timeout=60000")
        src.backup(dst)  # pages=-1: the whole database in one step, one read transaction
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        dst.commit()
        instances = dst.execute(_INSTANCES_SQL).fetchall()
        results = dst.execute(_RESULTS_SQL).fetchall()
        revision = dst.execute(_REVISION_SQL).fetchone()
    finally:
        dst.close()
        src.close()
    return instances, results, revision[0] if revision else None


def _snapshot_postgresql(database_url: str, dest_db: Path) -> tuple[list, list, str | None]:
    import psycopg

    pg_dump = _pg_tool("pg_dump")
    with _psycopg_connect(database_url) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
            instances = conn.execute(_INSTANCES_SQL).fetchall()
            results = conn.execute(_RESULTS_SQL).fetchall()
            revision = conn.execute(_REVISION_SQL).fetchone()
            # The dump shares this transaction's snapshot: it holds exactly the rows just read.
            r = subprocess.run([pg_dump, "--format=custom", "--no-owner", f"--snapshot={snapshot}",
                                f"--file={dest_db}"], env=_pg_env(database_url), capture_output=True, text=True)
            if r.returncode != 0:
                raise BackupError(f"pg_dump failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return instances, results, revision[0] if revision else None


def backup(database_url: str, data_dir: Path, dest: Path, *,
           progress: Callable[[int, int], None] | None = None) -> BackupReport:
    """Back up the node (database at ``database_url``, files under ``data_dir``) into ``dest``.

    ``dest`` must not exist or be an empty folder, and must not lie inside ``data_dir``.
    ``progress(done, total)`` is called after each file. Raises BackupError.
    """
    from dicom_node import __version__

    kind = dialect(database_url)
    data_dir, dest = Path(data_dir).resolve(), Path(dest).resolve()
    if dest == data_dir or data_dir in dest.parents:
        raise BackupError(f"backup folder {dest} is inside the data folder {data_dir}; choose a folder outside it")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"backup folder {dest} exists and is not empty; choose a new folder")
    if not data_dir.is_dir():
        raise BackupError(f"data folder {data_dir} does not exist")
    dest.mkdir(parents=True, exist_ok=True)
    marker = data_dir / f"{MARKER}.{os.getpid()}"  # one per backup: two backups may overlap
    marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "dest": str(dest)}))
    try:
        db_file = dest / (SQLITE_FILE if kind == "sqlite" else PGDUMP_FILE)
        started = datetime.now(timezone.utc)
        snap = _snapshot_sqlite if kind == "sqlite" else _snapshot_postgresql
        instances, results, revision = snap(database_url, db_file)
        report = BackupReport(dest=dest, database=kind)
        own_db = sqlite_path(database_url).resolve() if kind == "sqlite" else None
        extras = _top_level_files(data_dir, own_db)
        indexed = {p for _, p, _, _ in instances}  # results are indexed as instances too: copied once
        todo = ([("instance", uid, p, size, sha) for uid, p, size, sha in instances]
                + [("result", uid, p, None, None) for uid, p in results if p not in indexed]
                + [("other", None, name, None, None) for name in extras])
        entries, last_touch = [], time.monotonic()
        for n, (what, uid, relpath, db_size, db_sha) in enumerate(todo, start=1):
            entry = _backup_one(data_dir, dest, what, uid, relpath, db_sha, report)
            if entry is not None:
                entries.append(entry)
            if time.monotonic() - last_touch > 30:
                os.utime(marker)
                last_touch = time.monotonic()
            if progress is not None:
                progress(n, len(todo))
        for folder in {dest / FILES / Path(e["path"]).parent for e in entries} | {dest}:
            _fsync_dir(folder)
        manifest = {
            "format": FORMAT, "created_at": started.isoformat(), "dicom_node_version": __version__,
            "host": socket.gethostname(),
            "database": {"kind": kind, "file": db_file.name, "size": db_file.stat().st_size,
                         "sha256": _sha256(db_file), "alembic_revision": revision},
            "counts": {"instances": report.instances, "results": report.results, "other": report.other_files,
                       "bytes": report.bytes, "missing": len(report.missing), "replaced": len(report.replaced)},
            "missing": report.missing,
            "files": entries,
        }
        _write_json_atomic(dest / MANIFEST, manifest)
    finally:
        try:
            marker.unlink()
        except FileNotFoundError:
            pass
    log.debug("backup of %d instance(s), %d result object(s) in %s (%s)%s", report.instances, report.results, dest,
             kind, f"; {len(report.missing)} referenced file(s) missing" if report.missing else "")
    return report


def _backup_one(data_dir: Path, dest: Path, what: str, uid: str | None, relpath: str, db_sha: str | None,
                report: BackupReport) -> dict | None:
    src = _inside(data_dir, relpath)
    dst = _inside(dest / FILES, relpath)
    for attempt in range(2):
        try:
            size, sha = _copy_hashed(src, dst)
        except FileNotFoundError:
            if attempt == 0:
                time.sleep(0.5)
                continue
            log.warning("%s %s: file %s missing (deleted after the database snapshot?)", what, uid or "", relpath)
            report.missing.append(relpath)
            return None
        if db_sha is None or sha == db_sha:
            break
        # Replaced by a resend between the snapshot and now (or while we copied): read it again once.
        if attempt == 1:
            log.warning("instance %s was replaced after the database snapshot; keeping the new file", uid)
            report.replaced.append(relpath)
    entry = {"path": relpath, "kind": what, "size": size, "sha256": sha}
    if uid is not None:
        entry["sop_instance_uid"] = uid
    if db_sha is not None and sha != db_sha:
        entry["db_sha256"] = db_sha
    report.bytes += size
    if what == "instance":
        report.instances += 1
    elif what == "result":
        report.results += 1
    else:
        report.other_files += 1
    return entry


# --- restore ------------------------------------------------------------------------------------

def read_manifest(src: Path) -> dict:
    path = Path(src) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupError(f"{src} is not a complete backup: {MANIFEST} is missing") from None
    except json.JSONDecodeError as exc:
        raise BackupError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{path} has format {manifest.get('format')!r}; this version reads format {FORMAT}")
    return manifest


def _data_dir_content(data_dir: Path, database_file: Path | None) -> list[Path]:
    if not data_dir.is_dir():
        return []
    out = []
    for p in data_dir.iterdir():
        if p.name == "lost+found" or p.name.startswith((".restore-", "pre-restore-", MARKER)):
            continue
        if p.is_file() and p.name.endswith((".lock", ".pid")):
            continue
        out.append(p)
    return out


def _pg_state(database_url: str) -> tuple[bool, int]:
    """(the database has dicom-node tables, number of other sessions connected to it)."""
    with _psycopg_connect(database_url) as conn:
        has = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL OR to_regclass('studies') IS NOT NULL"
                           ).fetchone()[0]
        others = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                              "AND pid <> pg_backend_pid()").fetchone()[0]
    return bool(has), int(others)


def _known_revisions() -> set[str]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from storage.db import MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return {rev.revision for rev in ScriptDirectory.from_config(cfg).walk_revisions()}


def restore(src: Path, database_url: str, data_dir: Path, *, force: bool = False,
            progress: Callable[[int, int], None] | None = None) -> RestoreReport:
    """Restore the backup in ``src`` into ``data_dir`` and the database at ``database_url``."""
    src, data_dir = Path(src).resolve(), Path(data_dir).resolve()
    manifest = read_manifest(src)
    kind = dialect(database_url)
    if manifest["database"]["kind"] != kind:
        raise BackupError(f"{src} holds a {manifest['database']['kind']} database, but the configured database is "
                          f"{kind}; restore into a node configured with the same kind of database")
    db_file = src / manifest["database"]["file"]
    if not db_file.is_file():
        raise BackupError(f"{db_file} is missing from the backup")
    revision = manifest["database"].get("alembic_revision")
    if revision and revision not in _known_revisions():
        raise BackupError(f"{src} has database schema revision {revision!r}, which this version of dicom-node does "
                          "not know (the backup was made by a newer version); restore it with that version")
    target_db = sqlite_path(database_url).resolve() if kind == "sqlite" else None
    why = running_node(data_dir, target_db)
    if why:
        raise BackupError(f"a node seems to be running on {data_dir}: {why}")
    content = _data_dir_content(data_dir, target_db)
    if target_db is not None and target_db.exists() and target_db not in content:
        content.append(target_db)
    pg_used = False
    if kind == "postgresql":
        _pg_tool("pg_restore")
        pg_used, others = _pg_state(database_url)
        if others:
            raise BackupError(f"{others} other session(s) are connected to the database; stop every stage "
                              "(on every host) before restoring")
    if (content or pg_used) and not force:
        what = ([f"{data_dir} is not empty ({', '.join(sorted(p.name for p in content)[:5])})"] if content else []) \
            + (["the PostgreSQL database already holds dicom-node tables"] if pg_used else [])
        raise BackupError("; ".join(what) + "; restore into an empty data folder, or pass --force to move the "
                          f"current contents to {data_dir}/pre-restore-<time>/")
    data_dir.mkdir(parents=True, exist_ok=True)
    # Hold serve's lock (``data_dir/serve.lock``) while restoring: a `serve` started meanwhile refuses.
    lock_fd = _hold_lock(data_dir / SERVE_LOCK)
    try:
        report = RestoreReport(data_dir=data_dir, database=kind)

        # 1. Stage and verify everything inside data_dir (same file system: the final moves are renames).
        stage = data_dir / f".restore-{os.getpid()}"
        if stage.exists():
            shutil.rmtree(stage)
        try:
            if _sha256(db_file) != manifest["database"]["sha256"]:
                raise BackupError(f"{db_file} does not match the sha256 in the manifest: the backup is damaged")
            staged_db = stage / "database"
            stage.mkdir()
            shutil.copyfile(db_file, staged_db)
            entries = manifest["files"]
            for n, e in enumerate(entries, start=1):
                srcf = _inside(src / FILES, e["path"])
                try:
                    size, sha = _copy_hashed(srcf, _inside(stage / FILES, e["path"]))
                except FileNotFoundError:
                    raise BackupError(f"{srcf} is missing from the backup") from None
                if sha != e["sha256"] or size != e["size"]:
                    raise BackupError(f"{srcf} does not match the sha256 in the manifest: the backup is damaged")
                report.files += 1
                report.bytes += size
                if progress is not None:
                    progress(n, len(entries))

            # 2. Move the current contents aside (never deleted).
            if content:
                aside = data_dir / f"pre-restore-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
                aside.mkdir()
                for p in content:
                    if p.parent == data_dir:
                        os.replace(p, aside / p.name)
                if target_db is not None:
                    for suffix in ("", "-wal", "-shm", "-journal"):
                        extra = target_db.with_name(target_db.name + suffix)
                        if extra.exists():
                            os.replace(extra, aside / extra.name)
                report.moved_aside = aside

            # 3. The database.
            if kind == "sqlite":
                target_db.parent.mkdir(parents=True, exist_ok=True)
                for suffix in ("-wal", "-shm", "-journal"):
                    stale = target_db.with_name(target_db.name + suffix)
                    if stale.exists():
                        stale.unlink()
                os.replace(staged_db, target_db)
            else:
                r = subprocess.run([_pg_tool("pg_restore"), "--clean", "--if-exists", "--no-owner", "--no-privileges",
                                    "--single-transaction", "--exit-on-error", f"--dbname={make_url(database_url).database}",
                                    str(staged_db)], env=_pg_env(database_url), capture_output=True, text=True)
                if r.returncode != 0:
                    raise BackupError(f"pg_restore failed ({r.returncode}): {r.stderr.strip()[-500:]}")

            # 4. The files.
            for e in entries:
                target = _inside(data_dir, e["path"])
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(_inside(stage / FILES, e["path"]), target)
            for folder in {_inside(data_dir, e["path"]).parent for e in entries} | {data_dir}:
                _fsync_dir(folder)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

        # 5. Migrations of this version, then the rows of instances replaced after the snapshot.
        from sqlalchemy import text

        from storage.db import open_database

        sessions = open_database(database_url)
        fixes = [e for e in manifest["files"] if e.get("db_sha256") and e.get("sop_instance_uid")]
        with sessions.begin() as s:
            for e in fixes:
                s.execute(text("UPDATE instances SET sha256 = :sha, size_bytes = :size WHERE sop_instance_uid = :uid"),
                          {"sha": e["sha256"], "size": e["size"], "uid": e["sop_instance_uid"]})
                s.execute(text("UPDATE series SET dirty = :t WHERE id = (SELECT series_id FROM instances "
                               "WHERE sop_instance_uid = :uid)"), {"t": True, "uid": e["sop_instance_uid"]})
        sessions.kw["bind"].dispose()
        report.replaced_fixed = len(fixes)
        report.missing = list(manifest.get("missing", []))
        log.debug("restored %d file(s) and the %s database from %s into %s", report.files, kind, src, data_dir)
        return report
    finally:
        os.close(lock_fd)
