"""Administration pages (admin role only): node, sources, destinations, queues, logs, users.

Each form posts to its own URL with the session's CSRF token, the change is validated with the
same models as the API and the CLI and made by the application layer (``dicom_node.app``),
committed together with its audit event, and the page redirects back (post/redirect/get) with a
message saying what happened (or the refusal's sentence).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from sqlalchemy import select

from dicom_node.app import destinations as app_destinations
from dicom_node.app import rules as app_rules
from dicom_node.app import settings as app_settings
from dicom_node.app import sources as app_sources
from dicom_node.app import users as app_users
from dicom_node.app.errors import AppError, invalid
from dicom_node.routing import store as rule_store
from dicom_node.routing.dryrun import dry_run
from dicom_node.routing.rules import Rule
from dicom_node.web import schemas, services
from dicom_node.web.deps import CSRF, DB, NodeDep, PageAdmin, PageNumber, RowId
from dicom_node.web.routes.users import user_out
from dicom_node.web.services import ServiceError
from dicom_node.web.templating import flash, render
from storage import repo, users
from storage.models import Destination, Job, Source, Transfer

log = logging.getLogger(__name__)
router = APIRouter(prefix="/admin")

PAGE_SIZE = 50


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _validation_message(exc: ValidationError) -> str:
    return str(invalid(exc, unnamed="value"))


def _apply(request: Request, s, back: str, action: Callable[[], str]) -> RedirectResponse:
    """Run ``action`` (returns the success message), commit, flash, redirect to ``back``."""
    try:
        message = action()
        s.commit()
        flash(request, "ok", message)
    except ServiceError as exc:
        s.rollback()
        flash(request, "error", exc.message)
    except AppError as exc:
        s.rollback()
        flash(request, "error", str(exc))
    except ValidationError as exc:
        s.rollback()
        flash(request, "error", _validation_message(exc))
    return _see_other(back)


def _pages(total: int) -> int:
    return max(1, (total + PAGE_SIZE - 1) // PAGE_SIZE)


@router.get("")
def admin_home(user: PageAdmin) -> RedirectResponse:
    return _see_other("/admin/node")


# --- node settings ---------------------------------------------------------------------------------

@router.get("/node")
def node_page(request: Request, s: DB, node: NodeDep, user: PageAdmin):
    return render(request, "admin/node.html", {"user": user, "nav": "node", "title": "Node settings",
                                               "settings": app_settings.current(node, s),
                                               "config": node.settings})


@router.post("/node", dependencies=[CSRF])
def node_save(request: Request, s: DB, node: NodeDep, user: PageAdmin,
              ae_title: Annotated[str, Form()], port: Annotated[str, Form()],
              unknown_callers: Annotated[str, Form()], quiet_seconds: Annotated[str, Form()],
              min_slices: Annotated[str, Form()], max_slice_spacing_mm: Annotated[str, Form()],
              max_slice_thickness_mm: Annotated[str, Form()] = ""):
    def action() -> str:
        current = app_settings.current(node, s)
        given = {"node.ae_title": ae_title, "node.port": port, "node.unknown_callers": unknown_callers,
                 "completion.quiet_seconds": quiet_seconds, "eligibility.min_slices": min_slices,
                 "eligibility.max_slice_spacing_mm": max_slice_spacing_mm,
                 "eligibility.max_slice_thickness_mm": max_slice_thickness_mm}
        if not max_slice_thickness_mm.strip():
            del given["eligibility.max_slice_thickness_mm"]  # a form without the field (older page)
        parsed = app_settings.parse(given)
        changed = {k: v for k, v in parsed.changes().items() if current.get(k) != v}
        if not changed:
            return "Nothing changed."
        app_settings.update(node, s, user.username, app_settings.parse(changed))
        return "Saved: " + ", ".join(f"{k} = {v}" for k, v in changed.items()) + ". Takes effect without a restart."
    return _apply(request, s, "/admin/node", action)


# --- sources ----------------------------------------------------------------------------------------

@router.get("/sources")
def sources_page(request: Request, s: DB, user: PageAdmin, edit: str | None = None):
    rows = s.scalars(select(Source).order_by(Source.ae_title))
    return render(request, "admin/sources.html", {"user": user, "nav": "sources", "title": "Sources",
                                                  "sources": [app_sources.out(r) for r in rows], "edit": edit})


def _source_form(ae_title: str, host: str, description: str, enabled: str | None,
                 return_to: str = "", quiet_seconds: str = "") -> schemas.SourceIn:
    return schemas.SourceIn(ae_title=ae_title, host=host, description=description, enabled=bool(enabled),
                            return_to=return_to, quiet_seconds=quiet_seconds)


@router.post("/sources", dependencies=[CSRF])
def source_add(request: Request, s: DB, user: PageAdmin, ae_title: Annotated[str, Form()] = "",
               host: Annotated[str, Form()] = "", description: Annotated[str, Form()] = "",
               enabled: Annotated[str | None, Form()] = None, return_to: Annotated[str, Form()] = "",
               quiet_seconds: Annotated[str, Form()] = ""):
    def action() -> str:
        data = _source_form(ae_title, host, description, enabled, return_to, quiet_seconds)
        app_sources.add(s, user.username, data)
        return f"Source {data.ae_title} added; the listener accepts it from now on."
    return _apply(request, s, "/admin/sources", action)


@router.post("/sources/{current}/update", dependencies=[CSRF])
def source_update(request: Request, s: DB, user: PageAdmin, current: str, ae_title: Annotated[str, Form()] = "",
                  host: Annotated[str, Form()] = "", description: Annotated[str, Form()] = "",
                  enabled: Annotated[str | None, Form()] = None, return_to: Annotated[str, Form()] = "",
                  quiet_seconds: Annotated[str, Form()] = ""):
    def action() -> str:
        data = _source_form(ae_title, host, description, enabled, return_to, quiet_seconds)
        app_sources.update(s, user.username, current, data)
        return f"Source {data.ae_title} saved."
    return _apply(request, s, "/admin/sources", action)


@router.post("/sources/{ae_title}/remove", dependencies=[CSRF])
def source_remove(request: Request, s: DB, user: PageAdmin, ae_title: str):
    def action() -> str:
        app_sources.remove(s, user.username, ae_title)
        return f"Source {ae_title} removed."
    return _apply(request, s, "/admin/sources", action)


# --- destinations -------------------------------------------------------------------------------------

@router.get("/destinations")
def destinations_page(request: Request, s: DB, user: PageAdmin, edit: str | None = None):
    rows = s.scalars(select(Destination).order_by(Destination.name))
    echo = request.session.pop("echo", None)
    return render(request, "admin/destinations.html", {
        "user": user, "nav": "destinations", "title": "Destinations",
        "destinations": [app_destinations.out(r) for r in rows], "edit": edit, "echo": echo,
        "outputs": [("sr", "Structured report (TID 1500)"), ("seg", "Segmentation"), ("sc", "Key images (secondary capture)")]})


def _destination_form(name: str, kind: str, ae_title: str, host: str, port: str, url: str, outputs: list[str],
                      enabled: str | None, tls: str | None = None) -> schemas.DestinationIn:
    return schemas.DestinationIn.model_validate({
        "name": name.strip(), "kind": kind or "dicom", "ae_title": ae_title, "host": host.strip(),
        "port": port.strip() or 0, "url": url, "outputs": outputs, "enabled": bool(enabled), "tls": bool(tls)})


@router.post("/destinations", dependencies=[CSRF])
def destination_add(request: Request, s: DB, user: PageAdmin, name: Annotated[str, Form()] = "",
                    kind: Annotated[str, Form()] = "dicom", ae_title: Annotated[str, Form()] = "",
                    host: Annotated[str, Form()] = "", port: Annotated[str, Form()] = "",
                    url: Annotated[str, Form()] = "", outputs: Annotated[list[str], Form()] = [],  # noqa: B006
                    enabled: Annotated[str | None, Form()] = None, tls: Annotated[str | None, Form()] = None):
    def action() -> str:
        data = _destination_form(name, kind, ae_title, host, port, url, outputs, enabled, tls)
        app_destinations.add(s, user.username, data)
        return f"Destination {data.name} added."
    return _apply(request, s, "/admin/destinations", action)


@router.post("/destinations/{current}/update", dependencies=[CSRF])
def destination_update(request: Request, s: DB, user: PageAdmin, current: str, name: Annotated[str, Form()] = "",
                       kind: Annotated[str, Form()] = "dicom", ae_title: Annotated[str, Form()] = "",
                       host: Annotated[str, Form()] = "", port: Annotated[str, Form()] = "",
                       url: Annotated[str, Form()] = "", outputs: Annotated[list[str], Form()] = [],  # noqa: B006
                       enabled: Annotated[str | None, Form()] = None, tls: Annotated[str | None, Form()] = None):
    def action() -> str:
        data = _destination_form(name, kind, ae_title, host, port, url, outputs, enabled, tls)
        app_destinations.update(s, user.username, current, data)
        return f"Destination {data.name} saved."
    return _apply(request, s, "/admin/destinations", action)


@router.post("/destinations/{name}/remove", dependencies=[CSRF])
def destination_remove(request: Request, s: DB, user: PageAdmin, name: str):
    def action() -> str:
        app_destinations.remove(s, user.username, name)
        return f"Destination {name} removed."
    return _apply(request, s, "/admin/destinations", action)


@router.post("/destinations/{name}/echo", dependencies=[CSRF])
def destination_echo(request: Request, s: DB, node: NodeDep, user: PageAdmin, name: str):
    s.close()  # the echo opens its own short transactions; hold nothing while waiting on the peer
    try:
        result = services.echo_destination(node, name, user.username)
        request.session["echo"] = {"name": name, "ok": result.ok, "message": result.message}
    except ServiceError as exc:
        flash(request, "error", exc.message)
    return _see_other("/admin/destinations")


# --- queues -------------------------------------------------------------------------------------------

@router.get("/queues")
def queues_page(request: Request, s: DB, user: PageAdmin, transfer_state: str = "open", job_state: str = "",
                page: PageNumber = 1):
    if transfer_state == "open":
        pending, _ = services.list_transfers(s, "pending", 1, 100)
        failed, _ = services.list_transfers(s, "failed", 1, 100)
        sending, _ = services.list_transfers(s, "sending", 1, 100)
        transfers = sorted(failed + sending + pending, key=lambda x: -x[0].id)
    else:
        try:
            transfers, _ = services.list_transfers(s, transfer_state or None, 1, 100)
        except ServiceError:
            transfers = []
    try:
        jobs, jobs_total = services.list_jobs(s, job_state or None, page, PAGE_SIZE)
    except ServiceError:
        jobs, jobs_total = [], 0
    counts = {"transfers": repo.count_by(s, Transfer.state), "jobs": repo.count_by(s, Job.state)}
    return render(request, "admin/queues.html", {
        "user": user, "nav": "queues", "title": "Queues",
        "transfers": [services.transfer_out(t, n) for t, n in transfers], "jobs": jobs, "counts": counts,
        "transfer_state": transfer_state, "job_state": job_state, "page": page, "pages": _pages(jobs_total)})


@router.post("/transfers/{transfer_id}/retry", dependencies=[CSRF])
def transfer_retry(request: Request, s: DB, user: PageAdmin, transfer_id: RowId):
    def action() -> str:
        services.retry_transfer(s, user.username, transfer_id)
        return f"Transfer {transfer_id} queued again."
    return _apply(request, s, "/admin/queues", action)


@router.post("/transfers/{transfer_id}/cancel", dependencies=[CSRF])
def transfer_cancel(request: Request, s: DB, user: PageAdmin, transfer_id: RowId):
    def action() -> str:
        services.cancel_transfer(s, user.username, transfer_id)
        return f"Transfer {transfer_id} cancelled."
    return _apply(request, s, "/admin/queues", action)


@router.post("/jobs/{job_id}/rerun", dependencies=[CSRF])
def job_rerun(request: Request, s: DB, user: PageAdmin, job_id: RowId):
    def action() -> str:
        job = services.rerun_job(s, user.username, job_id)
        return f"Job {job_id} re-run as job {job.id}."
    return _apply(request, s, "/admin/queues", action)


# --- logs ---------------------------------------------------------------------------------------------

@router.get("/associations")
def associations_page(request: Request, s: DB, user: PageAdmin, result: str = "", page: PageNumber = 1):
    try:
        rows, total = services.list_associations(s, result or None, page, PAGE_SIZE)
    except ServiceError:
        rows, total = [], 0
    base = {"result": result} if result else {}
    return render(request, "admin/associations.html", {
        "user": user, "nav": "associations", "title": "Association log",
        "rows": [services.association_out(a) for a in rows], "total": total, "page": page, "pages": _pages(total),
        "result": result, "base_query": urlencode(base)})


@router.get("/audit")
def audit_page(request: Request, s: DB, user: PageAdmin, page: PageNumber = 1):
    rows, total = services.list_audit(s, page, PAGE_SIZE)
    return render(request, "admin/audit.html", {
        "user": user, "nav": "audit", "title": "Audit trail", "rows": [services.audit_out(a) for a in rows],
        "total": total, "page": page, "pages": _pages(total)})


# --- users ----------------------------------------------------------------------------------------------

@router.get("/users")
def users_page(request: Request, s: DB, user: PageAdmin):
    return render(request, "admin/users.html", {"user": user, "nav": "users", "title": "Users",
                                                "users": [user_out(u) for u in users.list_users(s)]})


@router.post("/users", dependencies=[CSRF])
def user_add(request: Request, s: DB, user: PageAdmin, username: Annotated[str, Form()] = "",
             role: Annotated[str, Form()] = "radiologist", password: Annotated[str, Form()] = ""):
    def action() -> str:
        data = schemas.UserIn(username=username.strip(), role=role, password=password)
        app_users.add(s, user.username, data.username, data.role, app_users.hash_password(data.password))
        return f"User {data.username} added as {data.role}."
    return _apply(request, s, "/admin/users", action)


@router.post("/users/{username}/update", dependencies=[CSRF])
def user_update(request: Request, s: DB, user: PageAdmin, username: str, role: Annotated[str, Form()] = "",
                password: Annotated[str, Form()] = ""):
    def action() -> str:
        data = schemas.UserUpdate(role=role or None, password=password or None)
        app_users.update(s, user.username, username, role=data.role,
                         password_hash=None if data.password is None else app_users.hash_password(data.password))
        what = [w for w, v in (("role", role), ("password", password)) if v]
        return f"User {username}: {' and '.join(what) or 'nothing'} changed."
    return _apply(request, s, "/admin/users", action)


@router.post("/users/{username}/remove", dependencies=[CSRF])
def user_remove(request: Request, s: DB, user: PageAdmin, username: str):
    def action() -> str:
        app_users.remove(s, user.username, username)
        return f"User {username} removed."
    return _apply(request, s, "/admin/users", action)


# --- routing rules ----------------------------------------------------------------------------------

RULE_EXAMPLE = ('{"name": "chest-ct", "match": {"Modality": "CT", "BodyPartExamined": "/CHEST|LUNG/"},\n'
                ' "actions": ["analyse"], "destinations": ["sender"]}')


def _rule_from_json(text: str):
    """A rule from the page's JSON text area (same fields as ``[[rules]]`` and the API)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ServiceError(422, f"the rule is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ServiceError(422, "the rule must be a JSON object, e.g. " + RULE_EXAMPLE)
    return Rule.model_validate(data)


