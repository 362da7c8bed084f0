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
``app.studies.request_complete`` from the API, the CLI or the admin study page).

The quiet period is the matching routing rule's ``quiet_seconds``, else the sending source's
(``[[sources]] quiet_seconds``), else ``[completion] quiet_seconds`` (``quiet_for``).

Every function takes the current time ``now`` (UTC) from its caller, so tests need no sleeps.

Late arrivals: instances that change a series after its results exist follow a policy,
"rerun" (a new job, whose SR names the SR it replaces) or "ignore" (the results stand).
``late_policy`` resolves it: the rule's own value (routing rules pass theirs in), else the
sending source's ``late``, else ``[completion] late`` (default "rerun").
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import and_, not_, or_, select
from sqlalchemy.orm import Session

from storage.models import AssociationLog, AssociationResult, Instance, Series, StageHeartbeat

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
    """Why ``series`` is not complete at ``now`` (for the study page), or None when it is not
    waiting (decided, or asked to be completed now). ``quiet_seconds``: its quiet period (rule >
    source > default: ``quiet_for``). Times are said in UTC, to the second:
    "association from CT_A still open, at most until 14:05:00 UTC" or "quiet period until
    14:02:30 UTC (30 s without a new instance)"."""
    if not series.dirty or series.complete_requested:
        return None
    held = s.execute(select(AssociationLog.calling_ae, AssociationLog.started_at).where(
        AssociationLog.id.in_(select(Instance.association_id).where(
            Instance.series_id == series.id,
            Instance.association_id.in_(_open_associations(now, max_open_seconds, stale_seconds)))))
        .order_by(AssociationLog.started_at).limit(1)).first()
    if held is not None:
        until = held.started_at + timedelta(seconds=max_open_seconds)
        return (f"association from {held.calling_ae or 'an unnamed AE'} still open, at most until "
                f"{until:%H:%M:%S} UTC")
    until = series.last_received_at + timedelta(seconds=quiet_seconds)
    if until > now:
        return f"quiet period until {until:%H:%M:%S} UTC ({quiet_seconds:g} s without a new instance)"
    return "complete: decided at the next scheduler pass"


def quiet_for(default: float, source_quiet: float | None = None, rule_quiet: float | None = None) -> float:
    """The quiet period (seconds) that completes a series: the matching rule's ``quiet_seconds``,
    else its source's, else ``default`` (``[completion] quiet_seconds``)."""
    for value in (rule_quiet, source_quiet):
        if value is not None:
            return float(value)
    return float(default)


def late_policy(default: str, source_policy: str | None = None, rule_policy: str | None = None) -> str:
    """The late-arrival policy that applies: the rule's, else the source's, else ``default``
    (``[completion] late``). Raises ValueError for a value not in ``LATE_POLICIES``."""
    value = rule_policy or source_policy or default
    if value not in LATE_POLICIES:
        raise ValueError(f"late-arrival policy {value!r} is not one of {LATE_POLICIES}")
    return value
