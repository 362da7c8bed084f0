"""schedule: decide what happens to a series once it is complete.

Contract: a series is complete when no inbound association delivering it is still open (at
most ``[completion] max_open_seconds``, never for a listener whose heartbeat stopped) and then
no instance has arrived for its quiet period: the ``quiet_seconds`` of the routing rules it
matches, else of its source (``[[sources]] quiet_seconds``), else ``[completion]
quiet_seconds`` (re-read on every pass) (with ``level = "study"``: when every series of
its study is), or at once when an administrator asked "complete now" (``dicom_node.completion``;
every pass takes the current time ``now`` as an argument). Its eligibility for the nodule model
is decided from the stored headers (axial CT, consistent geometry, no missing slice, sensible
spacing; CR/DX "not eligible yet") and recorded with its reason. Routing (``dicom_node.routing``)
then decides what happens to it (analyse, forward the originals, discard; to which
destinations) and records why; forwards and discards are routing's. A series routing sends to
analysis, if eligible, gets one inference job (with the rule's priority and destinations) whose
idempotency key rests on content (``dicom_node.content``: model version, rule, every SOP
Instance UID with the hash of its decoded pixel data): a resend in any transfer syntax creates
no job; a new or changed instance creates a new one that names the job it replaces, or nothing
when the late-arrival policy says "ignore". The study's AI status is derived from its series and
jobs (``app.studies.refresh_status``). Every row this stage changes is written through the
application layer (``dicom_node.app``).
"""
from __future__ import annotations

import logging
import threading
from datetime import datetime

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node import completion
from dicom_node.app import jobs, studies
from dicom_node.content import content_key, pixel_digest
from dicom_node.node import Node
from dicom_node.retention import remove_files
from dicom_node.routing.apply import has_pending_discards, job_routing, route_series, sweep_discards
from dicom_node.routing.store import load_rules
from dicom_node.volume import series_problem
from storage.models import Job, JobState, Series, Source, utcnow

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
                    headers: list | None = None, digests: dict | None = None, *, now: datetime | None = None,
                    unlink: list[str] | None = None) -> Job | None:
    """Record eligibility, let routing decide (``dicom_node.routing``), and create the job when
    routing says analyse, the series is eligible, and no job was done for this content.

    ``headers``: the series' stored headers when the caller read them already (outside the
    write transaction); read here otherwise. ``digests``: decoded-pixel digests computed by the
    caller (``_digests``). ``unlink`` collects files to remove after the commit (a discarded
    series). A series not complete under its rule's completion policy yet stays dirty, undecided
    (unless an administrator asked to complete it now)."""
    forced = studies.begin_evaluation(series)
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
    studies.record_eligibility(series, problem)
    decision, paths = route_series(node, s, series, headers[0] if headers else None, now=now,
                                   quiet_default=_quiet_default(node, s, series), force=forced)
    if decision is None:
        studies.keep_waiting(series)  # complete later, under the matching rule's policy
        return None
    if unlink is not None:
        unlink.extend(paths)
    if problem is not None:
        log.info("series %s not eligible: %s", series.series_instance_uid, problem)
    if not decision.analyse or problem is not None:
        return None
    try:
        digests = dict(digests or {})
        for i in series.instances:
            if i.id not in digests and (i.pixel_sha256 is None or i.pixel_of_sha256 != i.sha256):
                digests[i.id] = (i.sha256, pixel_digest(node.store.path(i.path)))
    except Exception as exc:  # noqa: BLE001 - pixel data that does not decode
        studies.record_eligibility(series, f"pixel data cannot be decoded: {type(exc).__name__}: {exc}")
        return None
    for i in series.instances:
        if i.id in digests and digests[i.id][0] == i.sha256:
            i.pixel_sha256, i.pixel_of_sha256 = digests[i.id][1], i.sha256
    rule = ",".join(decision.matched) if not decision.default else ""
    key = idempotency_key(model_version, [(i.sop_instance_uid, i.pixel_sha256) for i in series.instances], rule)
    if s.scalar(select(Job.id).where(Job.idempotency_key == key)) is not None:
        log.info("series %s: same content as an earlier job (any transfer syntax): no new job",
                 series.series_instance_uid)
        return None
    previous = s.scalar(select(Job).where(Job.series_id == series.id, Job.state == JobState.DONE)
                        .order_by(Job.id.desc()).limit(1))
    replaces = None
    if previous is not None:
        rule_late = None if decision.default else decision.late_arrivals
        policy = completion.late_policy(node.settings.completion.late, _source_late(node, series), rule_late)
        if policy == "ignore":
            studies.record_late_ignored(series, previous.id)
            log.info("series %s changed after job %d: ignored (late-arrival policy)", series.series_instance_uid,
                     previous.id)
            return None
        replaces = previous.id
    return jobs.queue(s, series, key, priority=decision.priority, routing=job_routing(decision), replaces=replaces)