def _rules_context(s, user, **extra) -> dict:
    rows = rule_store.list_rows(s)
    rules = [(r, rule_store.rule_of(r)) for r in rows]
    return {"user": user, "nav": "rules", "title": "Routing rules", "example": RULE_EXAMPLE,
            "rules": [{"row": r, "rule": rule, "json": json.dumps(rule.model_dump(exclude_defaults=True, exclude={"name"})
                                                                  | {"name": rule.name}, indent=1),
                       "match": ", ".join(f"{k} = {json.dumps(v)}" for k, v in rule.match.items()) or "every series"}
                      for r, rule in rules], **extra}


@router.get("/rules")
def rules_page(request: Request, s: DB, user: PageAdmin, edit: str | None = None):
    return render(request, "admin/rules.html", _rules_context(s, user, edit=edit))


@router.post("/rules", dependencies=[CSRF])
def rule_add(request: Request, s: DB, user: PageAdmin, rule: Annotated[str, Form()] = "",
             position: Annotated[str, Form()] = ""):
    def action() -> str:
        data = _rule_from_json(rule)
        row = app_rules.add(s, user.username, data, int(position) if position.strip().isdigit() else None)
        return f"Rule {data.name} added at position {row.position}; it applies to the next series decided."
    return _apply(request, s, "/admin/rules", action)


