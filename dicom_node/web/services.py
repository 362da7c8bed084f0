"""What the API and the pages do: admin changes, and the pipeline actions as calls of the
application layer (``dicom_node.app``: re-run, re-send, cancel, retry, complete now).

The read side (studies, findings, the job and transfer queues) lives in ``web.views``; its
names are re-exported here. Functions take a ``Session`` and never commit (the route does,
after the call succeeds). Every admin change is written to the audit trail (who, what, when) in
the same transaction as the change itself. ``ServiceError`` (``web.errors``) carries the HTTP
status the API answers with and a sentence the pages show as it is.
"""
from __future__ import annotations

import contextlib
import logging

from sqlalchemy import literal, select
from sqlalchemy.orm import Session

from dicom_node.app import jobs as app_jobs
from dicom_node.app import studies as app_studies
from dicom_node.app import transfers as app_transfers
from dicom_node.app.errors import Conflict, NotFound
from dicom_node.node import RUNTIME_KEYS, Node
from dicom_node.web import schemas
from storage import repo, users
from storage.models import (
    AssociationLog,
    AssociationResult,
    AuditEvent,
    Destination,
    FindingReview,
    FindingRow,
    Job,
    Source,
    Transfer,
    User,
    utcnow,
)

log = logging.getLogger(__name__)

# The read side (queries and presenters) lives in ``web.views``; these names stay importable
# from ``services`` for the routes and templates that use them.
from dicom_node.web.errors import ServiceError, not_found as _not_found  # noqa: E402
from dicom_node.web.views.paging import enum_filter, page_of  # noqa: E402
from dicom_node.web.views.queues import (  # noqa: E402,F401
    job_out,
    list_jobs,
    list_transfers,
    transfer_out,
    visible_transfer_error,
)
from dicom_node.web.views.studies import (  # noqa: E402,F401
    EXPORT_COLUMNS,
    MAX_PAGE_SIZE,
    SORTS,
    STATUS_LABELS,
    StudyQuery,
    _study_finding,
    export_csv,
    export_findings,
    finding_out,
    format_da,
    get_study,
    latest_done_job_ids,
    latest_job_ids,
    list_studies,
    patient_label,
    patient_name,
    review_counts,
    review_out,
    status_counts,
    study_detail,
    study_findings,
    study_summaries,
    study_summary,
    suspicion_level,
)

@contextlib.contextmanager
def app_errors():
    """The application layer's refusals as the HTTP answers: ``NotFound`` 404, ``Conflict`` 409."""
    try:
        yield
    except NotFound as exc:
        raise ServiceError(404, str(exc)) from None
    except Conflict as exc:
        raise ServiceError(409, str(exc)) from None


# --- findings reviews ------------------------------------------------------------------------------

def review_finding(s: Session, actor: str, study_uid: str, number: int, data: schemas.ReviewIn) -> FindingRow:
    """Record (or change) a reader's decision on nodule ``number`` of the study's latest results,
    with an audit event holding the previous decision."""
    f = _study_finding(s, study_uid, number)
    comment = (data.comment or "").strip() or None
    before = review_out(f.review)
    if f.review is None:
        f.review = FindingReview(decision=data.decision, comment=comment, reviewer=actor, reviewed_at=utcnow())
    else:
        f.review.decision, f.review.comment, f.review.reviewer = data.decision, comment, actor
        f.review.reviewed_at = utcnow()
    s.flush()
    repo.audit(s, actor, "finding.review", f"{study_uid}/{number}", {
        "finding_id": f.id, "job_id": f.job_id, "decision": data.decision, "comment": comment,
        "previous": before.decision if before else None})
    return f


# --- sources --------------------------------------------------------------------------------------

def source_out(row: Source) -> schemas.SourceOut:
    return schemas.SourceOut(id=row.id, ae_title=row.ae_title, host=row.host, description=row.description,
                             enabled=bool(row.enabled), return_to=list(row.return_to or []))


def list_sources(s: Session) -> list[Source]:
    return list(s.scalars(select(Source).order_by(Source.ae_title)))


def _source(s: Session, ae_title: str) -> Source:
    row = s.scalar(select(Source).where(Source.ae_title == ae_title))
    if row is None:
        raise _not_found(f"source {ae_title!r}")
    return row


def _check_return_to(s: Session, data: schemas.SourceIn) -> None:
    known = set(s.scalars(select(Destination.name)))
    unknown = [n for n in data.return_to if n not in known]
    if unknown:
        raise ServiceError(422, f"return_to names unknown destination(s) {unknown}; known: {sorted(known) or 'none'}")


