"""Queueing deliveries: one ``Transfer`` per (job or forwarded series, destination).

``queue_results`` is what the worker calls when a job's results are written; ``queue_forward``
is what a routing action "forward" calls to send a series' received instances (originals) to a
destination. Both take the caller's session and commit nothing.
"""
from __future__ import annotations

from sqlalchemy.orm import Session

from storage.models import Destination, Instance, Series, Transfer, TransferState, utcnow


def queue_results(s: Session, job, destination: Destination, result_rows: dict[str, list]) -> Transfer | None:
    """A transfer of the job's result objects of the kinds in ``destination.outputs``
    (``result_rows``: kind -> ResultObject rows); None when it wants none of them."""
    ids = [r.id for k in (destination.outputs or []) for r in result_rows.get(k, [])]
    if not ids:
        return None
    t = Transfer(job=job, destination_id=destination.id, result_object_ids=ids, sent_sop_instance_uids=[],
                 object_status={}, state=TransferState.PENDING, next_attempt_at=utcnow())
    s.add(t)
    return t


def queue_forward(s: Session, series: Series, destination: Destination) -> Transfer:
    """A transfer of every received instance of ``series`` to ``destination`` (forwarded as
    received, transcoded only where the destination accepts no transfer syntax they have)."""
    ids = [i.id for i in s.query(Instance.id).filter(Instance.series_id == series.id).order_by(Instance.id)]
    t = Transfer(job=None, destination_id=destination.id, result_object_ids=[], instance_ids=ids, kind="originals",
                 series_id=series.id,
                 sent_sop_instance_uids=[], object_status={}, state=TransferState.PENDING, next_attempt_at=utcnow())
    s.add(t)
    return t
