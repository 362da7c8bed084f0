"""Pages for everyone with an account: login, the worklist, the study page and its actions."""
from __future__ import annotations

import logging
from datetime import date
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import RedirectResponse

from dicom_node.web import services
from dicom_node.web.deps import CSRF, DB, MAX_ROW_ID, PageAdmin, PageNumber, PageUser, client_host, get_auth, session_user
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
        "studies": [services.study_summary(r) for r in rows], "total": total, "page": query.page, "pages": pages,
        "filters": filters, "counts": services.status_counts(s), "refresh_seconds": REFRESH_SECONDS,
        "prev_url": f"/worklist?{urlencode({**base, 'page': query.page - 1})}" if query.page > 1 else None,
        "next_url": f"/worklist?{urlencode({**base, 'page': query.page + 1})}" if query.page < pages else None,
        "refresh_url": f"/worklist?{urlencode({**base, 'page': query.page, 'fragment': 1})}",
    }
    return render(request, "worklist_results.html" if fragment else "worklist.html", ctx)


@router.get("/studies/{study_uid}")
def study_page(request: Request, s: DB, user: PageUser, study_uid: str,
               finding: Annotated[int | None, Query(ge=1, le=MAX_ROW_ID)] = None,
               offset: Annotated[int, Query(ge=-2000, le=2000)] = 0, zoom: Annotated[int, Query(ge=1, le=4)] = 1):
    detail = services.study_detail(s, study_uid) if _exists(s, study_uid) else None
    if detail is None:
        return render(request, "error.html", {"user": user, "title": "Not found", "code": 404,
                                             "message": f"No study with Study Instance UID {study_uid}."},
                      status_code=404)
    selected = next((f for f in detail.findings if f.id == finding), detail.findings[0] if detail.findings else None)
    return render(request, "study.html", {
        "user": user, "nav": "worklist", "title": f"Study {detail.accession_number or detail.study_instance_uid}",
        "study": detail, "selected": selected, "offset": max(-500, min(500, offset)),
        "zoom": zoom if zoom in (1, 2, 4) else 1,
        "analysed_series": [x for x in detail.series if not x.is_result],
    })


def _exists(s, study_uid: str) -> bool:
    try:
        services.get_study(s, study_uid)
        return True
    except ServiceError:
        return False


@router.post("/studies/{study_uid}/rerun", dependencies=[CSRF])
def study_rerun(request: Request, s: DB, user: PageUser, study_uid: str):
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
    from dicom_node.completion import request_complete

    try:
        uids = request_complete(s, user.username, study_uid)
        s.commit()
        flash(request, "ok", f"Complete now: {len(uids)} series will be evaluated at the next scheduler pass.")
    except LookupError as exc:
        s.rollback()
        flash(request, "error", str(exc))
    return _see_other(f"/studies/{study_uid}")


@router.post("/studies/{study_uid}/resend", dependencies=[CSRF])
def study_resend(request: Request, s: DB, user: PageUser, study_uid: str):
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

