"""Repository functions. They take a ``Session`` and never commit: the caller owns the transaction.

Job and transfer claims are single ``UPDATE ... WHERE id = (SELECT ... LIMIT 1) RETURNING``
statements; on PostgreSQL the sub-select takes ``FOR UPDATE SKIP LOCKED`` so that any number
of workers and dispatchers on any number of hosts claim disjoint rows; on SQLite the write lock
taken at ``BEGIN IMMEDIATE`` (a write transaction, ``sessions.begin()``) serialises claims.
Pollers ask ``job_claimable`` / ``transfer_claimable`` in a read session first, so an idle
poll never takes the write lock.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Connection, bindparam, func, or_, select, text, update
from sqlalchemy import case
from sqlalchemy.orm import Session

from storage.models import (
    AssociationLog,
    AssociationResult,
    AuditEvent,
    Destination,
    Job,
    JobState,
    Series,
    Setting,
    Source,
    Study,
    StudyStatus,
    Transfer,
    TransferState,
    UTCDateTime,
    utcnow,
)


# --- settings ---------------------------------------------------------------------------------

def get_setting(s: Session, key: str, default=None):
    row = s.get(Setting, key)
    return default if row is None else row.value


def set_setting(s: Session, key: str, value) -> None:
    row = s.get(Setting, key)
    if row is None:
        s.add(Setting(key=key, value=value))
    else:
        row.value = value


# --- sources, destinations ----------------------------------------------------------------------

def source_allows(s: Session, calling_ae: str, peer_host: str | None) -> str | None:
    """None when ``calling_ae`` (from ``peer_host``) is an enabled source, else the reason."""
    row = s.scalar(select(Source).where(Source.ae_title == calling_ae.strip()))
    if row is None:
        return f"calling AE title {calling_ae!r} is not a configured source"
    if not row.enabled:
        return f"source {calling_ae!r} is disabled"
    if row.host and peer_host and row.host != peer_host:
        return f"source {calling_ae!r} is allowed from {row.host}, not from {peer_host}"
    return None


def ensure_source(s: Session, ae_title: str, host: str | None = None, description: str | None = None,
                  return_to: list[str] | None = None, quiet_seconds: float | None = None) -> Source:
    row = s.scalar(select(Source).where(Source.ae_title == ae_title))
    if row is None:
        row = Source(ae_title=ae_title, host=host, description=description, enabled=True,
                     return_to=list(return_to or []), quiet_seconds=quiet_seconds)
        s.add(row)
    return row


def ensure_destination(s: Session, name: str, ae_title: str, host: str, port: int, outputs: list[str],
                       tls: bool = False, *, kind: str = "dicom", url: str | None = None,
                       options: dict | None = None) -> Destination:
    """The destination ``name``, created with these values when new (an existing row is kept as the
    admin left it: the database wins over config.toml). ``kind``: "dicom" (C-STORE) or "dicomweb"
    (STOW-RS to ``url``); ``options``: kind options (see ``Destination.options``)."""
    row = s.scalar(select(Destination).where(Destination.name == name))
    if row is None:
        row = Destination(name=name, ae_title=ae_title, host=host, port=port, outputs=list(outputs), enabled=True,
                          tls=tls, kind=kind, url=url, options=options)
        s.add(row)
    return row


# --- ingest -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class InstanceMeta:
    """What the listener indexes about a received instance (from its header)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    instance_number: int | None
    series_number: int | None
    series_description: str | None
    patient_name: str | None
    patient_id: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    is_result: bool = False


@dataclass
class IndexCache:
    """Study and series rows already known on one association: (uid -> id), (uid -> (id, is_result)).

    The listener keeps one per association, so an instance of a known series costs one
    statement on PostgreSQL. A cached row deleted meanwhile makes the instance insert fail its
    foreign key (``IntegrityError``): the caller clears the cache and indexes again.
    """

    studies: dict[str, int] = field(default_factory=dict)
    series: dict[str, tuple[int, bool]] = field(default_factory=dict)

    def clear(self) -> None:
        self.studies.clear()
        self.series.clear()


# Statements of the hot path, built once (building them per call costs more than running them).
_STUDY_ID = select(Study.id).where(Study.study_instance_uid == bindparam("uid"))
_SERIES_ROW = select(Series.id, Series.is_result).where(Series.series_instance_uid == bindparam("uid"))
_STUDY_ATTRIBUTES = ("patient_name", "patient_id", "accession_number", "study_date", "study_description")

