"""Engines and sessions: SQLite (WAL) by default, PostgreSQL by URL; migrations on start.

``open_database(url)`` is the one way in: it builds the engine, applies the Alembic migrations
and returns a ``Sessions`` factory. Callers own transactions, and say whether they write:

* ``with sessions.begin() as s: ...`` is a **write** transaction (committed on exit). On SQLite
  it starts with ``BEGIN IMMEDIATE``: the database write lock is taken at once, so two writers
  that both read first cannot deadlock, and claims are serialised. Keep it short: no network,
  no password hashing, no file fsync inside.
* ``with sessions() as s: ...`` is a **read** session: plain (deferred) transactions that take
  no write lock, so any number of readers run beside the writers (SQLite WAL). A read session
  that tries to write raises ``ReadOnlySessionError`` at once, rather than failing now and
  then with "database is locked" when SQLite cannot upgrade its snapshot to a writer.
* ``with sessions.begin_connection() as conn: ...`` is the same write transaction on a Core
  ``Connection`` (no ORM): the listener's index of each instance.
* ``sessions.writer()`` is a write session whose transactions the caller commits (one per web
  request that changes something).

On PostgreSQL both kinds are ordinary transactions (MVCC); the rule costs nothing there.
Bound SQL parameters never reach a log: the engines hide them and ``storage.redact`` scrubs
every log record of the process as a safety net.
"""
from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from storage import redact

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

#: Execution option that marks a connection as a writer (SQLite: BEGIN IMMEDIATE).
WRITE_OPTION = "dicom_node_write"
#: PostgreSQL advisory lock key held (transaction-scoped) while migrations run: "dcmnmigr".
MIGRATION_LOCK_KEY = 0x64636D6E6D696772  # < 2**63: a signed bigint


class ReadOnlySessionError(RuntimeError):
    """A write was attempted in a read session; use ``sessions.begin()`` or ``sessions.writer()``."""


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{Path(data_dir).resolve() / 'dicom-node.sqlite3'}"


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and foreign keys.

    Bound parameters are hidden from exception text (``hide_parameters``): they carry patient
    names and IDs.
    """
    redact.install()
    if url.startswith("sqlite"):
        # Pool without an overflow limit: SQLite connections are cheap, and a bounded pool made
        # the listener wait for a connection behind readers (16 web requests held all 15).
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True,
                               pool_size=10, max_overflow=-1)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            # Let SQLAlchemy issue BEGIN itself so that readers and writers begin differently.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # noqa: ANN001
            # Writers: IMMEDIATE takes the write lock at BEGIN (no deadlock between two writers
            # that both read first; claims serialised). Readers: a deferred BEGIN reads a
            # snapshot and never waits for, nor blocks, a writer (WAL).
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, hide_parameters=True)


def write_engine(engine: Engine) -> Engine:
    """``engine`` with its connections marked as writers (shares the pool)."""
    return engine.execution_options(**{WRITE_OPTION: True})


class Sessions(sessionmaker):
    """The session factory: ``sessions()`` reads, ``sessions.begin()`` / ``writer()`` write.

    A ``sessionmaker`` (so ``sessions.kw["bind"]`` is the engine) whose ``begin()`` and
    ``writer()`` come from a second factory bound to the same engine marked as a writer.
    """

    def __init__(self, engine: Engine):
        super().__init__(engine, expire_on_commit=False, info={"write": False})
        self._write_engine = write_engine(engine)
        self._writers = sessionmaker(self._write_engine, expire_on_commit=False, info={"write": True})
        event.listen(self, "before_flush", _refuse_flush)
        event.listen(self, "do_orm_execute", _refuse_dml)

    def begin(self):
        """A write transaction: ``with sessions.begin() as s:`` commits on exit."""
        return self._writers.begin()

    def begin_connection(self):
        """A write transaction on a Core connection, no ORM Session (the listener's hot path,
        where building a Session costs more than the statements): ``with
        sessions.begin_connection() as conn:`` commits on exit; on SQLite it is ``BEGIN IMMEDIATE``."""
        return self._write_engine.begin()

    def writer(self) -> Session:
        """A write session; the caller commits (each new transaction begins as a writer)."""
        return self._writers()


def _refuse_flush(session: Session, _ctx, _instances) -> None:  # noqa: ANN001
    if session.new or session.deleted or any(session.is_modified(o) for o in session.dirty):
        raise ReadOnlySessionError("a read session cannot write; use sessions.begin() for a write transaction")


def _refuse_dml(state) -> None:  # noqa: ANN001
    if state.is_insert or state.is_update or state.is_delete:
        raise ReadOnlySessionError("a read session cannot write; use sessions.begin() for a write transaction")


def migrate(engine: Engine) -> None:
    """Apply all Alembic migrations (idempotent; safe when several processes start at once).

    PostgreSQL: a transaction-scoped advisory lock serialises concurrent migrators; the ones
    that wait find the schema at head and do nothing. SQLite: the migration runs in one
    ``BEGIN IMMEDIATE`` transaction (the database write lock), with foreign-key enforcement
    off meanwhile, as SQLite requires for table rebuilds (a rebuilt table is dropped, and
    with enforcement on the drop would cascade to the rows that refer to it); the keys are
    checked before commit.
    """
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))

    def upgrade(conn) -> None:  # noqa: ANN001
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")

    if engine.dialect.name == "sqlite":
        with write_engine(engine).connect() as conn:
            raw = conn.connection.dbapi_connection
            raw.execute("PRAGMA foreign_keys=OFF")  # outside a transaction, or SQLite ignores it
            try:
                with conn.begin():
                    upgrade(conn)
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration left {len(broken)} row(s) with broken foreign keys")
            finally:
                raw.execute("PRAGMA foreign_keys=ON")
        return
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        upgrade(conn)


def open_database(url: str, *, run_migrations: bool = True) -> Sessions:
    engine = make_engine(url)
    if run_migrations:
        migrate(engine)
    log.info("database ready: %s", engine.url.render_as_string(hide_password=True))
    return Sessions(engine)
