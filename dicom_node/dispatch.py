"""dispatch: send results (and forwarded originals) to destinations.

Contract: claims due transfers (one job's objects, or one series' forwarded instances, to one
destination), urgent ones first (``Transfer.priority``), with a lease, sends the objects not yet acknowledged through the destination's
kind (``dicom_node.destinations``: C-STORE on one association, or DICOMweb STOW-RS), negotiated
per object (SEG before SR; a Comprehensive SR where no 3D SR is accepted; transcoding), and
records each object's status (``transfers.object_status``) and each SOP Instance UID the peer
acknowledged with Success or a Warning. A transfer is SENT only when every object was
acknowledged; an object refused for good fails alone (its reason recorded) while the others go,
and the transfer then ends FAILED naming it. Transient failures (connection refused, timeout, abort, rejected-transient) are
retried with exponential back-off (``[dispatch] backoff_base_seconds * 2**(attempt-1)``, capped at
``backoff_max_seconds``) up to ``max_attempts``; permanent failures (association
rejected-permanent, a refused status, no accepted presentation context) are FAILED at once with
the reason. Several sender threads run side by side, so a destination that is down (or slow to
time out) never holds up the others. Destination kinds sit behind ``destinations.KINDS`` so
that a new kind does not touch this loop. The claim and the outcome are recorded by
``dicom_node.app.transfers`` (``claim``, ``record_outcome``).
"""
from __future__ import annotations

import logging
import threading

from sqlalchemy import select

from dicom_node import destinations, scu
from dicom_node.app import transfers
from dicom_node.node import Node
from storage import repo
from storage.models import AssociationResult, Instance, ResultObject, utcnow

log = logging.getLogger(__name__)


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Delay before attempt ``attempt + 1`` after ``attempt`` failures (attempt >= 1)."""
    return min(cap, base * 2 ** max(0, attempt - 1))


def dispatch_once(node: Node, worker_id: str) -> bool:
    """Claim and try one transfer. Returns False when none was due."""
    cfg = node.settings.dispatch
    with node.sessions() as s:  # a read: an idle poll takes no write lock
        if not repo.transfer_claimable(s):
            return False
    with node.sessions.begin() as s:
        t = transfers.claim(s, worker_id, lease_seconds=cfg.timeout_seconds * 4 + 60)
        if t is None:
            return False
        target = destinations.Target.of(t.destination)
        skip = set(t.sent_sop_instance_uids or [])
        objects = [destinations.OutObject(o.sop_instance_uid, o.sop_class_uid, o.kind, node.store.path(o.path))
                   for o in s.scalars(select(ResultObject).where(ResultObject.id.in_(t.result_object_ids or [])))]
        objects += [destinations.OutObject(i.sop_instance_uid, i.sop_class_uid, "original", node.store.path(i.path))
                    for i in s.scalars(select(Instance).where(Instance.id.in_(t.instance_ids or []))
                                                .order_by(Instance.instance_number, Instance.id))]
        todo = [o for o in objects if o.sop_instance_uid not in skip]
        transfer_id, attempt = t.id, t.attempts
        calling_ae = node.effective("node.ae_title", s)
    log.info("transfer %d: %d object(s) to %s (%s, %s), attempt %d", transfer_id, len(todo), target.name,
             target.kind, target.describe(), attempt)
    started = utcnow()
    ctx = destinations.Context(calling_ae=calling_ae, timeout=cfg.timeout_seconds, tls=node.settings.tls)
    statuses: dict = {}
    try:
        delivery = destinations.kind_of(target).send(target, todo, ctx)
        outcome, statuses = delivery.outcome, delivery.objects
    except FileNotFoundError as exc:
        outcome = scu.Outcome(scu.Kind.PERMANENT, f"file missing: {exc}")
    except ValueError as exc:  # an unknown kind, a dataset that cannot be transcoded
        outcome = scu.Outcome(scu.Kind.PERMANENT, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - network errors of every kind are transient
        outcome = scu.Outcome(scu.Kind.TRANSIENT, f"{type(exc).__name__}: {exc}")
    ended = utcnow()
    delay = backoff_seconds(attempt, cfg.backoff_base_seconds, cfg.backoff_max_seconds)
    with node.sessions.begin() as s:
        if transfers.record_outcome(s, transfer_id, worker_id, objects, statuses, outcome, attempt=attempt,
                                    max_attempts=cfg.max_attempts, retry_in_seconds=delay, ended=ended) is None:
            return True
        repo.log_association(
            s, direction="out", peer_host=(target.host or target.url or '')[:255], peer_port=target.port or None,
            calling_ae=calling_ae, called_ae=target.ae_title or None,
            result=AssociationResult.ACCEPTED if outcome.ok or outcome.acknowledged else AssociationResult.REJECTED,
            reason=None if outcome.ok else outcome.message, instances=len(outcome.acknowledged),
            started_at=started, ended_at=ended, duration_s=round((ended - started).total_seconds(), 3),
        )
    return True


def run_dispatcher(node: Node, stop: threading.Event, worker_id: str, threads: int = 4,
                   poll_seconds: float = 1.0) -> None:
    """Run ``threads`` sender loops until ``stop`` is set."""

    def loop(n: int) -> None:
        wid = f"{worker_id}/{n}"
        while not stop.is_set():
            try:
                busy = dispatch_once(node, wid)
            except Exception:  # noqa: BLE001
                log.exception("dispatch pass failed")
                busy = False
            if not busy:
                stop.wait(poll_seconds)

    pool = [threading.Thread(target=loop, args=(n,), name=f"dispatch-{n}", daemon=True) for n in range(threads)]
    for th in pool:
        th.start()
    log.info("dispatcher running with %d sender threads", threads)
    for th in pool:
        th.join()