#: PostgreSQL: the whole index of one instance in one statement (one round trip): upsert the
#: instance (nothing when the same bytes are already indexed), then, only if a row was written,
#: count it in its series, mark the series dirty and reopen the study. ``xmax = 0`` tells an
#: insert from an update.
_PG_INDEX = text("""
WITH ins AS (
  INSERT INTO instances (sop_instance_uid, series_id, sop_class_uid, transfer_syntax_uid, instance_number, path,
                         size_bytes, sha256, calling_ae, association_id, received_at)
  VALUES (:sop_instance_uid, :series_id, :sop_class_uid, :transfer_syntax_uid, :instance_number, :path,
          :size_bytes, :sha256, :calling_ae, :association_id, :received_at)
  ON CONFLICT (sop_instance_uid) DO UPDATE SET
    series_id = excluded.series_id, sop_class_uid = excluded.sop_class_uid,
    transfer_syntax_uid = excluded.transfer_syntax_uid, instance_number = excluded.instance_number,
    path = excluded.path, size_bytes = excluded.size_bytes, sha256 = excluded.sha256,
    calling_ae = excluded.calling_ae, association_id = excluded.association_id, received_at = excluded.received_at
  WHERE instances.sha256 IS DISTINCT FROM excluded.sha256
  RETURNING (xmax = 0) AS inserted
), ser AS (
  UPDATE series SET instance_count = instance_count + (SELECT count(*) FROM ins WHERE inserted),
                    last_received_at = :received_at, dirty = :dirty
  WHERE id = :series_id AND EXISTS (SELECT 1 FROM ins)
), st AS (
  UPDATE studies SET status = :received, status_reason = NULL, updated_at = :received_at
  WHERE id = :study_id AND :reopen AND status NOT IN (:received, :processing) AND EXISTS (SELECT 1 FROM ins)
)
SELECT inserted FROM ins
""").bindparams(bindparam("received_at", type_=UTCDateTime()))

#: SQLite: the same index as plain SQL run on the connection (``exec_driver_sql``: no statement
#: compilation, no ORM), in process, so four short statements cost less than one compiled one.
#: Values are bound as SQLAlchemy would store them (``_sqlite_time``, enum value strings).
_SQLITE_INSTANCE_ROW = "SELECT id, sha256 FROM instances WHERE sop_instance_uid = ?"
_SQLITE_INSERT_INSTANCE = (
    "INSERT INTO instances (sop_instance_uid, series_id, sop_class_uid, transfer_syntax_uid, instance_number, path,"
    " size_bytes, sha256, calling_ae, association_id, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_SQLITE_UPDATE_INSTANCE = (
    "UPDATE instances SET series_id = ?, sop_class_uid = ?, transfer_syntax_uid = ?, instance_number = ?, path = ?,"
    " size_bytes = ?, sha256 = ?, calling_ae = ?, association_id = ?, received_at = ? WHERE id = ?")
_SQLITE_TOUCH_SERIES = (
    "UPDATE series SET instance_count = instance_count + ?, last_received_at = ?, dirty = ? WHERE id = ?")
_SQLITE_REOPEN_STUDY = (
    "UPDATE studies SET status = ?, status_reason = NULL, updated_at = ? WHERE id = ? AND status NOT IN (?, ?)")
_sqlite_time_processors: dict = {}


def _sqlite_time(conn: Connection, value: datetime):
    """``value`` as a ``UTCDateTime`` column stores it on this connection's dialect."""
    proc = _sqlite_time_processors.get(conn.dialect)
    if proc is None:
        proc = UTCDateTime().dialect_impl(conn.dialect).bind_processor(conn.dialect) or (lambda v: v)
        _sqlite_time_processors[conn.dialect] = proc
    return proc(value)


