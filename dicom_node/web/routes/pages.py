"""Pages for everyone with an account: login, the worklist, the study page and its actions."""
from __future__ import annotations

import logging
from datetime import date
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Path, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import ValidationError

from dicom_node import presentation
from dicom_node.web import schemas, services
from dicom_node.web.deps import CSRF, DB, MAX_ROW_ID, NodeDep, PageAdmin, PageNumber, PageUser, client_host, get_auth, session_user
from dicom_node.web.login import PAGE
from dicom_node.web.security import new_csrf_token
from dicom_node.web.services import ServiceError
from dicom_node.web.templating import flash, render
from storage import users

log = logging.getLogger(__name__)
router = APIRouter()

REFRESH_SECONDS = 15


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/worklist"


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


@router.get("/")
def home() -> RedirectResponse:
    return _see_other("/worklist")


@router.get("/login")
def login_page(request: Request, s: DB, next: str = "/worklist"):
    if session_user(request, s) is not None:
        return _see_other(_safe_next(next))
    no_users = users.count_users(s) == 0
    return render(request, "login.html", {"next": _safe_next(next), "no_users": no_users, "title": "Sign in"})


@router.post("/login", dependencies=[CSRF])
def login(request: Request, username: Annotated[str, Form()] = "", password: Annotated[str, Form()] = "",
          next: Annotated[str, Form()] = "/worklist"):
    result = get_auth(request).login(username, password, client_host(request), PAGE)
    if result.retry_after:
        response = render(request, "login.html", {
            "next": _safe_next(next), "username": username, "title": "Sign in",
            "error": f"Too many failed sign-ins from this computer. Try again in {result.retry_after} s."},
            status_code=429)
        response.headers["Retry-After"] = str(result.retry_after)
        return response
    if not result.ok:
        return render(request, "login.html", {"next": _safe_next(next), "error": "Wrong user name or password.",
                                             "username": username, "title": "Sign in"}, status_code=401)
    request.session.clear()  # a new session secret and CSRF token: nothing survives from before login
    request.session.update({"sid": result.secret, "user": result.user.username, "role": result.user.role.value,
                            "csrf": new_csrf_token()})
    return _see_other(_safe_next(next))


@router.post("/logout", dependencies=[CSRF])
def logout(request: Request):
    """End this browser's session on the server too: a copy of the cookie is worthless after."""
    get_auth(request).logout(request.session.get("sid"), request.session.get("user") or "(unknown)",
                             client_host(request), PAGE)
    request.session.clear()
    return _see_other("/login")


def _parse_date(value: str | None) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