@router.post("/rules/{current}/update", dependencies=[CSRF])
def rule_update(request: Request, s: DB, user: PageAdmin, current: str, rule: Annotated[str, Form()] = ""):
    def action() -> str:
        data = _rule_from_json(rule)
        app_rules.update(s, user.username, current, data)
        return f"Rule {data.name} saved; it applies to the next series decided."
    return _apply(request, s, "/admin/rules", action)


@router.post("/rules/{name}/move", dependencies=[CSRF])
def rule_move(request: Request, s: DB, user: PageAdmin, name: str, position: Annotated[str, Form()] = ""):
    def action() -> str:
        if not position.strip().isdigit():
            raise ServiceError(422, f"position must be a whole number, got {position!r}")
        app_rules.move(s, user.username, name, int(position))
        return f"Rule {name} moved to position {int(position)}."
    return _apply(request, s, "/admin/rules", action)


@router.post("/rules/{name}/remove", dependencies=[CSRF])
def rule_remove(request: Request, s: DB, user: PageAdmin, name: str):
    def action() -> str:
        app_rules.remove(s, user.username, name)
        return f"Rule {name} removed."
    return _apply(request, s, "/admin/rules", action)


@router.post("/rules/dry-run", dependencies=[CSRF])
def rule_dry_run(request: Request, s: DB, node: NodeDep, user: PageAdmin,
                 study_instance_uid: Annotated[str, Form()] = "", attributes: Annotated[str, Form()] = ""):
    """Renders the page with the result (nothing changes, so no redirect)."""
    error, result = None, None
    try:
        if study_instance_uid.strip():
            result = dry_run(node, s, study_instance_uid=study_instance_uid.strip())
        else:
            try:
                attrs = json.loads(attributes or "")
            except json.JSONDecodeError as exc:
                raise ServiceError(422, f"the attributes are not valid JSON: {exc.msg}") from None
            if not isinstance(attrs, dict):
                raise ServiceError(422, 'the attributes must be a JSON object, e.g. {"Modality": "CT"}')
            result = dry_run(node, s, attributes=attrs)
    except ServiceError as exc:
        error = exc.message
    except AppError as exc:
        error = str(exc)
    return render(request, "admin/rules.html", _rules_context(
        s, user, dry_run=result, dry_run_error=error, dry_study=study_instance_uid, dry_attributes=attributes),
        status_code=200 if error is None else 422)