def add_source(s: Session, actor: str, data: schemas.SourceIn) -> Source:
    if s.scalar(select(Source).where(Source.ae_title == data.ae_title)) is not None:
        raise ServiceError(409, f"source {data.ae_title!r} already exists")
    _check_return_to(s, data)
    row = Source(**data.model_dump())
    s.add(row)
    s.flush()
    repo.audit(s, actor, "source.add", data.ae_title, data.model_dump())
    return row


def update_source(s: Session, actor: str, ae_title: str, data: schemas.SourceIn) -> Source:
    row = _source(s, ae_title)
    if data.ae_title != ae_title and s.scalar(select(Source).where(Source.ae_title == data.ae_title)) is not None:
        raise ServiceError(409, f"source {data.ae_title!r} already exists")
    _check_return_to(s, data)
    before = source_out(row).model_dump(exclude={"id"})
    for k, v in data.model_dump().items():
        setattr(row, k, v)
    s.flush()
    repo.audit(s, actor, "source.update", ae_title, {"before": before, "after": data.model_dump()})
    return row


def remove_source(s: Session, actor: str, ae_title: str) -> None:
    row = _source(s, ae_title)
    s.delete(row)
    s.flush()
    repo.audit(s, actor, "source.remove", ae_title)


# --- destinations -----------------------------------------------------------------------------------

def destination_out(row: Destination) -> schemas.DestinationOut:
    return schemas.DestinationOut(id=row.id, name=row.name, ae_title=row.ae_title, host=row.host, port=row.port,
                                  outputs=list(row.outputs or []), enabled=bool(row.enabled), tls=bool(row.tls))


def list_destinations(s: Session) -> list[Destination]:
    return list(s.scalars(select(Destination).order_by(Destination.name)))


def get_destination(s: Session, name: str) -> Destination:
    row = s.scalar(select(Destination).where(Destination.name == name))
    if row is None:
        raise _not_found(f"destination {name!r}")
    return row


def add_destination(s: Session, actor: str, data: schemas.DestinationIn) -> Destination:
    if s.scalar(select(Destination).where(Destination.name == data.name)) is not None:
        raise ServiceError(409, f"destination {data.name!r} already exists")
    row = Destination(**data.model_dump())
    s.add(row)
    s.flush()
    repo.audit(s, actor, "destination.add", data.name, data.model_dump())
    return row


def update_destination(s: Session, actor: str, name: str, data: schemas.DestinationIn) -> Destination:
    row = get_destination(s, name)
    if data.name != name and s.scalar(select(Destination).where(Destination.name == data.name)) is not None:
        raise ServiceError(409, f"destination {data.name!r} already exists")
    before = destination_out(row).model_dump(exclude={"id"})
    for k, v in data.model_dump().items():
        setattr(row, k, v)
    s.flush()
    repo.audit(s, actor, "destination.update", name, {"before": before, "after": data.model_dump()})
    return row


def remove_destination(s: Session, actor: str, name: str) -> None:
    row = get_destination(s, name)
    s.delete(row)
    s.flush()
    repo.audit(s, actor, "destination.remove", name)


def echo_destination(node: Node, name: str, actor: str) -> schemas.EchoResult:
    """Test a destination through its kind (C-ECHO for "dicom", a QIDO-RS probe for "dicomweb")
    with the node's current AE title; the session is not held meanwhile."""
    from dicom_node import destinations

    with node.sessions() as s:
        target = destinations.Target.of(get_destination(s, name))
        calling = node.effective("node.ae_title", s)
    ctx = destinations.Context(calling_ae=calling, timeout=5.0, tls=node.settings.tls)
    outcome = destinations.kind_of(target).echo(target, ctx)
    log.info("echo of destination %s (%s, %s) by %s: %s", name, target.kind, target.describe(), actor,
             outcome.message)
    with node.sessions.begin() as s:
        repo.audit(s, actor, "destination.echo", name, {"ok": outcome.ok, "message": outcome.message})
    return schemas.EchoResult(ok=outcome.ok, kind=outcome.kind.value, message=outcome.message)


# --- transfers ---------------------------------------------------------------------------------------


def _transfer(s: Session, transfer_id: int) -> Transfer:
    row = s.get(Transfer, transfer_id)
    if row is None:
        raise _not_found(f"transfer {transfer_id}")
    return row


def retry_transfer(s: Session, actor: str, transfer_id: int) -> Transfer:
    """A failed or cancelled transfer goes back to pending, due now (``app.transfers.retry``)."""
    with app_errors():
        return app_transfers.retry(s, actor, transfer_id)


def cancel_transfer(s: Session, actor: str, transfer_id: int) -> Transfer:
    """``app.transfers.cancel``."""
    with app_errors():
        return app_transfers.cancel(s, actor, transfer_id)


# --- jobs ----------------------------------------------------------------------------------------------


def rerun_job(s: Session, actor: str, job_id: int) -> Job:
    """A new pending job for the same series, keyed ``<original key>:rerun:<n>`` (``app.jobs.rerun``)."""
    with app_errors():
        return app_jobs.rerun(s, actor, job_id)


