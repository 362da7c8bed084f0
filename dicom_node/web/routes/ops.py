"""Operations: ``/metrics`` (Prometheus text), ``/healthz`` (disk, database, stages), and the
offline API docs at ``/docs``.

``/metrics`` and ``/healthz`` need no login (scrapers and load balancers have none); they
expose counts only, no patient data. ``/docs`` is Swagger UI served from this package's static
files (no CDN); ``/openapi.json`` is the schema.
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dicom_node.health import check_health

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics, computed from the database")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", summary="Disk, database and stage health (503 when any is not ok)")
def healthz(request: Request) -> JSONResponse:
    """200 with ``status`` "ok", or 503 with "error" and every reason in ``problems``: free disk
    of the data directory against ``[node] min_free_disk_mb``, the database, and each stage's
    newest heartbeat (see ``dicom_node.health``)."""
    body = check_health(request.app.state.node)
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


@router.get("/docs", include_in_schema=False, response_class=HTMLResponse)
def docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json", title="dicom-node API",
        swagger_js_url="/static/swagger-ui-bundle.js", swagger_css_url="/static/swagger-ui.css",
        swagger_favicon_url="/static/favicon.svg",
        swagger_ui_parameters={"persistAuthorization": False, "defaultModelsExpandDepth": 0})
