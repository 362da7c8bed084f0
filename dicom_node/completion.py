"""When a received series is complete, and what instances that arrive late do.

A series is complete when

1. no inbound association that delivered one of its instances is still open -- the listener
   keeps the association's audit row open (``associations.ended_at`` empty) and names itself in
   it (``associations.listener`` = its ``host:pid`` heartbeat identity). An open association
   counts only while that listener's heartbeat (``stage_heartbeats``, stage "listen") is fresh
   (``[node] stage_stale_seconds``): the association of a crashed listener does not block. Nor
   does one open longer than ``[completion] max_open_seconds`` (default 1800 s, from its start);
2. and then no instance has arrived for ``[completion] quiet_seconds``;

or when an administrator asked for it ("complete now": ``series.complete_requested``, set by
``request_complete`` from the API, the CLI or the admin study page).

Every function takes the current time ``now`` (UTC) from its caller, so tests need no sleeps.

Late arrivals: instances that change a series after its results exist follow a policy,
"rerun" (a new job, whose SR names the SR it replaces) or "ignore" (the results stand).
``late_policy`` resolves it: the rule's own value (routing rules pass theirs in), else the
sending source's ``late``, else ``[completion] late`` (default "rerun").
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import and_, not_, or_, select, update
from sqlalchemy.orm import Session

from storage import repo
from storage.models import (
    AssociationLog,
    AssociationResult,
    Instance,
    Series,
    StageHeartbeat,
    Study,
)

log = logging.getLogger(__name__)

LATE_POLICIES = ("rerun", "ignore")


def _open_associations(now: datetime, max_open_seconds: float, stale_seconds: float):
    """Inbound associations that still hold series back at ``now``."""
    live = select(StageHeartbeat.identity).where(StageHeartbeat.stage == "listen",
                                                 StageHeartbeat.last_seen >= now - timedelta(seconds=stale_seconds))
    return select(AssociationLog.id).where(
        AssociationLog.direction == "in", AssociationLog.result == AssociationResult.ACCEPTED,
        AssociationLog.ended_at.is_(None),
        AssociationLog.started_at >= now - timedelta(seconds=max_open_seconds),
        AssociationLog.listener.in_(live))


def held_series_ids(now: datetime, max_open_seconds: float, stale_seconds: float):
    """A select of the ids of series that an open association is delivering at ``now``."""
    return (select(Instance.series_id)
            .where(Instance.association_id.in_(_open_associations(now, max_open_seconds, stale_seconds)))
            .distinct())


def due_series(now: datetime, quiet_seconds: float, max_open_seconds: float, stale_seconds: float, limit: int):
    """A select of up to ``limit`` series to evaluate at ``now``, oldest first: changed since the
    last evaluation, not our own results, and complete (or asked to be completed now)."""
    held = held_series_ids(now, max_open_seconds, stale_seconds)
    complete = and_(Series.last_received_at <= now - timedelta(seconds=quiet_seconds), not_(Series.id.in_(held)))
    return (select(Series)
            .where(Series.dirty.is_(True), Series.is_result.is_(False),
                   or_(Series.complete_requested.is_(True), complete))
            .order_by(Series.last_received_at)
            .limit(limit))


def waiting_reason(s: Session, series: Series, now: datetime, quiet_seconds: float, max_open_seconds: float,
                   stale_seconds: float) -> str | None:
    """Why ``series`` is not complete at ``now`` (for the study page), or None when it is."""
    if not series.dirty or series.complete_requested:
        return None
    held = s.scalar(select(Instance.association_id).where(
        Instance.series_id == series.id,
        Instance.association_id.in_(_open_associations(now, max_open_seconds, stale_seconds))).limit(1))
    if held is not None:
        return f"association {held} is still delivering it (at most {max_open_seconds:.0f} s)"
    left = quiet_seconds - (now - series.last_received_at).total_seconds()
    if left > 0:
        return f"quiet period: {left:.0f} s without a new instance to go"
    return None


def request_complete(s: Session, actor: str, study_uid: str, series_uid: str | None = None) -> list[str]:
    """"Complete now": the study's series (or the one series) are evaluated at the next scheduler
    pass, open associations and quiet period aside. Audited as ``study.complete``. Returns the
    Series Instance UIDs marked; raises LookupError naming the unknown UID."""
    study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        raise LookupError(f"no study {study_uid}")
    targets = [x for x in study.series if not x.is_result and (series_uid is None or x.series_instance_uid == series_uid)]
    if series_uid is not None and not targets:
        raise LookupError(f"no series {series_uid} in study {study_uid}")
    ids = [x.id for x in targets]
    if ids:
        s.execute(update(Series).where(Series.id.in_(ids)).values(complete_requested=True, dirty=True)
                  .execution_options(synchronize_session=False))
    uids = sorted(x.series_instance_uid for x in targets)
    repo.audit(s, actor, "study.complete", study_uid, {"series": uids})
    log.info("complete now: study %s, %d series (by %s)", study_uid, len(uids), actor)
    return uids


def late_policy(default: str, source_policy: str | None = None, rule_policy: str | None = None) -> str:
    """The late-arrival policy that applies: the rule's, else the source's, else ``default``
    (``[completion] late``). Raises ValueError for a value not in ``LATE_POLICIES``."""
    value = rule_policy or source_policy or default
    if value not in LATE_POLICIES:
        raise ValueError(f"late-arrival policy {value!r} is not one of {LATE_POLICIES}")
    return value