def cancel_job(s: Session, actor: str, job_id: int) -> Job:
    """A pending job is cancelled (``app.jobs.cancel``)."""
    with app_errors():
        return app_jobs.cancel(s, actor, job_id)


def resend_job(s: Session, actor: str, job_id: int, destination_names: list[str] | None) -> list[Transfer]:
    """New pending transfers of the job's result objects, one per destination (``app.transfers.resend``)."""
    with app_errors():
        return app_transfers.resend(s, actor, job_id, destination_names)


def complete_now(s: Session, actor: str, study_uid: str, series_uid: str | None = None) -> list[str]:
    """"Complete now" (``app.studies.request_complete``): the Series Instance UIDs marked."""
    with app_errors():
        return app_studies.request_complete(s, actor, study_uid, series_uid)


# --- associations, audit --------------------------------------------------------------------------

def association_out(a: AssociationLog) -> schemas.AssociationOut:
    return schemas.AssociationOut(
        id=a.id, started_at=a.started_at, ended_at=a.ended_at, direction=a.direction, peer_host=a.peer_host,
        peer_port=a.peer_port, calling_ae=a.calling_ae, called_ae=a.called_ae, result=a.result.value,
        reason=a.reason, instances=a.instances or 0, duration_s=a.duration_s)


def list_associations(s: Session, result: str | None, page: int, page_size: int) -> tuple[list[AssociationLog], int]:
    rows, total = page_of(s, select(AssociationLog), AssociationLog,
                          enum_filter(AssociationLog.result, AssociationResult, result, "result"),
                          AssociationLog.id.desc(), page, page_size)
    return [a for (a,) in rows], total


def audit_out(a: AuditEvent) -> schemas.AuditOut:
    return schemas.AuditOut(id=a.id, at=a.at, actor=a.actor, action=a.action, target=a.target, detail=a.detail)


def list_audit(s: Session, page: int, page_size: int) -> tuple[list[AuditEvent], int]:
    rows, total = page_of(s, select(AuditEvent), AuditEvent, literal(True), AuditEvent.id.desc(), page, page_size)
    return [a for (a,) in rows], total


# --- users ---------------------------------------------------------------------------------------------

def user_out(u: User) -> schemas.UserOut:
    return schemas.UserOut(username=u.username, role=u.role.value, created_at=u.created_at)


def create_user(s: Session, actor: str, data: schemas.UserIn) -> User:
    from dicom_node.web.security import hash_password

    try:
        users.check_username(data.username)
        if users.get_user(s, data.username) is not None:
            raise ServiceError(409, f"user {data.username!r} already exists")
        row = users.add_user(s, data.username, data.role, hash_password(data.password))
    except (users.UserError, ValueError) as exc:
        if isinstance(exc, ServiceError):
            raise
        raise ServiceError(422, str(exc)) from None
    repo.audit(s, actor, "user.add", data.username, {"role": data.role})
    return row


def update_user(s: Session, actor: str, username: str, data: schemas.UserUpdate) -> User:
    from dicom_node.web.security import hash_password

    if users.get_user(s, username) is None:
        raise _not_found(f"user {username!r}")
    try:
        if data.role is not None:
            users.set_role(s, username, data.role)
        if data.password is not None:
            users.set_password_hash(s, username, hash_password(data.password))
    except (users.UserError, ValueError) as exc:
        raise ServiceError(409 if "last admin" in str(exc) else 422, str(exc)) from None
    detail = {}
    if data.role is not None:
        detail["role"] = data.role
    if data.password is not None:
        detail["password"] = "changed"
    repo.audit(s, actor, "user.update", username, detail)
    return users.get_user(s, username)


def delete_user(s: Session, actor: str, username: str) -> None:
    if users.get_user(s, username) is None:
        raise _not_found(f"user {username!r}")
    try:
        users.remove_user(s, username)
    except users.UserError as exc:
        raise ServiceError(409, str(exc)) from None
    repo.audit(s, actor, "user.remove", username)


# --- runtime settings -----------------------------------------------------------------------------------

def runtime_settings(node: Node, s: Session) -> dict:
    return {key: node.effective(key, s) for key in RUNTIME_KEYS}


def update_settings(node: Node, s: Session, actor: str, data: schemas.RuntimeSettings) -> dict:
    changes = data.changes()
    if not changes:
        raise ServiceError(422, "no setting given")
    before = runtime_settings(node, s)
    for key, value in changes.items():
        repo.set_setting(s, key, value)
    s.flush()
    repo.audit(s, actor, "settings.update", ",".join(sorted(changes)),
               {k: {"before": before.get(k), "after": v} for k, v in changes.items()})
    return runtime_settings(node, s)


