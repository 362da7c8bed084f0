"""STOW-RS (PS3.18 10.5): store instances over HTTP, a second way in beside C-STORE.

Contract: ``POST /dicom-web/studies`` (or ``/studies/{uid}``, where every instance must belong
to that study) with ``Content-Type: multipart/related; type="application/dicom"``, one Part 10
file per part. Each part goes through the listener's own store step
(``dicom_node.ingest.store_instance``: header read, limits, temp file, fsync, rename, index),
so an instance answered as stored is durable and indexed, counted in its series for the
scheduler exactly as a C-STORE instance is, and a resend of the same bytes changes nothing.
Parts are stored as they arrive (one part in memory at a time, at most ``[node]
max_dataset_bytes``). Only admins and ``sender`` accounts may store, with a bearer token.

The response (DICOM JSON) lists the stored instances in ReferencedSOPSequence (with their
RetrieveURL) and the refused ones in FailedSOPSequence with a FailureReason (the PS3.4 status:
0xA700 out of resources, 0xA900 does not match, 0xC000 cannot understand); 200 when all were
stored, 202 when some were, 409 when none was. Every request is recorded in the association log
(direction "in", calling AE ``STOW-RS``, the account, instance count and duration) and in the
audit log.
"""
from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from dicom_node import ingest
from dicom_node.web.deps import DB, client_host
from dicom_node.web.dicomweb import dicomjson
from dicom_node.web.dicomweb.auth import Storer
from dicom_node.web.dicomweb.multipart import MultipartError, boundary_of, read_parts
from dicom_node.web.dicomweb.responses import DicomJSONResponse, DicomWebError, base_url
from storage import repo
from storage.models import AssociationLog, AssociationResult, utcnow

log = logging.getLogger(__name__)
router = APIRouter()

CALLING_AE = "STOW-RS"
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122


def _open_log(node, peer: str, username: str) -> int:  # noqa: ANN001
    with node.sessions.begin() as s:
        row = repo.log_association(s, direction="in", peer_host=peer, peer_port=None, calling_ae=CALLING_AE,
                                   called_ae=node.effective("node.ae_title", s), result=AssociationResult.ACCEPTED,
                                   reason=f"STOW-RS by {username}", instances=0)
        return row.id


def _close_log(node, log_id: int, username: str, study: str | None, stored: int, failed: int,  # noqa: ANN001
               started: float, reason: str | None) -> None:
    with node.sessions.begin() as s:
        row = s.get(AssociationLog, log_id)
        row.ended_at = utcnow()
        row.instances = stored
        row.duration_s = round(time.monotonic() - started, 3)
        if failed or reason:
            row.reason = f"STOW-RS by {username}: " + "; ".join(
                filter(None, [f"{failed} instance(s) refused" if failed else None, reason]))
        repo.audit(s, username, "stow", study, {"stored": stored, "failed": failed, "association": log_id})


def _failed_item(exc: ingest.Refused | None, status: int) -> dict:
    values: dict = {"FailureReason": status}
    if exc is not None and exc.sop_class_uid:
        values["ReferencedSOPClassUID"] = exc.sop_class_uid
    if exc is not None and exc.sop_instance_uid:
        values["ReferencedSOPInstanceUID"] = exc.sop_instance_uid
    return dicomjson.dataset(values)


async def _store(request: Request, user, s, study: str | None) -> DicomJSONResponse:  # noqa: ANN001
    username = user.username
    s.close()  # the request's session (SQLite: a writer) must not hold the lock while we store
    node = request.app.state.node
    media, params = boundary_of(request.headers.get("content-type", ""))
    if media != "multipart/related":
        raise DicomWebError(415, 'STOW-RS takes Content-Type: multipart/related; type="application/dicom"')
    if params.get("type", "application/dicom").lower() != "application/dicom":
        raise DicomWebError(415, "only application/dicom parts are stored (not metadata and bulk data)")
    started = time.monotonic()
    log_id = await run_in_threadpool(_open_log, node, client_host(request), username)
    base = base_url(request)
    max_bytes = node.settings.node.max_dataset_bytes
    cache = repo.IndexCache()
    stored, failed, studies = [], [], set()
    problem = None
    try:
        async for part in read_parts(request.stream(), params.get("boundary", ""), max_bytes):
            part_type = boundary_of(part.content_type)[0] if part.content_type else "application/dicom"
            if part_type != "application/dicom":
                failed.append(_failed_item(None, SOP_CLASS_NOT_SUPPORTED))
                continue
            if part.too_large:
                log.warning("STOW-RS by %s: a part of %d bytes refused (over max_dataset_bytes %d)", username,
                            part.size, max_bytes)
                failed.append(_failed_item(None, ingest.DATASET_TOO_LARGE))
                continue
            try:
                done = await run_in_threadpool(
                    ingest.store_instance, node, part.data, transfer_syntax=None, source=CALLING_AE,
                    association_id=log_id, cache=cache, expected_study_instance_uid=study)
            except ingest.Refused as exc:
                failed.append(_failed_item(exc, exc.status))
                continue
            m = done.meta
            studies.add(m.study_instance_uid)
            stored.append(dicomjson.dataset({
                "ReferencedSOPClassUID": m.sop_class_uid, "ReferencedSOPInstanceUID": m.sop_instance_uid,
                "RetrieveURL": f"{base}/studies/{m.study_instance_uid}/series/{m.series_instance_uid}"
                               f"/instances/{m.sop_instance_uid}"}))
    except MultipartError as exc:
        problem = str(exc)
    finally:
        await run_in_threadpool(_close_log, node, log_id, username, study or (next(iter(studies)) if len(studies) == 1
                                                                                else None),
                                len(stored), len(failed), started, problem)
    log.info("STOW-RS by %s from %s: %d stored, %d refused%s", username, client_host(request), len(stored),
             len(failed), f" ({problem})" if problem else "")
    if problem is not None and not stored and not failed:
        raise DicomWebError(400, f"not a multipart/related body: {problem}")
    body: dict = {}
    retrieve = study or (next(iter(studies)) if len(studies) == 1 else None)
    if retrieve:
        body.update(dicomjson.dataset({"RetrieveURL": f"{base}/studies/{retrieve}"}))
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": stored}
    # A body cut short (problem) stored what came before the cut: partly done, as with failures.
    status = 409 if not stored else 202 if (failed or problem) else 200
    headers = {"Warning": f'299 dicom-node "{problem}"'} if problem else None
    return DicomJSONResponse(body, status_code=status, headers=headers)


@router.post("/studies", summary="STOW-RS: store instances (multipart/related; type=\"application/dicom\")")
async def store(request: Request, s: DB, user: Storer):
    return await _store(request, user, s, None)


@router.post("/studies/{study}", summary="STOW-RS: store instances of one study")
async def store_study(study: str, request: Request, s: DB, user: Storer):
    return await _store(request, user, s, study)
