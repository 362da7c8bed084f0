"""Inference jobs: queued, claimed, done, failed, put back, re-run, cancelled.

The one place that creates a ``Job`` row or changes its ``state`` (the claim and lease queries
themselves stay in ``storage.repo``, which this module calls). Every change of a job refreshes
its study's status (``app.studies.refresh_status``) in the same transaction; a user's action
(re-run, cancel) is audited beside it. Functions take the caller's session and never commit.

Callers: the scheduler (``queue``), the worker (``claim``, ``finish_done``, ``finish_failed``,
``release``), the web and the CLI (``rerun``, ``cancel``).
"""
from __future__ import annotations

import logging

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.app import studies, transfers
from dicom_node.app.errors import Conflict, NotFound
from storage import repo
from storage.models import Job, JobState, Series, utcnow

log = logging.getLogger(__name__)


def get(s: Session, job_id: int) -> Job:
    row = s.get(Job, job_id)
    if row is None:
        raise NotFound(f"job {job_id} not found")
    return row


def queue(s: Session, series: Series, key: str, *, priority: int = 0, routing: dict | None = None,
          replaces: int | None = None) -> Job:
    """A pending inference job for ``series`` under idempotency key ``key`` (the caller checked
    that none has it). Pending jobs of the series are cancelled first (the series changed before
    they ran). ``replaces``: the done job whose results this one supersedes (late arrivals)."""
    for old in s.scalars(select(Job).where(Job.series_id == series.id, Job.state == JobState.PENDING)):
        old.state, old.error = JobState.CANCELLED, "superseded: the series changed before the job ran"
        log.info("job %d cancelled: series %s changed", old.id, series.series_instance_uid)
    job = Job(series=series, kind="infer", idempotency_key=key, state=JobState.PENDING, replaces_job_id=replaces,
              priority=priority, routing=routing)
    s.add(job)
    s.flush()
    log.info("job %d queued for series %s (%d instances)%s", job.id, series.series_instance_uid,
             series.instance_count, f", a re-run replacing job {replaces}" if replaces else "")
    return job


def claim(s: Session, worker_id: str, lease_seconds: float, max_lease_expiries: int) -> tuple[Job | None, bool]:
    """Claim the next job for ``worker_id`` (``storage.repo.claim_job``). Returns (job, runnable):
    (None, False) when none is due; (job, False) when the job was reclaimed after an expired
    lease more than ``max_lease_expiries`` times and is failed here (a poison job that kills its
    worker every time); (job, True) otherwise, its study now "processing"."""
    job = repo.claim_job(s, worker_id, lease_seconds)
    if job is None:
        return None, False
    if job.lease_expiries > max_lease_expiries:
        job.state, job.finished_at, job.lease_until = JobState.FAILED, utcnow(), None
        job.error = (f"abandoned after the worker stopped {job.lease_expiries} times while processing it "
                     f"(killed, or out of memory); last error: {job.error or 'none'}")
        log.error("job %d: %s", job.id, job.error)
        s.flush()
        studies.refresh_status(s, job.series.study)
        return job, False
    if job.lease_expiries:
        log.warning("job %d: reclaimed after its worker stopped (%d time(s)); attempt not charged",
                    job.id, job.lease_expiries)
    studies.refresh_status(s, job.series.study)
    return job, True


def finish_done(s: Session, job: Job, result_rows: dict[str, list], inference_seconds: float) -> list:
    """The job is done: queue its results (``result_rows``: kind -> ResultObject rows, flushed)
    to the destinations routing chose, mark it done, refresh its study. Returns the transfers."""
    queued = transfers.queue_results(s, job, result_rows)
    job.state = JobState.DONE
    job.error = None
    job.finished_at = utcnow()
    job.lease_until = None
    job.inference_seconds = inference_seconds
    s.flush()
    studies.refresh_status(s, job.series.study)
    return queued


def finish_failed(s: Session, job_id: int, error: str, *, retry: bool) -> Job:
    """The attempt failed with ``error``: back to pending (``retry``; the attempt stays charged)
    or failed for good."""
    job = get(s, job_id)
    job.error = error[:4000]
    job.lease_until = None
    if retry:
        job.state = JobState.PENDING
        log.warning("job %d will be retried: %s", job_id, error)
    else:
        job.state = JobState.FAILED
        job.finished_at = utcnow()
        log.error("job %d failed: %s", job_id, error)
    s.flush()
    studies.refresh_status(s, job.series.study)
    return job


def release(s: Session, job_id: int, worker_id: str, reason: str) -> bool:
    """Put a running job back in the queue without charging its attempt (its worker is stopping).
    False when ``worker_id`` no longer holds it."""
    released = repo.release_job(s, job_id, worker_id, reason)
    if released:
        s.expire_all()
        studies.refresh_status(s, get(s, job_id).series.study)
    return released


def rerun(s: Session, actor: str, job_id: int) -> Job:
    """A new pending job for the same series and destinations, keyed ``<original key>:rerun:<n>``
    (unique). Audited as ``job.rerun``."""
    old = get(s, job_id)
    base = old.idempotency_key.split(":rerun:")[0]
    n = 1 + (s.scalar(select(func.count()).select_from(Job).where(
        Job.idempotency_key.startswith(base + ":rerun:", autoescape=True))) or 0)
    while s.scalar(select(Job.id).where(Job.idempotency_key == f"{base}:rerun:{n}")) is not None:
        n += 1
    job = Job(series_id=old.series_id, kind=old.kind, idempotency_key=f"{base}:rerun:{n}", state=JobState.PENDING,
              attempts=0, max_attempts=old.max_attempts or 3, priority=old.priority or 0,
              routing=old.routing)  # the same destinations as routing chose for the original
    s.add(job)
    s.flush()
    studies.refresh_of_series(s, old.series_id)
    repo.audit(s, actor, "job.rerun", str(job_id), {"new_job_id": job.id, "idempotency_key": job.idempotency_key})
    log.info("job %d queued by %s: a re-run of job %d", job.id, actor, job_id)
    return job


def cancel(s: Session, actor: str, job_id: int) -> Job:
    """A pending job is cancelled (a running one belongs to its worker: it finishes or fails).
    Audited as ``job.cancel``."""
    job = get(s, job_id)
    if job.state is not JobState.PENDING:
        raise Conflict(f"job {job_id} is {job.state.value}; only pending jobs can be cancelled")
    job.state, job.error, job.finished_at = JobState.CANCELLED, f"cancelled by {actor}", utcnow()
    s.flush()
    studies.refresh_status(s, job.series.study)
    repo.audit(s, actor, "job.cancel", str(job_id), {"previous_state": JobState.PENDING.value})
    return job
