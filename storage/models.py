"""SQLAlchemy 2.0 typed models: the node's durable state.

Times are timezone-aware UTC. Paths in ``Instance.path`` and ``ResultObject.path`` are relative
to the node's data directory (see ``storage.filestore``), so a shared store can be mounted at
different places on different hosts.
"""
from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
)
from sqlalchemy import UniqueConstraint
from sqlalchemy.types import TypeDecorator
from sqlalchemy import false as sa_false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite returns naive values otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):  # noqa: ANN001
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return None if value is None else value.astimezone(timezone.utc)

    def process_result_value(self, value, dialect):  # noqa: ANN001
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    pass


def _enum(cls: type[enum.Enum]) -> Enum:
    # Stored as the value strings; no native DB enum type so migrations stay simple.
    return Enum(cls, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class StudyStatus(str, enum.Enum):
    """The AI status a radiologist sees on the worklist."""

    RECEIVED = "received"  # instances arriving, study not complete yet
    WAITING = "waiting"  # complete, job queued
    PROCESSING = "processing"
    DONE = "done"
    NOT_ELIGIBLE = "not_eligible"
    #: Routing decided no analysis (forwarded only, discarded, or no rule matched): see status_reason.
    NOT_ANALYSED = "not_analysed"
    FAILED = "failed"


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TransferState(str, enum.Enum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AssociationResult(str, enum.Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    ABORTED = "aborted"


class Role(str, enum.Enum):
    """A web account's role. ``sender`` may only store with STOW-RS (no pages, no reading)."""

    ADMIN = "admin"
    RADIOLOGIST = "radiologist"
    SENDER = "sender"


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    patient_name: Mapped[str | None] = mapped_column(Text)  # PN; see storage.limits
    patient_id: Mapped[str | None] = mapped_column(Text)  # LO
    accession_number: Mapped[str | None] = mapped_column(Text)  # SH
    study_date: Mapped[str | None] = mapped_column(Text, index=True)  # DICOM DA, YYYYMMDD
    study_description: Mapped[str | None] = mapped_column(Text)  # LO
    modalities: Mapped[str | None] = mapped_column(Text)  # backslash-joined, as DICOM
    status: Mapped[StudyStatus] = mapped_column(_enum(StudyStatus), default=StudyStatus.RECEIVED, index=True)
    status_reason: Mapped[str | None] = mapped_column(Text)
    findings_count: Mapped[int | None] = mapped_column(Integer)
    max_diameter_mm: Mapped[float | None] = mapped_column(Float)
    max_malignancy: Mapped[float | None] = mapped_column(Float, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all, delete-orphan")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    modality: Mapped[str | None] = mapped_column(Text)  # CS
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(Text)  # LO
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    # True while instances arrived since the scheduler last looked at the series.
    dirty: Mapped[bool] = mapped_column(Boolean, default=True, index=True)
    eligible: Mapped[bool | None] = mapped_column(Boolean)
    eligibility_reason: Mapped[str | None] = mapped_column(Text)
    # Our own results (SR/SEG we produced and may be sent back) are never analysed.
    is_result: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The latest routing decision (``dicom_node.routing``): whether analysis was decided (None:
    #: not decided yet, or decided before routing existed), and its one-line summary with reasons.
    route_analyse: Mapped[bool | None] = mapped_column(Boolean)
    route_summary: Mapped[str | None] = mapped_column(Text)
    #: Discard decided while other actions still need the instances: deleted once they are done.
    discard_pending: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    #: "Complete now" (admin): evaluate at the next pass, open associations and quiet period aside.
    complete_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", cascade="all, delete-orphan")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(512))  # relative to data_dir
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    association_id: Mapped[int | None] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: sha256 of the decoded pixel data (``dicom_node.content``), computed by the scheduler (the
    #: listener never decodes), and the file ``sha256`` it was computed from (a cache key).
    pixel_sha256: Mapped[str | None] = mapped_column(String(64))
    pixel_of_sha256: Mapped[str | None] = mapped_column(String(64))

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """A unit of work for the worker: run the model on one series.

    ``idempotency_key`` identifies (series content, model version): a resend of identical
    instances maps to the same key and creates no new job.
    Claimed with a lease: a worker that dies leaves ``lease_until`` in the past and the job is
    claimed again.
    """

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32), default="infer")
    #: Higher first (``dicom_node.routing.PRIORITIES``: urgent 10, routine 0); claims order by it.
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0", index=True)
    #: Where the results go, decided by routing: ``{"destinations": {"<destination id>": [outputs]},
    #: "rules": [names]}``; None (jobs from before routing): every enabled destination, its outputs.
    routing: Mapped[dict | None] = mapped_column(JSON)
    idempotency_key: Mapped[str] = mapped_column(String(128), unique=True)
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    #: Times the job was reclaimed after its lease expired (its worker died or was killed); not
    #: charged as attempts, capped separately by ``[worker] max_lease_expiries`` (poison jobs).
    lease_expiries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)
    inference_seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: A re-run after late arrivals: the job whose results this one replaces (its SR is named in
    #: this job's SR Predecessor Documents Sequence).
    replaces_job_id: Mapped[int | None] = mapped_column(Integer)

    series: Mapped[Series] = relationship()
    findings: Mapped[list[FindingRow]] = relationship(back_populates="job", cascade="all, delete-orphan")
    results: Mapped[list[ResultObject]] = relationship(back_populates="job", cascade="all, delete-orphan")


class FindingRow(Base):
    """One nodule found by a job. Centre in LPS millimetres."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)  # 1-based nodule number: SR tracking id "Nodule <n>"
    segment_number: Mapped[int | None] = mapped_column(Integer)  # its SEG segment (None: no mask, or older rows)
    tracking_uid: Mapped[str | None] = mapped_column(String(64))
    center_x_mm: Mapped[float] = mapped_column(Float)
    center_y_mm: Mapped[float] = mapped_column(Float)
    center_z_mm: Mapped[float] = mapped_column(Float)
    center_voxel: Mapped[list | None] = mapped_column(JSON)  # (z, y, x) in the source series volume
    diameter_mm: Mapped[float] = mapped_column(Float)
    volume_mm3: Mapped[float] = mapped_column(Float)
    malignancy: Mapped[float] = mapped_column(Float)
    score: Mapped[float] = mapped_column(Float)
    location: Mapped[str | None] = mapped_column(String(64))  # side / lobe if known

    job: Mapped[Job] = relationship(back_populates="findings")
    review: Mapped[FindingReview | None] = relationship(back_populates="finding", uselist=False,
                                                         cascade="all, delete-orphan", passive_deletes=True)


class ReviewDecision(str, enum.Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"


class FindingReview(Base):
    """A reader's current decision on one finding (the audit trail keeps every change)."""

    __tablename__ = "finding_reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    finding_id: Mapped[int] = mapped_column(ForeignKey("findings.id", ondelete="CASCADE"), unique=True)
    decision: Mapped[str] = mapped_column(String(16))  # ReviewDecision value
    comment: Mapped[str | None] = mapped_column(Text)
    reviewer: Mapped[str] = mapped_column(String(64))  # user name
    reviewed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    finding: Mapped[FindingRow] = relationship(back_populates="review")


class ResultObject(Base):
    """A DICOM object the node wrote (SR, SEG, key image)."""

    __tablename__ = "result_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "sr", "seg", "sc"
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))  # relative to data_dir

    job: Mapped[Job] = relationship(back_populates="results")


class Transfer(Base):
    """The results of one job to one destination, or (``kind`` "originals") received instances of
    one series forwarded to one destination (``instance_ids``, no job).

    ``sent_sop_instance_uids`` lists the objects the peer acknowledged with Success (or a
    warning); a retry sends only the rest. ``state`` is SENT only when all were acknowledged.
    """

    __tablename__ = "transfers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    destination_id: Mapped[int] = mapped_column(ForeignKey("destinations.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="results", server_default="results")
    series_id: Mapped[int | None] = mapped_column(
        ForeignKey("series.id", ondelete="CASCADE", name="fk_transfers_series_id_series"), index=True)
    instance_ids: Mapped[list | None] = mapped_column(JSON)  # kind "originals": Instance ids
    #: Higher first, like ``Job.priority``.
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0", index=True)
    result_object_ids: Mapped[list] = mapped_column(JSON, default=list)
    sent_sop_instance_uids: Mapped[list] = mapped_column(JSON, default=list)
    state: Mapped[TransferState] = mapped_column(_enum(TransferState), default=TransferState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: SOP Instance UID -> {"kind", "state" (pending|sent|failed), "reason", "sent_as"}: the
    #: per-object status (``dicom_node.destinations``), shown on the queues page.
    object_status: Mapped[dict | None] = mapped_column(JSON)

    destination: Mapped[Destination] = relationship()
    job: Mapped[Job | None] = relationship()
    series: Mapped[Series | None] = relationship()


class Source(Base):
    """A calling AE title allowed to send to the node (optionally only from one host)."""

    __tablename__ = "sources"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16), unique=True)
    host: Mapped[str | None] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(String(255))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    #: Destination names that "sender" means for this source (routing); empty: every destination.
    return_to: Mapped[list | None] = mapped_column(JSON, default=list)
    #: Completion policy of this source: seconds without a new instance before a series it sent
    #: is complete; None: ``[completion] quiet_seconds``. A matching rule's own value wins.
    quiet_seconds: Mapped[float | None] = mapped_column(Float)


