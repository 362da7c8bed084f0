"""A study's AI status and summary, and the completion and routing state of its series.

The one place that writes ``Study.status`` / ``status_reason`` / the findings summary (derived
from the series and their latest jobs: ``refresh_status``) and a series' ``dirty``,
``complete_requested``, eligibility, routing summary and discard state. The listener's ingest
upsert (``storage.repo``) is the one exception, kept in storage for speed: a new instance marks
its series dirty and its study "received" in the same statement that indexes it.

Callers: the scheduler (``begin_evaluation``, ``record_eligibility``, ``keep_waiting``,
``record_route``, ``discard_now``, ``refresh_status``), the worker and ``app.jobs`` (after a job
changes), the web and the CLI ("complete now": ``request_complete``).
"""
from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from dicom_node.app.errors import NotFound
from storage import repo
from storage.models import Instance, Job, JobState, RoutingDecision, Series, Study, StudyStatus

log = logging.getLogger(__name__)

ROUTING_ACTOR = "routing"


def refresh_status(s: Session, study: Study) -> None:
    """Derive the study's AI status and summary from its series and their latest jobs (a
    cancelled job does not count: the one before it does)."""
    series = [x for x in study.series if not x.is_result]
    if any(x.dirty for x in series):
        study.status, study.status_reason = StudyStatus.RECEIVED, None
        return
    latest = []
    for x in series:
        job = s.scalar(select(Job).where(Job.series_id == x.id, Job.state != JobState.CANCELLED)
                       .order_by(Job.id.desc()).limit(1))
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


def refresh_of_series(s: Session, series_id: int) -> None:
    """``refresh_status`` of the study that series ``series_id`` belongs to (if it still exists)."""
    series = s.get(Series, series_id)
    if series is not None:
        refresh_status(s, series.study)


# --- a series through completion and routing -----------------------------------------------------

def begin_evaluation(series: Series) -> bool:
    """The scheduler takes the series up: clean, the "complete now" request consumed. Returns
    whether an administrator had asked to complete it now (no quiet period then applies)."""
    forced = bool(series.complete_requested)
    series.dirty = False
    series.complete_requested = False
    return forced


def keep_waiting(series: Series) -> None:
    """Not complete under its rule's completion policy yet: evaluated again at a later pass."""
    series.dirty = True


def record_eligibility(series: Series, problem: str | None) -> None:
    """Eligible for the nodule model when ``problem`` is None; else not, with that reason."""
    series.eligible, series.eligibility_reason = problem is None, problem


def record_late_ignored(series: Series, previous_job_id: int) -> None:
    """Instances changed the series after job ``previous_job_id`` and the late-arrival policy says ignore."""
    series.eligibility_reason = (f"late arrival ignored (policy 'ignore'): the results of job {previous_job_id} "
                                 "stand")


def record_route(s: Session, series: Series, decision, now: datetime) -> RoutingDecision:
    """Write the routing decision (``routing_decisions``) and the series' routing summary.
    ``decision``: a ``dicom_node.routing.evaluate.Decision``."""
    summary = decision.summary()
    row = RoutingDecision(series_id=series.id, decided_at=now, matched=decision.matched, actions=decision.actions,
                          destinations=decision.destination_names(), summary=summary[:4000],
                          detail=decision.as_dict())
    s.add(row)
    series.route_analyse = decision.analyse
    series.route_summary = summary[:4000]
    return row


def mark_discard_pending(series: Series) -> None:
    """Discard once its analysis and forwards are over (``routing.apply.sweep_discards``)."""
    series.discard_pending = True


def discard_now(s: Session, series: Series, reason: str, actor: str = ROUTING_ACTOR) -> list[str]:
    """Delete the series' instances from the index (the caller commits, then removes the
    returned files, relative to data_dir); the series row stays with its decision. Audited as
    ``series.discard``."""
    paths = list(s.scalars(select(Instance.path).where(Instance.series_id == series.id)))
    s.execute(delete(Instance).where(Instance.series_id == series.id).execution_options(synchronize_session=False))
    s.expire(series, ["instances"])
    series.instance_count = 0
    series.discard_pending = False
    repo.audit(s, actor, "series.discard", series.series_instance_uid, {"reason": reason, "instances": len(paths)})
    log.info("series %s discarded: %d instance(s)", series.series_instance_uid, len(paths))
    return paths


def request_complete(s: Session, actor: str, study_uid: str, series_uid: str | None = None) -> list[str]:
    """"Complete now": the study's series (or the one series) are evaluated at the next scheduler
    pass, open associations and quiet period aside. Audited as ``study.complete``. Returns the
    Series Instance UIDs marked; raises ``NotFound`` (a LookupError) naming the unknown UID."""
    study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        raise NotFound(f"no study {study_uid}")
    targets = [x for x in study.series if not x.is_result and (series_uid is None or x.series_instance_uid == series_uid)]
    if series_uid is not None and not targets:
        raise NotFound(f"no series {series_uid} in study {study_uid}")
    ids = [x.id for x in targets]
    if ids:
        s.execute(update(Series).where(Series.id.in_(ids)).values(complete_requested=True, dirty=True)
                  .execution_options(synchronize_session=False))
    uids = sorted(x.series_instance_uid for x in targets)
    repo.audit(s, actor, "study.complete", study_uid, {"series": uids})
    log.info("complete now: study %s, %d series (by %s)", study_uid, len(uids), actor)
    return uids



def waiting_reason(node, s: Session, series: Series, now: datetime) -> str | None:
    """Why ``series`` is still waiting to be decided at ``now`` (for the study page and its API),
    or None when it is not waiting. Its quiet period as the scheduler resolves it: the matching
    rule's ``quiet_seconds``, else its source's, else ``[completion] quiet_seconds``."""
    from dicom_node import completion
    from dicom_node.routing.apply import decide_series
    from storage.models import Source

    if series.is_result or not series.dirty or series.complete_requested:
        return None
    newest = max(series.instances, key=lambda i: i.received_at, default=None)
    ae = newest.calling_ae if newest is not None else None
    source_quiet = s.scalar(select(Source.quiet_seconds).where(Source.ae_title == ae)) if ae else None
    try:
        rule_quiet = decide_series(node, s, series).quiet_seconds
    except Exception:  # noqa: BLE001 - an unreadable header: the scheduler records it when it decides
        rule_quiet = None
    quiet = completion.quiet_for(float(node.effective("completion.quiet_seconds", s)), source_quiet, rule_quiet)
    return completion.waiting_reason(s, series, now, quiet, node.settings.completion.max_open_seconds,
                                     node.settings.node.stage_stale_seconds)
