"""The job and transfer queues as the API and the admin pages show them (read only)."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.web import schemas
from dicom_node.web.views.paging import enum_filter, page_of
from storage.models import Destination, Job, JobState, Role, Series, Study, Transfer, TransferState


def job_out(job: Job, series: Series | None = None, study_uid: str | None = None) -> schemas.JobOut:
    return schemas.JobOut(
        id=job.id, series_instance_uid=series.series_instance_uid if series else None,
        study_instance_uid=study_uid, kind=job.kind, idempotency_key=job.idempotency_key,
        state=job.state.value, attempts=job.attempts or 0, max_attempts=job.max_attempts or 0, error=job.error,
        inference_seconds=job.inference_seconds, created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at)


def transfer_out(t: Transfer, destination_name: str) -> schemas.TransferOut:
    return schemas.TransferOut(
        id=t.id, job_id=t.job_id, destination=destination_name, state=t.state.value, attempts=t.attempts or 0,
        next_attempt_at=t.next_attempt_at, error=t.error, kind=t.kind or "results", priority=t.priority or 0,
        objects=len(t.result_object_ids or []) + len(t.instance_ids or []),
        sent_objects=len(t.sent_sop_instance_uids or []), created_at=t.created_at, sent_at=t.sent_at,
        object_status=[schemas.TransferObjectOut(sop_instance_uid=uid, kind=v.get("kind"), state=v.get("state", "pending"),
                                                 reason=v.get("reason"), sent_as=v.get("sent_as"))
                       for uid, v in (t.object_status or {}).items()])


def list_transfers(s: Session, state: str | None, page: int, page_size: int) -> tuple[list[tuple[Transfer, str]], int]:
    rows, total = page_of(
        s, select(Transfer, Destination.name).join(Destination, Destination.id == Transfer.destination_id),
        Transfer, enum_filter(Transfer.state, TransferState, state, "state"), Transfer.id.desc(), page, page_size)
    return [(t, n) for t, n in rows], total


def list_jobs(s: Session, state: str | None, page: int, page_size: int) -> tuple[list[schemas.JobOut], int]:
    rows, total = page_of(
        s, select(Job, Series, Study.study_instance_uid).join(Series, Series.id == Job.series_id)
        .join(Study, Study.id == Series.study_id),
        Job, enum_filter(Job.state, JobState, state, "state"), Job.id.desc(), page, page_size)
    return [job_out(j, se, uid) for j, se, uid in rows], total


def visible_transfer_error(role: Role, error: str | None) -> str | None:
    """Delivery errors concern the administrator; a radiologist sees none (the state says enough)."""
    return error if role is Role.ADMIN else None