class Destination(Base):
    """A peer the node sends results to with C-STORE."""

    __tablename__ = "destinations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    outputs: Mapped[list] = mapped_column(JSON, default=lambda: ["sr", "seg"])
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    #: DICOM TLS (PS3.15 Annex B) with the node's [tls] client identity and trust.
    tls: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    #: The destination kind (``dicom_node.destinations.KINDS``): "dicom" (C-STORE) or "dicomweb"
    #: (STOW-RS to ``url``, the DICOMweb base URL).
    kind: Mapped[str] = mapped_column(String(16), default="dicom", server_default="dicom")
    url: Mapped[str | None] = mapped_column(Text)
    #: Kind options: ``auth_header`` / ``auth_header_env`` (DICOMweb), ``sr_fallback``
    #: ("comprehensive" or "fail") for a peer that accepts no Comprehensive 3D SR.
    options: Mapped[dict | None] = mapped_column(JSON)


class AssociationLog(Base):
    """Audit of every association, accepted or rejected."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    direction: Mapped[str] = mapped_column(String(8), default="in")  # "in" (SCP) or "out" (SCU)
    peer_host: Mapped[str | None] = mapped_column(String(255))
    peer_port: Mapped[int | None] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    called_ae: Mapped[str | None] = mapped_column(String(16))
    result: Mapped[AssociationResult] = mapped_column(_enum(AssociationResult))
    reason: Mapped[str | None] = mapped_column(Text)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    duration_s: Mapped[float | None] = mapped_column(Float)
    #: ``host:pid`` of the listener holding an inbound association (see ``stage_heartbeats``).
    listener: Mapped[str | None] = mapped_column(String(128))


class Setting(Base):
    """Runtime settings changed in the admin UI/API/CLI; they override config.toml."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[object] = mapped_column(JSON)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(_enum(Role))
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AuditEvent(Base):
    """Who changed what, when (admin changes)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(255))
    detail: Mapped[dict | None] = mapped_column(JSON)


class RoutingRule(Base):
    """One routing rule (``dicom_node.routing.rules.Rule``), evaluated in ``position`` order.

    ``definition`` holds the rule's fields except name, position and enabled, as the API
    writes them (match, actions, destinations, outputs, level, quiet_seconds, priority, ...).
    """

    __tablename__ = "routing_rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    position: Mapped[int] = mapped_column(Integer, index=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    definition: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class RoutingDecision(Base):
    """What routing decided for a series, and why (every rule's result), when."""

    __tablename__ = "routing_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    matched: Mapped[list] = mapped_column(JSON, default=list)  # rule names
    actions: Mapped[list] = mapped_column(JSON, default=list)
    destinations: Mapped[list] = mapped_column(JSON, default=list)  # destination names
    summary: Mapped[str] = mapped_column(Text)
    detail: Mapped[dict] = mapped_column(JSON)  # per rule: matched, failed conditions


class WebSession(Base):
    """A signed-in page session (cookie) or an API bearer token, revocable on the server.

    Only a SHA-256 digest of the secret is stored (``token_hash``), so the table does not hold
    usable credentials. A session is valid while ``revoked_at`` is empty and ``expires_at`` is
    in the future; logout revokes one, a password change or removal all of a user's.
    ``last_seen_at`` is refreshed at most every few minutes (see ``dicom_node.web.login``).
    """

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # "page" (cookie) or "api" (bearer token)
    client_host: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
class StageHeartbeat(Base):
    """A running stage process: written every few seconds by the stage, read by ``/healthz``.

    One row per (stage, identity); ``identity`` is ``host:pid``. A process that stops cleanly
    deletes its row; rows of killed processes go stale and are pruned after an hour.
    """

    __tablename__ = "stage_heartbeats"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    stage: Mapped[str] = mapped_column(String(16), index=True)
    identity: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (UniqueConstraint("stage", "identity", name="uq_stage_heartbeats_stage_identity"),)


__all__ = [n for n in dir() if not n.startswith("_")]
