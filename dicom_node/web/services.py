"""What the API and the pages do besides reading: the pipeline actions (re-run, re-send, cancel,
retry, complete now), a finding's review and a destination's echo, as calls of the application
layer (``dicom_node.app``), which writes every change and its audit record. Admin changes
(sources, destinations, users, runtime settings, rules) are called by the routes straight from
``dicom_node.app``.

The read side (studies, findings, the job and transfer queues) lives in ``web.views``; its
names are re-exported here. Functions take a ``Session`` and never commit (the route does,
after the call succeeds). ``ServiceError`` (``web.errors``) carries the HTTP status the API
answers with and a sentence the pages show as it is; ``app_errors`` turns the application
layer's refusals into it.
"""
from __future__ import annotations

import contextlib
import logging

from sqlalchemy import literal, select
from sqlalchemy.orm import Session

from dicom_node.app import destinations as app_destinations
from dicom_node.app import findings as app_findings
from dicom_node.app import jobs as app_jobs
from dicom_node.app import studies as app_studies
from dicom_node.app import transfers as app_transfers
from dicom_node.app.errors import AppError
from dicom_node.node import Node
from dicom_node.web import schemas
from storage.models import AssociationLog, AssociationResult, AuditEvent, FindingRow, Job, Transfer

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
    """The application layer's refusals as the HTTP answers: ``NotFound`` 404, ``Conflict`` 409,
    ``Invalid`` 422 (``AppError.status``)."""
    try:
        yield
    except AppError as exc:
        raise ServiceError(exc.status, str(exc)) from None


# --- findings reviews ------------------------------------------------------------------------------

def review_finding(s: Session, actor: str, study_uid: str, number: int, data: schemas.ReviewIn) -> FindingRow:
    """Record (or change) a reader's decision on nodule ``number`` of the study's latest results
    (``app.findings.review``, audited with the previous decision)."""
    return app_findings.review(s, actor, _study_finding(s, study_uid, number), f"{study_uid}/{number}",
                               data.decision, data.comment)


# --- destinations -----------------------------------------------------------------------------------

def echo_destination(node: Node, name: str, actor: str) -> schemas.EchoResult:
    """Test a destination through its kind (C-ECHO for "dicom", a QIDO-RS probe for "dicomweb")
    with the node's current AE title; the session is not held meanwhile."""
    from dicom_node import destinations

    with node.sessions() as s:
        with app_errors():
            target = destinations.Target.of(app_destinations.get(s, name))
        calling = node.effective("node.ae_title", s)
    ctx = destinations.Context(calling_ae=calling, timeout=5.0, tls=node.settings.tls)
    outcome = destinations.kind_of(target).echo(target, ctx)
    log.info("echo of destination %s (%s, %s) by %s: %s", name, target.kind, target.describe(), actor,
             outcome.message)
    with node.sessions.begin() as s:
        app_destinations.record_echo(s, actor, name, outcome.ok, outcome.message)
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