@router.get("/worklist")
def worklist(request: Request, s: DB, user: PageUser, status: str = "", date_from: str = "", date_to: str = "",
             modality: str = "", q: str = "", sort: str = "suspicion", page: PageNumber = 1,
             fragment: Annotated[int, Query(ge=0, le=1)] = 0):
    query = services.StudyQuery(status=status or None, date_from=_parse_date(date_from), date_to=_parse_date(date_to),
                                modality=modality or None, q=q or None,
                                sort=sort if sort in services.SORTS else "suspicion", page=page, page_size=50)
    if query.status and query.status not in services.STATUS_LABELS:
        query.status = None
    rows, total = services.list_studies(s, query)
    filters = {"status": status, "date_from": date_from, "date_to": date_to, "modality": modality, "q": q, "sort": sort}
    base = {k: v for k, v in filters.items() if v}
    pages = max(1, (total + query.page_size - 1) // query.page_size)
    ctx = {
        "user": user, "nav": "worklist", "title": "Worklist",
        "studies": services.study_summaries(s, rows), "total": total, "page": query.page, "pages": pages,
        "filters": filters, "counts": services.status_counts(s), "refresh_seconds": REFRESH_SECONDS,
        "prev_url": f"/worklist?{urlencode({**base, 'page': query.page - 1})}" if query.page > 1 else None,
        "next_url": f"/worklist?{urlencode({**base, 'page': query.page + 1})}" if query.page < pages else None,
        "refresh_url": f"/worklist?{urlencode({**base, 'page': query.page, 'fragment': 1})}",
    }
    return render(request, "worklist_results.html" if fragment else "worklist.html", ctx)


def _actions(s, study) -> dict:
    """Which study actions make sense now: re-run needs a job; re-send a finished job with result
    objects and an enabled destination that takes them."""
    from sqlalchemy import select

    from storage.models import Destination, ResultObject

    rerun = bool(services.latest_job_ids(s, study))
    done = services.latest_done_job_ids(s, study)
    kinds = {k for (k,) in s.execute(select(ResultObject.kind).where(ResultObject.job_id.in_(done)))} if done else set()
    outputs = {o for (outs,) in s.execute(select(Destination.outputs).where(Destination.enabled.is_(True)))
               for o in (outs or [])}
    return {"rerun": rerun, "resend": bool(kinds & outputs), "result_kinds": sorted(kinds)}


def _not_found_page(request, user, study_uid: str):
    return render(request, "error.html", {"user": user, "title": "Not found", "code": 404,
                                         "message": f"No study with Study Instance UID {study_uid}."}, status_code=404)


@router.get("/studies/{study_uid}")
def study_page(request: Request, s: DB, node: NodeDep, user: PageUser, study_uid: str,
               finding: Annotated[int | None, Query(ge=1, le=MAX_ROW_ID)] = None,
               offset: Annotated[int, Query(ge=-2000, le=2000)] = 0, zoom: Annotated[int, Query(ge=1, le=4)] = 1,
               window: str = "lung"):
    detail = services.study_detail(s, study_uid, node) if _exists(s, study_uid) else None
    if detail is None:
        return _not_found_page(request, user, study_uid)
    for t in detail.transfers:
        t.error = services.visible_transfer_error(user.role, t.error)
    selected = next((f for f in detail.findings if f.id == finding), detail.findings[0] if detail.findings else None)
    return render(request, "study.html", {
        "user": user, "nav": "worklist", "title": f"Study {detail.accession_number or detail.study_instance_uid}",
        "study": detail, "selected": selected, "offset": max(-500, min(500, offset)),
        "zoom": zoom if zoom in (1, 2, 4) else 1, "window": window if window in WINDOW_PRESETS else "lung",
        "windows": WINDOW_PRESETS, "bands": BANDS, "is_admin": user.role.value == "admin",
        "patient": services.patient_label(detail.patient_name, detail.patient_id),
        "actions": _actions(s, services.get_study(s, study_uid)),
        "analysed_series": [x for x in detail.series if not x.is_result],
    })


def _window_presets() -> dict:
    from dicom_node.render import WINDOWS

    return {k: {"level": lv, "width": w} for k, (lv, w) in WINDOWS.items()}


WINDOW_PRESETS = _window_presets()
BANDS = {"intermediate": presentation.INTERMEDIATE_SUSPICION_FROM, "high": presentation.HIGH_SUSPICION_FROM}


def _exists(s, study_uid: str) -> bool:
    try:
        services.get_study(s, study_uid)
        return True
    except ServiceError:
        return False


FindingNumber = Annotated[int, Path(ge=1, le=100_000)]


@router.post("/studies/{study_uid}/findings/{number}/review", dependencies=[CSRF])
def study_review(request: Request, s: DB, user: PageUser, study_uid: str, number: FindingNumber,
                 decision: Annotated[str, Form()] = "", comment: Annotated[str, Form()] = ""):
    """A reader's accept/reject from the study page: a redirect back (no JS) or JSON (fetch)."""
    wants_json = "application/json" in request.headers.get("accept", "")
    try:
        try:
            body = schemas.ReviewIn(decision=decision, comment=comment or None)
        except ValidationError:
            raise ServiceError(422, f"decision {decision!r} is not one of ['accepted', 'rejected']") from None
        f = services.review_finding(s, user.username, study_uid, number, body)
        s.commit()
        text = f"Nodule {number} {body.decision}."
        if wants_json:
            counts = services.review_counts(s, [f.study_id]).get(f.study_id)
            return JSONResponse({"number": number, "finding_id": f.id, "decision": f.review.decision,
                                 "comment": f.review.comment, "reviewer": f.review.reviewer,
                                 "reviewed_at": f.review.reviewed_at.isoformat(), "message": text,
                                 "reviews": counts.model_dump() if counts else None})
        flash(request, "ok", text)
        return _see_other(f"/studies/{study_uid}?finding={f.id}#nodules")
    except ServiceError as exc:
        s.rollback()
        if wants_json:
            return JSONResponse({"detail": exc.message}, status_code=exc.status_code)
        flash(request, "error", exc.message)
        return _see_other(f"/studies/{study_uid}#nodules")


CONFIRM = {
    "rerun": ("Re-run the analysis?",
              "The model runs again on this study's series. New results replace the current ones on this page "
              "and are sent to the destinations as new objects; readers' reviews of the current findings stay "
              "with the old results.", "Re-run analysis"),
    "resend": ("Re-send the results?",
               "The current result objects ({kinds}) are queued again for every enabled destination that takes "
               "them. A PACS that already has them receives them a second time.", "Re-send results"),
}


@router.get("/studies/{study_uid}/rerun")
def study_rerun_confirm(request: Request, s: DB, user: PageUser, study_uid: str):
    return _confirm_page(request, s, user, study_uid, "rerun")


@router.get("/studies/{study_uid}/resend")
def study_resend_confirm(request: Request, s: DB, user: PageUser, study_uid: str):
    return _confirm_page(request, s, user, study_uid, "resend")


def _confirm_page(request: Request, s, user, study_uid: str, action: str):
    """The confirmation step of re-run and re-send (a page: works without JavaScript)."""
    if not _exists(s, study_uid):
        return _not_found_page(request, user, study_uid)
    study = services.get_study(s, study_uid)
    allowed = _actions(s, study)
    title, text, button = CONFIRM[action]
    return render(request, "confirm.html", {
        "user": user, "nav": "worklist", "title": title, "study_uid": study_uid, "action": action,
        "patient": services.patient_label(services.patient_name(study.patient_name), study.patient_id),
        "accession": study.accession_number,
        "text": text.format(kinds=", ".join(k.upper() for k in allowed["result_kinds"]) or "none"),
        "button": button, "allowed": allowed[action],
        "why_not": None if allowed[action] else (
            "This study has no job to re-run yet." if action == "rerun" else
            "There is nothing to re-send: no finished results, or no enabled destination takes them."),
    })


def _confirmed(request: Request, study_uid: str, action: str, confirmed: str):
    if confirmed != "yes":
        flash(request, "info", "Nothing was done: confirm on this page first.")
        return _see_other(f"/studies/{study_uid}/{action}")
    return None


@router.post("/studies/{study_uid}/rerun", dependencies=[CSRF])
def study_rerun(request: Request, s: DB, user: PageUser, study_uid: str,
                confirmed: Annotated[str, Form()] = ""):
    if (back := _confirmed(request, study_uid, "rerun", confirmed)) is not None:
        return back
    try:
        study = services.get_study(s, study_uid)
        job_ids = services.latest_job_ids(s, study)
        if not job_ids:
            raise ServiceError(409, "this study has no job to re-run yet")
        new = [services.rerun_job(s, user.username, j) for j in job_ids]
        s.commit()
        flash(request, "ok", f"Re-run queued: job {', '.join(str(j.id) for j in new)}.")
    except ServiceError as exc:
        s.rollback()
        flash(request, "error", exc.message)
    return _see_other(f"/studies/{study_uid}")


@router.post("/studies/{study_uid}/complete", dependencies=[CSRF])
def study_complete(request: Request, s: DB, user: PageAdmin, study_uid: str):
    try:
        uids = services.complete_now(s, user.username, study_uid)
        s.commit()
        flash(request, "ok", f"Complete now: {len(uids)} series will be evaluated at the next scheduler pass.")
    except ServiceError as exc:
        s.rollback()
        flash(request, "error", exc.message)
    return _see_other(f"/studies/{study_uid}")


@router.post("/studies/{study_uid}/resend", dependencies=[CSRF])
def study_resend(request: Request, s: DB, user: PageUser, study_uid: str,
                 confirmed: Annotated[str, Form()] = ""):
    if (back := _confirmed(request, study_uid, "resend", confirmed)) is not None:
        return back
    try:
        study = services.get_study(s, study_uid)
        job_ids = services.latest_done_job_ids(s, study)
        if not job_ids:
            raise ServiceError(409, "this study has no finished job whose results could be sent")
        created = [t for j in job_ids for t in services.resend_job(s, user.username, j, None)]
        s.commit()
        flash(request, "ok", f"Re-send queued: {len(created)} transfer(s).")
    except ServiceError as exc:
        s.rollback()
        flash(request, "error", exc.message)
    return _see_other(f"/studies/{study_uid}")
