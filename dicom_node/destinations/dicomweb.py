"""Destination kind "dicomweb": STOW-RS (PS3.18 10.5) to a DICOMweb base URL, with httpx.

Each object is one ``POST {url}/studies`` request (``multipart/related;
type="application/dicom"``), in ``send_order`` (the SEG before the SR that references it), so
every object gets its own status from the response's Referenced SOP Sequence (0008,1199) or
Failed SOP Sequence (0008,1198) with its Failure Reason (0008,1197). HTTP 200/202 with the
object referenced: sent; 409 or a failed reference: that object fails; 401/403/404/415: permanent
(the URL or the credentials are wrong); connection errors, timeouts and 5xx: transient.

The echo is a QIDO-RS probe: ``GET {url}/studies?limit=1``; 200 or 204 means the service answers
and takes our credentials.

Options (``destinations.options``): ``auth_header`` (the Authorization header value, e.g.
``"Bearer ..."``) or ``auth_header_env`` (the name of an environment variable holding it, to keep
the secret out of the database).
"""
from __future__ import annotations

import logging
import os
import uuid

import httpx

from dicom_node import scu
from dicom_node.destinations import FAILED, SENT, Context, Delivery, ObjectStatus, OutObject, Target, send_order, summarise

log = logging.getLogger(__name__)

_PERMANENT_HTTP = {400, 401, 403, 404, 405, 406, 413, 415}


def _headers(target: Target) -> dict[str, str]:
    headers = {}
    value = target.options.get("auth_header")
    env = target.options.get("auth_header_env")
    if env:
        value = os.environ.get(env) or value
    if value:
        headers["Authorization"] = value
    return headers


def _base(target: Target) -> str:
    return (target.url or "").rstrip("/")


def _refs(body: dict, tag: str) -> list[dict]:
    return ((body or {}).get(tag) or {}).get("Value") or []


def _uid_of(item: dict) -> str | None:
    v = (item.get("00081155") or {}).get("Value")
    return v[0] if v else None


def _stow_one(client: httpx.Client, target: Target, obj: OutObject) -> ObjectStatus | scu.Outcome:
    """POST one object; its status, or a transient Outcome when a retry may help."""
    boundary = uuid.uuid4().hex
    data = obj.path.read_bytes()
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
            + f"\r\n--{boundary}--\r\n".encode())
    headers = {**_headers(target), "Accept": "application/dicom+json",
               "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    where = f"{_base(target)}/studies"
    try:
        r = client.post(where, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return scu.Outcome(scu.Kind.TRANSIENT, f"STOW-RS to {where}: {type(exc).__name__}: {exc}")
    if r.status_code >= 500 or r.status_code in (408, 429):
        return scu.Outcome(scu.Kind.TRANSIENT, f"STOW-RS to {where}: HTTP {r.status_code}")
    if r.status_code in _PERMANENT_HTTP:
        return ObjectStatus(FAILED, f"STOW-RS to {where}: HTTP {r.status_code}")
    try:
        parsed = r.json() if r.content else {}
    except ValueError:
        parsed = {}
    for item in _refs(parsed, "00081198"):
        if _uid_of(item) == obj.sop_instance_uid:
            reason = ((item.get("00081197") or {}).get("Value") or ["?"])[0]
            return ObjectStatus(FAILED, f"STOW-RS to {where}: refused with failure reason {reason}")
    referenced = {_uid_of(i) for i in _refs(parsed, "00081199")}
    if r.status_code in (200, 202) and obj.sop_instance_uid in referenced:
        return ObjectStatus(SENT)
    if r.status_code == 409:
        return ObjectStatus(FAILED, f"STOW-RS to {where}: HTTP 409 (conflict: the object was refused)")
    # A 200 without a reference to the object is not an acknowledgement.
    return ObjectStatus(FAILED, f"STOW-RS to {where}: HTTP {r.status_code} without a reference to the object")


class DicomWebKind:
    name = "dicomweb"

    def echo(self, target: Target, ctx: Context) -> scu.Outcome:
        where = f"{_base(target)}/studies?limit=1"
        try:
            with httpx.Client(timeout=min(ctx.timeout, 10.0)) as client:
                r = client.get(where, headers={**_headers(target), "Accept": "application/dicom+json"})
        except httpx.HTTPError as exc:
            return scu.Outcome(scu.Kind.TRANSIENT, f"QIDO-RS probe of {where}: {type(exc).__name__}: {exc}")
        if r.status_code in (200, 204):
            return scu.Outcome(scu.Kind.OK, f"QIDO-RS probe of {where} succeeded (HTTP {r.status_code})")
        kind = scu.Kind.TRANSIENT if r.status_code >= 500 else scu.Kind.PERMANENT
        return scu.Outcome(kind, f"QIDO-RS probe of {where}: HTTP {r.status_code}")

    def send(self, target: Target, objects: list[OutObject], ctx: Context) -> Delivery:
        statuses: dict[str, ObjectStatus] = {}
        transient = None
        if not objects:
            return Delivery(scu.Outcome(scu.Kind.OK, "nothing left to send"), statuses)
        with httpx.Client(timeout=ctx.timeout) as client:
            for obj in send_order(objects):
                result = _stow_one(client, target, obj)
                if isinstance(result, scu.Outcome):
                    transient = result
                    break
                statuses[obj.sop_instance_uid] = result
                if result.state == SENT:
                    log.info("stored %s on %s (STOW-RS)", obj.sop_instance_uid, target.name)
        return Delivery(summarise(statuses, transient), statuses)
