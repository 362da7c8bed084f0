"""dispatch: send results to destinations with C-STORE.

Contract: claims due transfers (one job's objects, or one series' forwarded originals, to one
destination), urgent ones first (``Transfer.priority``), with a lease, sends the
objects not yet acknowledged on one association, and records each SOP Instance UID the peer
acknowledged with Success or a Warning. A transfer is SENT only when every object was
acknowledged. Transient failures (connection refused, timeout, abort, rejected-transient) are
retried with exponential back-off (``[dispatch] backoff_base_seconds * 2**(attempt-1)``, capped at
``backoff_max_seconds``) up to ``max_attempts``; permanent failures (association
rejected-permanent, a refused status, no accepted presentation context) are FAILED at once with
the reason. Several sender threads run side by side, so a destination that is down (or slow to
time out) never holds up the others. Destination types sit behind ``SENDERS`` so that a new kind
(e.g. DICOMweb STOW-RS) does not touch this loop.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select

from dicom_node import scu
from dicom_node.node import Node
from storage import repo
from storage.models import AssociationResult, Destination, Instance, ResultObject, Transfer, TransferState, utcnow

log = logging.getLogger(__name__)

#: kind of destination -> sender(paths, destination, calling_ae, timeout, skip_uids, tls=[tls] settings)
#: -> scu.Outcome; a destination with ``tls`` is sent over DICOM TLS.
SENDERS: dict[str, Callable[..., scu.Outcome]] = {
    "dicom": lambda paths, d, calling_ae, timeout, skip, tls=None: scu.store(
        paths, d.ae_title, d.host, d.port, calling_ae=calling_ae, timeout=timeout, skip_uids=skip,
        tls=tls if d.tls else None),
}


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
        t = repo.claim_transfer(s, worker_id, lease_seconds=cfg.timeout_seconds * 4 + 60)
        if t is None:
            return False
        dest: Destination = t.destination
        dest_info = (dest.name, dest.ae_title, dest.host, dest.port)
        if t.kind == "originals":  # forwarded received instances, as stored
            rels = s.scalars(select(Instance.path).where(Instance.id.in_(t.instance_ids or []))
                             .order_by(Instance.instance_number, Instance.id)).all()
            if len(rels) < len(t.instance_ids or []):
                log.warning("transfer %d: %d of its instance(s) are no longer stored", t.id,
                            len(t.instance_ids or []) - len(rels))
        else:
            rels = s.scalars(select(ResultObject.path).where(ResultObject.id.in_(t.result_object_ids))).all()
        paths = [node.store.path(r) for r in rels]
        skip = set(t.sent_sop_instance_uids or [])
        transfer_id, attempt = t.id, t.attempts
        calling_ae = node.effective("node.ae_title", s)
        d = Destination(name=dest.name, ae_title=dest.ae_title, host=dest.host, port=dest.port, tls=bool(dest.tls))
    log.info("transfer %d: %d object(s) to %s (%s@%s:%d), attempt %d", transfer_id, len(paths) - len(skip),
             dest_info[0], dest_info[1], dest_info[2], dest_info[3], attempt)
    started = utcnow()
    try:
        outcome = SENDERS["dicom"](paths, d, calling_ae, cfg.timeout_seconds, skip, tls=node.settings.tls)
    except FileNotFoundError as exc:
        outcome = scu.Outcome(scu.Kind.PERMANENT, f"result file missing: {exc}")
    except Exception as exc:  # noqa: BLE001 - network errors of every kind are transient
        outcome = scu.Outcome(scu.Kind.TRANSIENT, f"{type(exc).__name__}: {exc}")
    ended = utcnow()
    with node.sessions.begin() as s:
        t = s.get(Transfer, transfer_id)
        if t.claimed_by != worker_id:
            log.warning("transfer %d was taken over while sending; keeping the newer claim", transfer_id)
            return True
        t.sent_sop_instance_uids = sorted(set(t.sent_sop_instance_uids or []) | set(outcome.acknowledged))
        t.lease_until = None
        if outcome.ok:
            t.state, t.error, t.sent_at = TransferState.SENT, None, ended
            log.info("transfer %d sent to %s: %s", transfer_id, dest_info[0], outcome.message)
        elif outcome.kind is scu.Kind.PERMANENT:
            t.state, t.error = TransferState.FAILED, outcome.message
            log.error("transfer %d failed permanently: %s", transfer_id, outcome.message)
        elif attempt >= cfg.max_attempts:
            t.state, t.error = TransferState.FAILED, f"gave up after {attempt} attempts: {outcome.message}"
            log.error("transfer %d: %s", transfer_id, t.error)
        else:
            delay = backoff_seconds(attempt, cfg.backoff_base_seconds, cfg.backoff_max_seconds)
            t.state, t.error = TransferState.PENDING, outcome.message
            t.next_attempt_at = ended + timedelta(seconds=delay)
            log.warning("transfer %d: %s; retry in %.1f s", transfer_id, outcome.message, delay)
        repo.log_association(
            s, direction="out", peer_host=dest_info[2], peer_port=dest_info[3], calling_ae=calling_ae,
            called_ae=dest_info[1],
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
