"""The job queue, re-run, re-send and cancel.

Re-run and re-send are study-page actions, so radiologists may use them as well as admins;
listing the queue and cancelling a pending job are for admins. Each is one call of the
application layer (``dicom_node.app``) through ``web.services``.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, status

from dicom_node.web import schemas, services
from dicom_node.web.deps import DB, AdminUser, AnyUser, PageNumber, RowId

router = APIRouter(prefix="/api/jobs", tags=["queues"])


@router.get("", response_model=schemas.JobPage, summary="List jobs, newest first")
def list_jobs(s: DB, user: AdminUser,
              state: Annotated[str | None, Query(description="pending, running, done, failed, cancelled")] = None,
              page: PageNumber = 1,
              page_size: Annotated[int, Query(ge=1, le=services.MAX_PAGE_SIZE)] = 50) -> schemas.JobPage:
    rows, total = services.list_jobs(s, state, page, page_size)
    return schemas.JobPage(items=rows, total=total, page=page, page_size=page_size)


@router.post("/{job_id}/rerun", response_model=schemas.JobOut, status_code=status.HTTP_201_CREATED,
             summary="Queue a new job for the same series (new idempotency key '<key>:rerun:<n>')")
def rerun(job_id: RowId, s: DB, user: AnyUser) -> schemas.JobOut:
    job = services.rerun_job(s, user.username, job_id)
    s.commit()
    return services.job_out(job)


@router.post("/{job_id}/resend", response_model=list[schemas.TransferOut], status_code=status.HTTP_201_CREATED,
             summary="Queue new transfers of the job's result objects (default: every enabled destination)")
def resend(job_id: RowId, s: DB, user: AnyUser,
           body: Annotated[schemas.ResendIn | None, Body()] = None) -> list[schemas.TransferOut]:
    created = services.resend_job(s, user.username, job_id, body.destinations if body else None)
    s.commit()
    return [services.transfer_out(t, t.destination.name) for t in created]


@router.post("/{job_id}/cancel", response_model=schemas.JobOut, summary="Cancel a pending job (admin; audited)")
def cancel(job_id: RowId, s: DB, user: AdminUser) -> schemas.JobOut:
    job = services.cancel_job(s, user.username, job_id)
    s.commit()
    return services.job_out(job)
