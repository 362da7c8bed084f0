"""schedule: decide what happens to a series once it is complete.

Contract: a series is complete when no inbound association delivering it is still open and
then no instance has arrived for ``[completion] quiet_seconds`` (re-read on every pass), or when
an administrator asked "complete now" (``dicom_node.completion``; every pass takes the current
time ``now`` as an argument). Its eligibility for the nodule model is decided from the stored
headers (axial CT, consistent geometry, no missing slice, sensible spacing; CR/DX "not eligible
yet") and recorded with its reason. An eligible series gets one inference job whose
idempotency key rests on content (``dicom_node.content``: model version, rule, every SOP
Instance UID with the hash of its decoded pixel data): a resend in any transfer syntax creates
no job; a new or changed instance creates a new one, or nothing when the late-arrival policy
says "ignore". A re-run names the job it replaces. The study's AI status is derived from its
series and jobs (``refresh_study_status``).
"""
from __future__ import annotations

import logging
import threading
from datetime import datetime

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node import completion
from dicom_node.content import content_key, pixel_digest
from dicom_node.node import Node
from dicom_node.volume import series_problem
from storage.models import Job, JobState, Series, Study, StudyStatus, utcnow

log = logging.getLogger(__name__)


def idempotency_key(model_version: str, instances: list[tuple[str, str]], rule: str = "") -> str:
    """The job key: ``content.content_key`` over (SOP Instance UID, decoded-pixel sha256) pairs."""
    return content_key(model_version, rule, instances)


def _digests(node: Node, series: Series) -> dict[int, tuple[str, str]]:
    """instance id -> (file sha256, decoded-pixel sha256) for instances whose cached digest is
    missing or stale. Decodes pixels: called outside the write transaction."""
    out = {}
    for i in series.instances:
        if i.pixel_sha256 is None or i.pixel_of_sha256 != i.sha256:
            out[i.id] = (i.sha256, pixel_digest(node.store.path(i.path)))
    return out


def _headers(node: Node, series: Series) -> list:
    return [dcmread(node.store.path(i.path), stop_before_pixels=True) for i in series.instances]


def evaluate_series(node: Node, s: Session, series: Series, model_version: str,
                    headers: list | None = None, digests: dict | None = None, *, rule: str = "",
                    late: str | None = None) -> Job | None:
    """Record eligibility; create the job if eligible and not already done for this content.

    ``headers``: the series' stored headers when the caller read them already (outside the
    write transaction); read here otherwise. ``digests``: decoded-pixel digests computed by the
    caller (``_digests``). ``rule``: the routing rule asking for the analysis (part of the key);
    ``late``: its late-arrival policy ("rerun" | "ignore"; None: the source's, else
    ``[completion] late``)."""
    series.dirty = False
    series.complete_requested = False
    try:
        headers = _headers(node, series) if headers is None else headers
    except Exception as exc:  # noqa: BLE001 - an unreadable stored file
        series.eligible, series.eligibility_reason = False, f"stored instance unreadable: {exc}"
        return None
    problem = series_problem(
        headers,
        min_slices=int(node.effective("eligibility.min_slices", s)),
        max_slice_spacing_mm=float(node.effective("eligibility.max_slice_spacing_mm", s)),
        max_slice_thickness_mm=float(node.effective("eligibility.max_slice_thickness_mm", s)),
    )
    if problem is not None:
        series.eligible, series.eligibility_reason = False, problem
        log.info("series %s not eligible: %s", series.series_instance_uid, problem)
        return None
    series.eligible, series.eligibility_reason = True, None
    try:
        digests = dict(digests or {})
        for i in series.instances:
            if i.id not in digests and (i.pixel_sha256 is None or i.pixel_of_sha256 != i.sha256):
                digests[i.id] = (i.sha256, pixel_digest(node.store.path(i.path)))
    except Exception as exc:  # noqa: BLE001 - pixel data that does not decode
        series.eligible, series.eligibility_reason = False, f"pixel data cannot be decoded: {type(exc).__name__}: {exc}"
        return None
    for i in series.instances:
        if i.id in digests and digests[i.id][0] == i.sha256:
            i.pixel_sha256, i.pixel_of_sha256 = digests[i.id][1], i.sha256
    key = idempotency_key(model_version, [(i.sop_instance_uid, i.pixel_sha256) for i in series.instances], rule)
    if s.scalar(select(Job.id).where(Job.idempotency_key == key)) is not None:
        log.info("series %s: same content as an earlier job (any transfer syntax): no new job",
                 series.series_instance_uid)
        return None
    previous = s.scalar(select(Job).where(Job.series_id == series.id, Job.state == JobState.DONE)
                        .order_by(Job.id.desc()).limit(1))
    replaces = None
    if previous is not None:
        policy = completion.late_policy(node.settings.completion.late, _source_late(node, series), late)
        if policy == "ignore":
            series.eligibility_reason = (f"late arrival ignored (policy 'ignore'): the results of job {previous.id} "
                                         "stand")
            log.info("series %s changed after job %d: ignored (late-arrival policy)", series.series_instance_uid,
                     previous.id)
            return None
        replaces = previous.id
    for old in s.scalars(select(Job).where(Job.series_id == series.id, Job.state == JobState.PENDING)):
        old.state, old.error = JobState.CANCELLED, "superseded: the series changed before the job ran"
        log.info("job %d cancelled: series %s changed", old.id, series.series_instance_uid)
    job = Job(series=series, kind="infer", idempotency_key=key, state=JobState.PENDING, replaces_job_id=replaces)
    s.add(job)
    s.flush()
    log.info("job %d queued for series %s (%d instances)%s", job.id, series.series_instance_uid,
             series.instance_count, f", a re-run replacing job {replaces}" if replaces else "")
    return job