def _upsert(conn: Connection, model):
    """``INSERT ... ON CONFLICT`` of the connection's dialect (PostgreSQL or SQLite)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    return dialect_insert(model)


def _connection(s: Session | Connection) -> Connection:
    """The Core connection of ``s`` (a Session's, in its transaction, or ``s`` itself)."""
    return s.connection() if isinstance(s, Session) else s


def _ensure_rows(conn: Connection, meta: InstanceMeta, cache: IndexCache | None) -> tuple[int, int, bool]:
    """(study id, series id, series is_result), creating the rows when new (race-free upsert)."""
    cache = cache if cache is not None else IndexCache()
    study_id = cache.studies.get(meta.study_instance_uid)
    if study_id is None:
        study_id = conn.scalar(_STUDY_ID, {"uid": meta.study_instance_uid})
        if study_id is None:
            conn.execute(_upsert(conn, Study).values(study_instance_uid=meta.study_instance_uid,
                                                     status=StudyStatus.RECEIVED)
                         .on_conflict_do_nothing(index_elements=["study_instance_uid"]))
            study_id = conn.scalar(_STUDY_ID, {"uid": meta.study_instance_uid})
        cache.studies[meta.study_instance_uid] = study_id
    known = cache.series.get(meta.series_instance_uid)
    if known is None:
        row = conn.execute(_SERIES_ROW, {"uid": meta.series_instance_uid}).first()
        if row is None:
            created = conn.scalar(
                _upsert(conn, Series).values(series_instance_uid=meta.series_instance_uid, study_id=study_id,
                                             modality=meta.modality, series_number=meta.series_number,
                                             series_description=meta.series_description, is_result=meta.is_result,
                                             instance_count=0)
                .on_conflict_do_nothing(index_elements=["series_instance_uid"]).returning(Series.id))
            if created is not None:
                _update_study_attributes(conn, study_id, meta)
                row = (created, meta.is_result)
            else:  # created by another association meanwhile
                row = conn.execute(_SERIES_ROW, {"uid": meta.series_instance_uid}).first()
        known = cache.series[meta.series_instance_uid] = (row[0], bool(row[1]))
    return study_id, known[0], known[1]


def index_instance(s: Session | Connection, meta: InstanceMeta, relpath: str, size: int, sha256: str,
                   calling_ae: str | None, association_id: int | None, cache: IndexCache | None = None) -> str:
    """Index a stored instance; returns "new", "duplicate" (same bytes) or "replaced".

    Duplicate SOP Instance UID policy: identical content is acknowledged and changes nothing;
    different content replaces the stored file (the newest wins) and marks the series for
    re-evaluation, so a corrected instance triggers a re-run.

    ``s``: a Session (its transaction) or a Core ``Connection`` in a write transaction (the
    listener's: no ORM on the hot path). The statements are Core or plain SQL, so rows the
    Session holds are not refreshed.

    This is the listener's hot path (once per received instance): with ``cache`` (one per
    association) the study and series rows are looked up once; the instance is then indexed
    in one statement on PostgreSQL, four plain SQL statements on SQLite (in process).
    """
    conn = _connection(s)
    now = utcnow()
    study_id, series_id, is_result = _ensure_rows(conn, meta, cache)
    if conn.dialect.name == "postgresql":
        inserted = conn.execute(_PG_INDEX, {
            "sop_instance_uid": meta.sop_instance_uid, "series_id": series_id, "sop_class_uid": meta.sop_class_uid,
            "transfer_syntax_uid": meta.transfer_syntax_uid, "instance_number": meta.instance_number,
            "path": relpath, "size_bytes": size, "sha256": sha256, "calling_ae": calling_ae,
            "association_id": association_id, "received_at": now, "study_id": study_id, "dirty": not is_result,
            "reopen": not is_result, "received": StudyStatus.RECEIVED.value,
            "processing": StudyStatus.PROCESSING.value}).scalar()
        return "duplicate" if inserted is None else "new" if inserted else "replaced"
    existing = conn.exec_driver_sql(_SQLITE_INSTANCE_ROW, (meta.sop_instance_uid,)).first()
    if existing is not None and existing[1] == sha256:
        return "duplicate"
    stamp = _sqlite_time(conn, now)
    values = (series_id, meta.sop_class_uid, meta.transfer_syntax_uid, meta.instance_number, relpath, size, sha256,
              calling_ae, association_id, stamp)
    if existing is None:
        conn.exec_driver_sql(_SQLITE_INSERT_INSTANCE, (meta.sop_instance_uid, *values))
    else:
        conn.exec_driver_sql(_SQLITE_UPDATE_INSTANCE, (*values, existing[0]))
    conn.exec_driver_sql(_SQLITE_TOUCH_SERIES, (1 if existing is None else 0, stamp, not is_result, series_id))
    if not is_result:
        conn.exec_driver_sql(_SQLITE_REOPEN_STUDY, (StudyStatus.RECEIVED.value, stamp, study_id,
                                                    StudyStatus.RECEIVED.value, StudyStatus.PROCESSING.value))
    return "new" if existing is None else "replaced"


def _update_study_attributes(conn: Connection, study_id: int, meta: InstanceMeta) -> None:
    """Patient/study attributes and the modality list, refreshed when a series first arrives."""
    row = conn.execute(select(*(getattr(Study, a) for a in _STUDY_ATTRIBUTES), Study.modalities)
                       .where(Study.id == study_id)).first()
    changes = {}
    for attr, current in zip(_STUDY_ATTRIBUTES, row):
        value = getattr(meta, attr)
        if value and current != value:
            changes[attr] = value
    if meta.modality and not meta.is_result:
        mods = set(filter(None, (row[-1] or "").split("\\")))
        if meta.modality not in mods:
            changes["modalities"] = "\\".join(sorted(mods | {meta.modality}))
    if changes:
        conn.execute(update(Study).where(Study.id == study_id).values(**changes))


# --- association audit -------------------------------------------------------------------------

def log_association(s: Session, **fields) -> AssociationLog:
    row = AssociationLog(**fields)
    s.add(row)
    s.flush()
    return row


def audit(s: Session, actor: str, action: str, target: str | None = None, detail: dict | None = None) -> None:
    s.add(AuditEvent(actor=actor, action=action, target=target, detail=detail))


# --- claims -----------------------------------------------------------------------------------

def _claim(s: Session, model, ready, worker_id: str, lease_seconds: float, extra_values: dict):
    now = utcnow()
    sub = select(model.id).where(ready(now)).order_by(model.priority.desc(), model.id).limit(1)
    if s.bind.dialect.name == "postgresql":
        sub = sub.with_for_update(skip_locked=True)
    stmt = (
        update(model)
        .where(model.id == sub.scalar_subquery())
        .values(claimed_by=worker_id, lease_until=now + timedelta(seconds=lease_seconds), **extra_values)
        .returning(model.id)
        .execution_options(synchronize_session=False)
    )
    claimed = s.execute(stmt).scalar_one_or_none()
    return None if claimed is None else s.get(model, claimed, populate_existing=True)


def _job_ready(now: datetime):
    return or_(Job.state == JobState.PENDING, (Job.state == JobState.RUNNING) & (Job.lease_until < now))


def _transfer_ready(now: datetime):
    enabled = select(Destination.id).where(Destination.enabled.is_(True))
    return Transfer.destination_id.in_(enabled) & or_(
        (Transfer.state == TransferState.PENDING) & (Transfer.next_attempt_at <= now),
        (Transfer.state == TransferState.SENDING) & (Transfer.lease_until < now),
    )


def claim_job(s: Session, worker_id: str, lease_seconds: float) -> Job | None:
    """Claim the most urgent (``Job.priority``), then oldest, pending job, or a running one whose
    lease expired (its worker died).

    Attempts are charged only for the job's own failures: claiming a pending job starts a new
    attempt (``attempts + 1``); reclaiming a running job whose lease expired does not (the
    attempt that died with its worker is not charged: ``attempts`` stays and ``lease_expiries
    + 1`` instead; the caller fails a job past ``[worker] max_lease_expiries``).
    """
    reclaim = Job.state == JobState.RUNNING  # SET expressions see the row as it was before
    return _claim(s, Job, _job_ready, worker_id, lease_seconds,
                  {"state": JobState.RUNNING, "started_at": utcnow(),
                   "attempts": case((reclaim, Job.attempts), else_=Job.attempts + 1),
                   "lease_expiries": case((reclaim, Job.lease_expiries + 1), else_=Job.lease_expiries)})


def release_job(s: Session, job_id: int, worker_id: str, reason: str) -> bool:
    """Put a job that ``worker_id`` is running back in the queue without charging the attempt
    (the worker is stopping, not the job failing). False when the worker no longer holds it."""
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.claimed_by == worker_id, Job.state == JobState.RUNNING)
        .values(state=JobState.PENDING, attempts=Job.attempts - 1, claimed_by=None, lease_until=None,
                error=reason[:4000])
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


