"""schedule: decide what happens to a series once it is complete.

Contract: a series is complete when no instance has arrived for ``[completion] quiet_seconds``
(re-read on every pass), or for the ``quiet_seconds`` of the routing rules it matches (with
``level = "study"``: when every series of its study is). Its eligibility for the nodule model is
decided from the stored headers (axial CT, consistent geometry, no missing slice, sensible
spacing; CR/DX "not eligible yet") and recorded with its reason. Routing (``dicom_node.routing``)
then decides what happens to it (analyse, forward the originals, discard; to which destinations)
and records why; forwards and discards are routing's. A series routing sends to analysis, if
eligible, gets one inference job (with the rule's priority and destinations) whose
idempotency key is the hash of (model version, every SOP Instance UID and file hash): a resend
of identical instances creates no job; a new or changed instance creates a new one. The study's
AI status is derived from its series and jobs (``refresh_study_status``).
"""
from __future__ import annotations

import hashlib
import logging
import threading
from datetime import datetime, timedelta

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.node import Node
from dicom_node.retention import remove_files
from dicom_node.routing.apply import has_pending_discards, job_routing, route_series, sweep_discards
from dicom_node.routing.store import load_rules
from dicom_node.volume import series_problem
from storage.models import Job, JobState, Series, Study, StudyStatus, utcnow

log = logging.getLogger(__name__)


def idempotency_key(model_version: str, instances: list[tuple[str, str]]) -> str:
    """sha256 over the model version and the sorted (SOP Instance UID, file sha256) pairs."""
    h = hashlib.sha256(model_version.encode())
    for uid, sha in sorted(instances):
        h.update(f"\n{uid}:{sha}".encode())
    return h.hexdigest()


def _headers(node: Node, series: Series) -> list:
    return [dcmread(node.store.path(i.path), stop_before_pixels=True) for i in series.instances]


def evaluate_series(node: Node, s: Session, series: Series, model_version: str,
                    headers: list | None = None, now: datetime | None = None,
                    unlink: list[str] | None = None) -> Job | None:
    """Record eligibility, let routing decide (``dicom_node.routing``), and create the job when
    routing says analyse, the series is eligible, and no job was done for this content.

    ``headers``: the series' stored headers when the caller read them already (outside the
    write transaction); read here otherwise. ``unlink`` collects files to remove after the
    commit (a discarded series). A series not complete under its rule's completion policy yet
    stays dirty, undecided."""
    series.dirty = False
    try:
        headers = _headers(node, series) if headers is None else headers
        problem = series_problem(
            headers,
            min_slices=int(node.effective("eligibility.min_slices", s)),
            max_slice_spacing_mm=float(node.effective("eligibility.max_slice_spacing_mm", s)),
            max_slice_thickness_mm=float(node.effective("eligibility.max_slice_thickness_mm", s)),
        )
    except Exception as exc:  # noqa: BLE001 - an unreadable stored file
        headers, problem = [], f"stored instance unreadable: {exc}"
    series.eligible, series.eligibility_reason = problem is None, problem
    decision, paths = route_series(node, s, series, headers[0] if headers else None, now=now,
                                   quiet_default=float(node.effective("completion.quiet_seconds", s)))
    if decision is None:
        series.dirty = True  # complete later, under the matching rule's policy
        return None
    if unlink is not None:
        unlink.extend(paths)
    if problem is not None:
        log.info("series %s not eligible: %s", series.series_instance_uid, problem)
    if not decision.analyse or problem is not None:
        return None
    if decision.late_arrivals == "ignore" and s.scalar(
            select(Job.id).where(Job.series_id == series.id, Job.state == JobState.DONE).limit(1)) is not None:
        log.info("series %s: late arrivals ignored by its rule: no new job", series.series_instance_uid)
        return None
    key = idempotency_key(model_version, [(i.sop_instance_uid, i.sha256) for i in series.instances])
    if s.scalar(select(Job.id).where(Job.idempotency_key == key)) is not None:
        log.info("series %s unchanged since its last job: no new job", series.series_instance_uid)
        return None
    job = Job(series=series, kind="infer", idempotency_key=key, state=JobState.PENDING,
              priority=decision.priority, routing=job_routing(decision))
    s.add(job)
    s.flush()
    log.info("job %d queued for series %s (%d instances)", job.id, series.series_instance_uid, series.instance_count)
    return job


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
    elif series and all(x.eligible is False and x.route_analyse is not False for x in series):
        study.status = StudyStatus.NOT_ELIGIBLE
        reasons = sorted({f"{x.modality or '?'} series {x.series_number or ''}: {x.eligibility_reason}".replace("  ", " ")
                          for x in series})
        study.status_reason = "; ".join(reasons)[:2000]
    elif series and all(x.route_analyse is False or x.eligible is False for x in series):
        # Routing decided no analysis (forwarded, discarded, no rule matched): say what and why.
        study.status = StudyStatus.NOT_ANALYSED
        reasons = sorted({f"{x.modality or '?'} series {x.series_number or ''}: "
                          f"{x.route_summary if x.route_analyse is False else x.eligibility_reason}".replace("  ", " ")
                          for x in series})
        study.status_reason = "; ".join(reasons)[:2000]


def _due(quiet: float, limit: int, now: datetime):
    return (select(Series)
            .where(Series.dirty.is_(True), Series.is_result.is_(False),
                   Series.last_received_at <= now - timedelta(seconds=quiet))
            .order_by(Series.last_received_at)
            .limit(limit))


def _shortest_quiet(s: Session, quiet: float) -> float:
    """The shortest quiet period of the default and of the stored rules' completion policies."""
    return min([quiet] + [r.quiet_seconds for r in load_rules(s) if r.enabled and r.quiet_seconds is not None])


def schedule_once(node: Node, model_version: str, limit: int = 20, now: datetime | None = None) -> int:
    """One pass: evaluate up to ``limit`` complete series. Returns how many were evaluated.

    The stored headers are read in a read session first, so the write transaction (the SQLite
    write lock, which the listener needs for every instance) lasts only as long as the
    decisions take; an idle pass takes no write lock at all.
    """
    now = now or utcnow()
    with node.sessions() as s:
        quiet = _shortest_quiet(s, float(node.effective("completion.quiet_seconds", s)))
        sweep = has_pending_discards(s)
        prepared = {}
        for series in s.scalars(_due(quiet, limit, now)).all():
            try:
                headers = _headers(node, series)
            except Exception:  # noqa: BLE001 - read again (and recorded) in the write transaction
                headers = None
            prepared[series.id] = (series.last_received_at, series.instance_count, headers)
    unlink: list[str] = []
    if sweep:
        with node.sessions.begin() as s:
            unlink += sweep_discards(s)
    if not prepared:
        remove_files(node.settings.node.data_dir, unlink)
        return 0
    with node.sessions.begin() as s:
        due = s.scalars(_due(quiet, limit, now)).all()
        for series in due:
            stamp, count, headers = prepared.get(series.id, (None, None, None))
            if (stamp, count) != (series.last_received_at, series.instance_count):
                headers = None  # instances arrived since the headers were read
            evaluate_series(node, s, series, model_version, headers, now=now, unlink=unlink)
        decided = [x for x in due if not x.dirty]
        for study in {x.study for x in decided}:
            refresh_study_status(s, study)
    remove_files(node.settings.node.data_dir, unlink)  # discarded instances, once their rows are gone
    return len(decided)


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