def _source_late(node: Node, series: Series) -> str | None:
    """The ``late`` policy of the source (calling AE) that sent the series' newest instance."""
    newest = max(series.instances, key=lambda i: i.received_at, default=None)
    ae = newest.calling_ae if newest is not None else None
    for src in node.settings.sources:
        if src.ae_title == ae:
            return src.late
    return None


def refresh_study_status(s: Session, study: Study) -> None:
    """Derive the study's AI status and summary from its series and their latest jobs."""
    series = [x for x in study.series if not x.is_result]
    if any(x.dirty for x in series):
        study.status, study.status_reason = StudyStatus.RECEIVED, None
        return
    latest = []
    for x in series:
        job = s.scalar(select(Job).where(Job.series_id == x.id).order_by(Job.id.desc()).limit(1))
        if job is not None:
            latest.append(job)
    states = {j.state for j in latest}
    if JobState.RUNNING in states:
        study.status, study.status_reason = StudyStatus.PROCESSING, None
    elif JobState.PENDING in states:
        study.status, study.status_reason = StudyStatus.WAITING, None
    elif JobState.DONE in states:
        done = [j for j in latest if j.state is JobState.DONE]
        findings = [f for j in done for f in j.findings]
        study.status, study.status_reason = StudyStatus.DONE, None
        study.findings_count = len(findings)
        study.max_diameter_mm = max((f.diameter_mm for f in findings), default=None)
        study.max_malignancy = max((f.malignancy for f in findings), default=None)
    elif JobState.FAILED in states:
        study.status = StudyStatus.FAILED
        study.status_reason = "; ".join(j.error or "failed" for j in latest if j.state is JobState.FAILED)[:2000]
    elif series and all(x.eligible is False for x in series):
        study.status = StudyStatus.NOT_ELIGIBLE
        reasons = sorted({f"{x.modality or '?'} series {x.series_number or ''}: {x.eligibility_reason}".replace("  ", " ")
                          for x in series})
        study.status_reason = "; ".join(reasons)[:2000]


def _due(node: Node, s: Session, now: datetime, limit: int):
    return completion.due_series(now, float(node.effective("completion.quiet_seconds", s)),
                                 node.settings.completion.max_open_seconds, node.settings.node.stage_stale_seconds,
                                 limit)


def schedule_once(node: Node, model_version: str, limit: int = 20, *, now: datetime | None = None) -> int:
    """One pass at time ``now`` (UTC; the clock when None): evaluate up to ``limit`` complete
    series. Returns how many were evaluated.

    The stored headers are read, and new instances' pixels decoded and hashed, in a read
    session first, so the write transaction (the SQLite write lock, which the listener needs
    for every instance) lasts only as long as the decisions take; an idle pass takes no write
    lock at all.
    """
    now = now or utcnow()
    with node.sessions() as s:
        prepared = {}
        for series in s.scalars(_due(node, s, now, limit)).all():
            try:
                headers = _headers(node, series)
            except Exception:  # noqa: BLE001 - read again (and recorded) in the write transaction
                headers = None
            try:
                digests = _digests(node, series)
            except Exception:  # noqa: BLE001 - decoded again (and recorded) in the write transaction
                digests = None
            prepared[series.id] = (series.last_received_at, series.instance_count, headers, digests)
    if not prepared:
        return 0
    with node.sessions.begin() as s:
        due = s.scalars(_due(node, s, now, limit)).all()
        for series in due:
            stamp, count, headers, digests = prepared.get(series.id, (None, None, None, None))
            if (stamp, count) != (series.last_received_at, series.instance_count):
                headers = None  # instances arrived since the headers were read
            evaluate_series(node, s, series, model_version, headers, digests)
        for study in {x.study for x in due}:
            refresh_study_status(s, study)
        return len(due)


def run_scheduler(node: Node, stop: threading.Event, model_version: str, poll_seconds: float = 1.0) -> None:
    log.info("scheduler running (model %s)", model_version)
    from dicom_node.retention import start_retention

    start_retention(node, stop)  # [retention], when enabled: its own loop in a thread of this stage
    while not stop.is_set():
        try:
            n = schedule_once(node, model_version)
        except Exception:  # noqa: BLE001 - keep the loop alive; the database may be restarting
            log.exception("scheduler pass failed")
            n = 0
        if n == 0:
            stop.wait(poll_seconds)