def _newest_calling_ae(series: Series) -> str | None:
    newest = max(series.instances, key=lambda i: i.received_at, default=None)
    return newest.calling_ae if newest is not None else None


def _source_late(node: Node, series: Series) -> str | None:
    """The ``late`` policy of the source (calling AE) that sent the series' newest instance."""
    ae = _newest_calling_ae(series)
    for src in node.settings.sources:
        if src.ae_title == ae:
            return src.late
    return None


def _quiet_default(node: Node, s: Session, series: Series) -> float:
    """The quiet period of the series before its rules are consulted: the ``quiet_seconds`` of
    the source (calling AE) that sent its newest instance (``sources.quiet_seconds``, seeded
    from ``[[sources]]``), else ``[completion] quiet_seconds``. A matching rule's own
    ``quiet_seconds`` overrides both (``routing.apply.still_arriving``)."""
    ae = _newest_calling_ae(series)
    source_quiet = s.scalar(select(Source.quiet_seconds).where(Source.ae_title == ae)) if ae else None
    return completion.quiet_for(float(node.effective("completion.quiet_seconds", s)), source_quiet)


def _due(node: Node, s: Session, now: datetime, limit: int, quiet: float):
    return completion.due_series(now, quiet, node.settings.completion.max_open_seconds,
                                 node.settings.node.stage_stale_seconds, limit)


def _shortest_quiet(s: Session, quiet: float) -> float:
    """The shortest quiet period of the default, of the sources' and of the stored rules'
    completion policies: no series can be complete before it."""
    sources = [q for q in s.scalars(select(Source.quiet_seconds).where(Source.quiet_seconds.is_not(None)))]
    return min([quiet] + sources + [r.quiet_seconds for r in load_rules(s) if r.enabled and r.quiet_seconds is not None])


def schedule_once(node: Node, model_version: str, limit: int = 20, *, now: datetime | None = None) -> int:
    """One pass at time ``now`` (UTC; the clock when None): evaluate up to ``limit`` complete
    series. Returns how many were decided.

    The stored headers are read, and new instances' pixels decoded and hashed, in a read
    session first, so the write transaction (the SQLite write lock, which the listener needs
    for every instance) lasts only as long as the decisions take; an idle pass takes no write
    lock at all.
    """
    now = now or utcnow()
    with node.sessions() as s:
        quiet = _shortest_quiet(s, float(node.effective("completion.quiet_seconds", s)))
        sweep = has_pending_discards(s)
        prepared = {}
        for series in s.scalars(_due(node, s, now, limit, quiet)).all():
            try:
                headers = _headers(node, series)
            except Exception:  # noqa: BLE001 - read again (and recorded) in the write transaction
                headers = None
            try:
                digests = _digests(node, series)
            except Exception:  # noqa: BLE001 - decoded again (and recorded) in the write transaction
                digests = None
            prepared[series.id] = (series.last_received_at, series.instance_count, headers, digests)
    unlink: list[str] = []
    if sweep:
        with node.sessions.begin() as s:
            unlink += sweep_discards(s)
    if not prepared:
        remove_files(node.settings.node.data_dir, unlink)
        return 0
    with node.sessions.begin() as s:
        due = s.scalars(_due(node, s, now, limit, quiet)).all()
        for series in due:
            stamp, count, headers, digests = prepared.get(series.id, (None, None, None, None))
            if (stamp, count) != (series.last_received_at, series.instance_count):
                headers = None  # instances arrived since the headers were read
            evaluate_series(node, s, series, model_version, headers, digests, now=now, unlink=unlink)
        decided = [x for x in due if not x.dirty]
        for study in {x.study for x in decided}:
            studies.refresh_status(s, study)
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


