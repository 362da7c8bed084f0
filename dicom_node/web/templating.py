"""Jinja2 set-up for the pages: filters, the CSRF token, flash messages."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from fastapi import Request
from fastapi.templating import Jinja2Templates

from dicom_node import __version__
from dicom_node.web.security import new_csrf_token
from dicom_node import presentation
from dicom_node.web.services import STATUS_LABELS, patient_label, suspicion_level


def _dt(value: datetime | None) -> str:
    if value is None:
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value * 100:.0f}%"


def _prob(value: float | None) -> str:
    """A probability or score to two decimals (``presentation.round_probability``)."""
    return "" if value is None else f"{presentation.round_probability(value):.2f}"


def _mm3(value: float | None) -> str:
    return "" if value is None else f"{presentation.round_mm3(value)} mm³"


def _mm(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f} mm"


def make_templates(directory: Path) -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(directory))
    env = templates.env
    env.filters["dt"] = _dt
    env.filters["pct"] = _pct
    env.filters["mm"] = _mm
    env.filters["mm3"] = _mm3
    env.filters["prob"] = _prob
    env.globals["patient_label"] = patient_label
    env.globals["nodule_colour"] = presentation.nodule_colour
    env.globals["BANDS"] = {"intermediate": presentation.INTERMEDIATE_SUSPICION_FROM,
                            "high": presentation.HIGH_SUSPICION_FROM}
    env.globals["STATUS_LABELS"] = STATUS_LABELS
    env.globals["suspicion"] = suspicion_level
    env.globals["version"] = __version__
    return templates


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not token:
        token = new_csrf_token()
        request.session["csrf"] = token
    return token


def flash(request: Request, kind: str, text: str) -> None:
    """A message shown once on the next page (kind: ok, error, info)."""
    request.session.setdefault("flash", [])
    request.session["flash"] = [*request.session["flash"], [kind, text]][-5:]


def render(request: Request, name: str, context: dict | None = None, status_code: int = 200):
    ctx = dict(context or {})
    ctx.setdefault("user", None)
    ctx["csrf_token"] = csrf_token(request)
    ctx["flashes"] = request.session.pop("flash", [])
    ctx.setdefault("session_user", request.session.get("user"))
    ctx.setdefault("session_role", request.session.get("role"))
    ctx.setdefault("nav", "")
    return request.app.state.templates.TemplateResponse(request, name, ctx, status_code=status_code)
