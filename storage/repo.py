"""Repository functions. They take a ``Session`` and never commit: the caller owns the transaction.

Job and transfer claims are single ``UPDATE ... WHERE id = (SELECT ... LIMIT 1) RETURNING``
statements; on PostgreSQL the sub-select takes ``FOR UPDATE SKIP LOCKED`` so that any number
of workers and dispatchers on any number of hosts claim disjoint rows; on SQLite the write lock
taken at ``BEGIN IMMEDIATE`` serialises claims.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, func, insert, or_, select, update
from sqlalchemy import case
from sqlalchemy.orm import Session

from storage.models import (
    AssociationLog,
    AssociationResult,
    AuditEvent,
    Destination,
    Instance,
    Job,
    JobState,
    Series,
    Setting,
    Source,
    Study,
    StudyStatus,
    Transfer,
    TransferState,
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


def ensure_source(s: Session, ae_title: str, host: str | None = None, description: str | None = None) -> Source:
    row = s.scalar(select(Source).where(Source.ae_title == ae_title))
    if row is None:
        row = Source(ae_title=ae_title, host=host, description=description, enabled=True)
        s.add(row)
    return row


def ensure_destination(s: Session, name: str, ae_title: str, host: str, port: int, outputs: list[str],
                       tls: bool = False) -> Destination:
    """The destination ``name``, created with these values when new (an existing row is kept as the
    admin left it: the database wins over config.toml)."""
    row = s.scalar(select(Destination).where(Destination.name == name))
    if row is None:
        row = Destination(name=name, ae_title=ae_title, host=host, port=port, outputs=list(outputs), enabled=True,
                          tls=tls)
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


# Statements of the hot path, built once (building them per call costs more than running them).
_STUDY_ID = select(Study.id).where(Study.study_instance_uid == bindparam("uid"))
_SERIES_ROW = select(Series.id, Series.is_result).where(Series.series_instance_uid == bindparam("uid"))
_INSTANCE_ROW = select(Instance.id, Instance.sha256).where(Instance.sop_instance_uid == bindparam("uid"))
_INSTANCE_FIELDS = ("series_id", "sop_class_uid", "transfer_syntax_uid", "instance_number", "path", "size_bytes",
                    "sha256", "calling_ae", "association_id", "received_at")
_INSERT_INSTANCE = insert(Instance).values({f: bindparam(f) for f in ("sop_instance_uid", *_INSTANCE_FIELDS)})
_UPDATE_INSTANCE = update(Instance).where(Instance.id == bindparam("row_id")).values(
    {f: bindparam(f) for f in _INSTANCE_FIELDS})
_TOUCH_SERIES = update(Series).where(Series.id == bindparam("row_id")).values(
    instance_count=Series.instance_count + bindparam("added"), last_received_at=bindparam("now"),
    dirty=bindparam("dirty"))
_REOPEN_STUDY = update(Study).where(
    Study.id == bindparam("row_id"), Study.status.not_in([StudyStatus.RECEIVED, StudyStatus.PROCESSING])
).values(status=StudyStatus.RECEIVED, status_reason=None, updated_at=bindparam("now"))


def index_instance(s: Session, meta: InstanceMeta, relpath: str, size: int, sha256: str,
                   calling_ae: str | None, association_id: int | None) -> str:
    """Index a stored instance; returns "new", "duplicate" (same bytes) or "replaced".

    Duplicate SOP Instance UID policy: identical content is acknowledged and changes nothing;
    different content replaces the stored file (the newest wins) and marks the series for
    re-evaluation, so a corrected instance triggers a re-run.

    This is the listener's hot path (once per received instance): Core statements on known
    rows, the ORM only when a study or series is new.
    """
    now = utcnow()
    study_id = s.scalar(_STUDY_ID, {"uid": meta.study_instance_uid})
    if study_id is None:
        study = Study(study_instance_uid=meta.study_instance_uid, status=StudyStatus.RECEIVED)
        s.add(study)
        s.flush()
        study_id = study.id
    row = s.execute(_SERIES_ROW, {"uid": meta.series_instance_uid}).first()
    if row is None:
        series = Series(series_instance_uid=meta.series_instance_uid, study_id=study_id, modality=meta.modality,
                        series_number=meta.series_number, series_description=meta.series_description,
                        is_result=meta.is_result, instance_count=0)
        s.add(series)
        s.flush()
        series_id, is_result = series.id, meta.is_result
        _update_study_attributes(s, study_id, meta)
    else:
        series_id, is_result = row
    existing = s.execute(_INSTANCE_ROW, {"uid": meta.sop_instance_uid}).first()
    if existing is not None and existing.sha256 == sha256:
        return "duplicate"
    values = dict(series_id=series_id, sop_class_uid=meta.sop_class_uid, transfer_syntax_uid=meta.transfer_syntax_uid,
                  instance_number=meta.instance_number, path=relpath, size_bytes=size, sha256=sha256,
                  calling_ae=calling_ae, association_id=association_id, received_at=now)
    if existing is None:
        s.execute(_INSERT_INSTANCE, {"sop_instance_uid": meta.sop_instance_uid, **values})
    else:
        s.execute(_UPDATE_INSTANCE, {"row_id": existing.id, **values})
    s.execute(_TOUCH_SERIES, {"row_id": series_id, "added": 1 if existing is None else 0, "now": now,
                              "dirty": not is_result})
    if not is_result:
        s.execute(_REOPEN_STUDY, {"row_id": study_id, "now": now})
    return "new" if existing is None else "replaced"


def _update_study_attributes(s: Session, study_id: int, meta: InstanceMeta) -> None:
    """Patient/study attributes and the modality list, refreshed when a series first arrives."""
    study = s.get(Study, study_id)
    for attr in ("patient_name", "patient_id", "accession_number", "study_date", "study_description"):
        value = getattr(meta, attr)
        if value and getattr(study, attr) != value:
            setattr(study, attr, value)
    if meta.modality and not meta.is_result:
        mods = set(filter(None, (study.modalities or "").split("\\")))
        if meta.modality not in mods:
            study.modalities = "\\".join(sorted(mods | {meta.modality}))
    s.flush()


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
    sub = select(model.id).where(ready(now)).order_by(model.id).limit(1)
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


def claim_job(s: Session, worker_id: str, lease_seconds: float) -> Job | None:
    """Claim the oldest pending job, or a running one whose lease expired (its worker died).

    Attempts are charged only for the job's own failures: claiming a pending job starts a new
    attempt (``attempts + 1``); reclaiming a running job whose lease expired does not (the
    attempt that died with its worker is not charged: ``attempts`` stays and ``lease_expiries
    + 1`` instead; the caller fails a job past ``[worker] max_lease_expiries``).
    """

    def ready(now: datetime):
        return or_(Job.state == JobState.PENDING, (Job.state == JobState.RUNNING) & (Job.lease_until < now))

    reclaim = Job.state == JobState.RUNNING  # SET expressions see the row as it was before
    return _claim(s, Job, ready, worker_id, lease_seconds,
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
    """Claim a due transfer whose destination is enabled, or one whose sender died."""

    def ready(now: datetime):
        enabled = select(Destination.id).where(Destination.enabled.is_(True))
        return Transfer.destination_id.in_(enabled) & or_(
            (Transfer.state == TransferState.PENDING) & (Transfer.next_attempt_at <= now),
            (Transfer.state == TransferState.SENDING) & (Transfer.lease_until < now),
        )

    return _claim(s, Transfer, ready, worker_id, lease_seconds,
                  {"state": TransferState.SENDING, "attempts": Transfer.attempts + 1})


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
