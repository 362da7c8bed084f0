"""Transfers: a job's results or a series' forwarded originals, to one destination.

The one place that creates a ``Transfer`` row or changes its ``state``: results when a job is
done (``queue_results``, called by ``app.jobs.finish_done``) and again on request
(``resend``), forwarded originals when routing says forward (``queue_forwards``), a user's
retry and cancel, and the outcome of each send (``record_outcome``, with each object's status
and every SOP Instance UID the peer acknowledged). The claim query stays in ``storage.repo``.
Functions take the caller's session and never commit; user actions are audited beside them.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.app.errors import Conflict, NotFound
from storage import repo
from storage.models import Destination, Instance, Job, ResultObject, Series, Transfer, TransferState, utcnow

log = logging.getLogger(__name__)

#: Originals already on their way to (or at) a destination are not forwarded there again.
OPEN_TRANSFER = (TransferState.PENDING, TransferState.SENDING, TransferState.SENT)


def get(s: Session, transfer_id: int) -> Transfer:
    row = s.get(Transfer, transfer_id)
    if row is None:
        raise NotFound(f"transfer {transfer_id} not found")
    return row


def _new(s: Session, **values) -> Transfer:
    t = Transfer(sent_sop_instance_uids=[], object_status={}, state=TransferState.PENDING, attempts=0, **values)
    s.add(t)
    return t


def _results_to(s: Session, job: Job, result_rows: list[ResultObject], targets) -> list[Transfer]:
    """One pending transfer per (destination id, outputs) in ``targets`` that takes any of the rows."""
    created = []
    for dest_id, outputs in targets:
        ids = [r.id for r in result_rows if r.kind in outputs]
        if ids:
            created.append(_new(s, job_id=job.id, destination_id=dest_id, result_object_ids=ids,
                                next_attempt_at=utcnow(), priority=job.priority or 0, series_id=job.series_id))
    s.flush()
    return created


def queue_results(s: Session, job: Job, result_rows: dict[str, list[ResultObject]]) -> list[Transfer]:
    """One transfer per destination routing chose for the job (``routing.apply.result_targets``:
    the routed destinations still enabled, every enabled one for a job from before routing), of
    the result kinds that destination takes."""
    from dicom_node.routing.apply import result_targets

    rows = [r for kind_rows in result_rows.values() for r in kind_rows]
    return _results_to(s, job, rows, result_targets(s, job))


def resend(s: Session, actor: str, job_id: int, destination_names: list[str] | None) -> list[Transfer]:
    """New pending transfers of the job's result objects, one per destination (its outputs only):
    the named destinations, else where routing sent them. Audited as ``job.resend``."""
    from dicom_node.routing.apply import result_targets

    job = s.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    results = list(s.scalars(select(ResultObject).where(ResultObject.job_id == job.id)))
    if not results:
        raise Conflict(f"job {job_id} has no result objects to send")
    if destination_names:
        dests = []
        for name in destination_names:
            d = s.scalar(select(Destination).where(Destination.name == name))
            if d is None:
                raise NotFound(f"destination {name!r} not found")
            dests.append((d, list(d.outputs or [])))
    else:
        dests = [(s.get(Destination, dest_id), outputs) for dest_id, outputs in result_targets(s, job)]
    if not dests:
        raise Conflict("no enabled destination to send to")
    created = _results_to(s, job, results, [(d.id, outputs) for d, outputs in dests])
    if not created:
        raise Conflict(f"none of the destinations takes the outputs of job {job_id}")
    repo.audit(s, actor, "job.resend", str(job_id), {"transfer_ids": [t.id for t in created],
                                                      "destinations": [d.name for d, _ in dests]})
    return created


def queue_forwards(s: Session, series: Series, decision, now: datetime) -> list[Transfer]:
    """One originals transfer per forwarding destination of ``decision`` (a
    ``routing.evaluate.Decision``), of the instances not yet forwarded there (pending, sending
    or sent): a late arrival forwards only what is new."""
    created = []
    instance_ids = list(s.scalars(select(Instance.id).where(Instance.series_id == series.id).order_by(Instance.id)))
    for dest_id in decision.forward_destinations():
        covered: set[int] = set()
        for ids in s.scalars(select(Transfer.instance_ids).where(
                Transfer.series_id == series.id, Transfer.destination_id == dest_id, Transfer.kind == "originals",
                Transfer.state.in_(OPEN_TRANSFER))):
            covered.update(ids or [])
        todo = [i for i in instance_ids if i not in covered]
        if todo:
            created.append(_new(s, kind="originals", series_id=series.id, destination_id=dest_id, instance_ids=todo,
                                result_object_ids=[], priority=decision.priority, next_attempt_at=now))
    s.flush()
    for t in created:
        log.info("transfer %d: forward %d original(s) of series %s to %s", t.id, len(t.instance_ids),
                 series.series_instance_uid, decision.names.get(t.destination_id))
    return created


def retry(s: Session, actor: str, transfer_id: int) -> Transfer:
    """A failed, cancelled (or pending) transfer goes back to pending, due now, with a fresh
    attempt count. Audited as ``transfer.retry``."""
    row = get(s, transfer_id)
    if row.state not in (TransferState.FAILED, TransferState.CANCELLED, TransferState.PENDING):
        raise Conflict(f"transfer {transfer_id} is {row.state.value}; only failed, cancelled or pending ones can be "
                       "retried")
    previous = row.state.value
    row.state = TransferState.PENDING
    row.next_attempt_at = utcnow()
    row.attempts = 0
    row.error = None
    row.claimed_by = None
    row.lease_until = None
    s.flush()
    repo.audit(s, actor, "transfer.retry", str(transfer_id), {"previous_state": previous})
    return row


def cancel(s: Session, actor: str, transfer_id: int) -> Transfer:
    """A pending or failed transfer is cancelled. Audited as ``transfer.cancel``."""
    row = get(s, transfer_id)
    if row.state not in (TransferState.PENDING, TransferState.FAILED):
        raise Conflict(f"transfer {transfer_id} is {row.state.value}; only pending or failed ones can be cancelled")
    previous = row.state.value
    row.state = TransferState.CANCELLED
    s.flush()
    repo.audit(s, actor, "transfer.cancel", str(transfer_id), {"previous_state": previous})
    return row


def claim(s: Session, worker_id: str, lease_seconds: float) -> Transfer | None:
    """The next due transfer for sender ``worker_id`` (``storage.repo.claim_transfer``), now sending."""
    return repo.claim_transfer(s, worker_id, lease_seconds)


def record_outcome(s: Session, transfer_id: int, worker_id: str, objects, statuses: dict, outcome, *,
                   attempt: int, max_attempts: int, retry_in_seconds: float, ended: datetime) -> Transfer | None:
    """Record a send: each object's status (``objects``: the ``destinations.OutObject`` it held;
    ``statuses``: SOP Instance UID -> ``destinations.ObjectStatus``), the UIDs the peer
    acknowledged, and the transfer's state: SENT when the outcome is ok; FAILED when it is
    permanent or ``attempt`` reached ``max_attempts``; else PENDING again, due in
    ``retry_in_seconds``. Returns None (nothing written) when another sender took the transfer
    over meanwhile. ``outcome``: a ``scu.Outcome``."""
    from dicom_node import destinations, scu

    t = s.get(Transfer, transfer_id)
    if t.claimed_by != worker_id:
        log.warning("transfer %d was taken over while sending; keeping the newer claim", transfer_id)
        return None
    t.sent_sop_instance_uids = sorted(set(t.sent_sop_instance_uids or []) | set(outcome.acknowledged))
    status = dict(t.object_status or {})
    for o in objects:
        status.setdefault(o.sop_instance_uid, {"kind": o.kind, "state": destinations.PENDING, "reason": None,
                                               "sent_as": None})
    for uid, st in statuses.items():
        status[uid] = {**status.get(uid, {}), **st.as_json()}
    for uid in outcome.acknowledged:
        status[uid]["state"] = destinations.SENT
    t.object_status = status
    t.lease_until = None
    if outcome.ok:
        t.state, t.error, t.sent_at = TransferState.SENT, None, ended
        log.info("transfer %d sent: %s", transfer_id, outcome.message)
    elif outcome.kind is scu.Kind.PERMANENT:
        t.state, t.error = TransferState.FAILED, outcome.message
        log.error("transfer %d failed permanently: %s", transfer_id, outcome.message)
    elif attempt >= max_attempts:
        t.state, t.error = TransferState.FAILED, f"gave up after {attempt} attempts: {outcome.message}"
        log.error("transfer %d: %s", transfer_id, t.error)
    else:
        t.state, t.error = TransferState.PENDING, outcome.message
        t.next_attempt_at = ended + timedelta(seconds=retry_in_seconds)
        log.warning("transfer %d: %s; retry in %.1f s", transfer_id, outcome.message, retry_in_seconds)
    return t