def claim_transfer(s: Session, worker_id: str, lease_seconds: float) -> Transfer | None:
    """Claim a due transfer whose destination is enabled (most urgent, then oldest), or one whose
    sender died."""
    return _claim(s, Transfer, _transfer_ready, worker_id, lease_seconds,
                  {"state": TransferState.SENDING, "attempts": Transfer.attempts + 1})


def job_claimable(s: Session) -> bool:
    """Whether ``claim_job`` would find a job: a read, so an idle worker's poll takes no write
    lock (SQLite); the claim itself, in a write transaction, decides."""
    return s.scalar(select(Job.id).where(_job_ready(utcnow())).limit(1)) is not None


def transfer_claimable(s: Session) -> bool:
    """Whether ``claim_transfer`` would find a transfer (a read; see ``job_claimable``)."""
    return s.scalar(select(Transfer.id).where(_transfer_ready(utcnow())).limit(1)) is not None


def renew_lease(s: Session, model, row_id: int, worker_id: str, lease_seconds: float) -> bool:
    """Extend a claim; False when the row was claimed by someone else meanwhile."""
    res = s.execute(
        update(model)
        .where(model.id == row_id, model.claimed_by == worker_id)
        .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


def count_by(s: Session, column) -> dict[str, int]:
    return {str(getattr(k, "value", k)): n for k, n in s.execute(select(column, func.count()).group_by(column))}
