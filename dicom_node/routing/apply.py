"""What the scheduler calls for a complete series: decide, record, queue forwards, discard.

``route_series`` reads the rules from the database (so a change applies to the next series
without a restart), gathers the series' facts, decides (``evaluate.decide``), and then, in the
caller's transaction, through the application layer (``dicom_node.app``): records the decision
(``app.studies.record_route``: ``routing_decisions`` and the series' summary), queues one
transfer of the originals per forwarding destination (``app.transfers.queue_forwards``: only
instances not already forwarded there), and discards the series' instances (rows now, files after the commit) or,
when analysis or forwarding still needs them, marks it ``discard_pending`` for
``sweep_discards``. Creating the analysis job stays with the scheduler, which reads
``Decision.analyse``, ``priority``, ``late_arrivals`` and ``job_routing(decision)``.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from dicom_node import completion
from dicom_node.app import studies, transfers
from dicom_node.routing import store
from dicom_node.routing.evaluate import Decision, decide
from dicom_node.routing.facts import series_facts
from storage.models import Destination, Job, JobState, Series, Source, Transfer, TransferState, utcnow

log = logging.getLogger(__name__)

ACTOR = "routing"


def return_to(s: Session, calling_ae: str | None) -> list[str] | None:
    """The destination names "sender" means for ``calling_ae`` (None: every destination)."""
    if not calling_ae:
        return None
    row = s.scalar(select(Source).where(Source.ae_title == calling_ae.strip()))
    return list(row.return_to or []) if row is not None else None


def decide_series(node, s: Session, series: Series, first_header=None, rules: list | None = None) -> Decision:
    """The decision for a stored series, nothing written (also what a dry run shows).
    ``rules``: evaluate these instead of the stored ones (a dry run of unsaved rules)."""
    facts = series_facts(s, series, node.store.path, first_header)
    destinations = list(s.scalars(select(Destination).order_by(Destination.name)))
    rules = store.load_rules(s) if rules is None else rules
    decision = decide(rules, facts, destinations, return_to(s, facts.get("calling_ae")))
    decision.facts = facts.known()
    return decision


def still_arriving(s: Session, series: Series, decision: Decision, quiet_default: float, now: datetime) -> str | None:
    """Why the series is not complete under the decision's policy yet (None: it is complete).

    ``quiet_seconds`` of the matching rules overrides ``quiet_default`` (the source's, else
    ``[completion] quiet_seconds``: ``scheduler._quiet_default``); with the
    trigger level "study", every other series of the study must be quiet too."""
    quiet = completion.quiet_for(quiet_default, None, decision.quiet_seconds)
    cutoff = now - timedelta(seconds=quiet)
    if series.last_received_at > cutoff:
        return f"last instance {(now - series.last_received_at).total_seconds():.0f} s ago, quiet period {quiet:g} s"
    if decision.level == "study":
        busy = s.scalar(select(Series.series_instance_uid).where(
            Series.study_id == series.study_id, Series.id != series.id, Series.is_result.is_(False),
            Series.dirty.is_(True), Series.last_received_at > cutoff).limit(1))
        if busy is not None:
            return f"study level: series {busy} of the study is still arriving"
    return None


def job_routing(decision: Decision) -> dict:
    """What ``Job.routing`` holds: where the results go (destination id -> outputs) and why."""
    return {"destinations": {str(d): o for d, o in decision.result_destinations().items()},
            "rules": decision.matched, "pipeline": decision.pipeline}


def result_targets(s: Session, job: Job) -> list[tuple[int, list[str]]]:
    """(destination id, result kinds) the worker queues a job's results to: the routed
    destinations that are still enabled, or, for a job from before routing, every enabled one."""
    enabled = {d.id: d for d in s.scalars(select(Destination).where(Destination.enabled.is_(True)))}
    if job.routing is None:
        return [(d.id, list(d.outputs or [])) for d in enabled.values()]
    return [(int(k), list(v)) for k, v in (job.routing.get("destinations") or {}).items() if int(k) in enabled]


def route_series(node, s: Session, series: Series, first_header=None, *, now: datetime | None = None,
                 quiet_default: float = 0.0, force: bool = False) -> tuple[Decision | None, list[str]]:
    """Decide and act for a complete series (eligibility already recorded on it).

    Returns (the decision, files to remove after the commit), or (None, []) when the series is
    not complete under the matching rules' completion policy yet (the caller keeps it dirty).
    ``force``: an administrator asked to complete it now: no quiet period applies."""
    now = now or utcnow()
    decision = decide_series(node, s, series, first_header)
    if not force and still_arriving(s, series, decision, quiet_default, now) is not None:
        return None, []
    studies.record_route(s, series, decision, now)
    forwards = transfers.queue_forwards(s, series, decision, now) if decision.forward_destinations() else []
    paths: list[str] = []
    if decision.discard:
        if decision.analyse or forwards or _open_forwards(s, series.id):
            studies.mark_discard_pending(series)
        else:
            paths = studies.discard_now(s, series, decision.summary(), ACTOR)
    log.info("series %s routed: %s by %s", series.series_instance_uid, ", ".join(decision.actions) or "kept",
             ", ".join(decision.matched) or "no rule")
    return decision, paths


def _open_forwards(s: Session, series_id: int) -> bool:
    return s.scalar(select(exists().where(Transfer.series_id == series_id, Transfer.kind == "originals",
                                          Transfer.state.in_((TransferState.PENDING, TransferState.SENDING))))) or False


def sweep_discards(s: Session) -> list[str]:
    """Discard the series marked ``discard_pending`` whose analysis and forwards are over (done,
    failed or cancelled). Returns the files to remove after the commit."""
    busy_job = exists().where(Job.series_id == Series.id, Job.state.in_((JobState.PENDING, JobState.RUNNING)))
    busy_fwd = exists().where(Transfer.series_id == Series.id, Transfer.kind == "originals",
                              Transfer.state.in_((TransferState.PENDING, TransferState.SENDING)))
    paths: list[str] = []
    for series in s.scalars(select(Series).where(Series.discard_pending.is_(True), ~busy_job, ~busy_fwd)):
        paths += studies.discard_now(s, series, series.route_summary or "discard rule", ACTOR)
    return paths


def has_pending_discards(s: Session) -> bool:
    return s.scalar(select(Series.id).where(Series.discard_pending.is_(True)).limit(1)) is not None
