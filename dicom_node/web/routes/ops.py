"""Operations: ``/metrics`` (Prometheus text), ``/healthz``, and the offline API docs at ``/docs``.

``/metrics`` and ``/healthz`` need no login (scrapers and load balancers have none); they
expose counts only, no patient data. ``/docs`` is Swagger UI served from this package's static
files (no CDN); ``/openapi.json`` is the schema.
"""
from __future__ import annotations

import shutil
from datetime import timezone

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text

from storage.models import StageHeartbeat, utcnow

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics, computed from the database")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", summary="Disk, database and stage health (503 when any is not ok)")
def healthz(request: Request) -> JSONResponse:
    """``status`` "ok" (200) or "error" (503) with every ``problems`` line; ``disk``: free bytes on
    the data directory's filesystem against ``[node] min_free_disk_mb``; ``database``; ``stages``:
    per stage the newest heartbeat's age in seconds (any host), "ok", "stale" (older than
    ``[node] stage_stale_seconds``) or "down" (none); a stale or down stage in ``[node]
    required_stages`` makes it 503."""
    node = request.app.state.node
    cfg = node.settings.node
    problems: list[str] = []
    body: dict = {"status": "ok"}
    try:
        usage = shutil.disk_usage(cfg.data_dir)
        min_free = int(cfg.min_free_disk_mb * 1024 * 1024)
        low = usage.free < min_free
        body["disk"] = {"status": "low" if low else "ok", "free_bytes": usage.free, "total_bytes": usage.total,
                        "min_free_bytes": min_free}
        if low:
            problems.append(f"disk: {usage.free // 2**20} MiB free on the data directory's filesystem, "
                            f"below the {cfg.min_free_disk_mb:g} MiB watermark")
    except OSError as exc:
        body["disk"] = {"status": "error"}
        problems.append(f"disk: cannot read free space of the data directory ({exc.strerror or type(exc).__name__})")
    try:
        with node.sessions() as s:
            s.execute(text("SELECT 1"))
            beats = s.execute(select(StageHeartbeat.stage, func.max(StageHeartbeat.last_seen), func.count())
                              .group_by(StageHeartbeat.stage)).all()
        body["database"] = "ok"
    except Exception as exc:  # noqa: BLE001
        body["database"] = f"unreachable: {type(exc).__name__}"
        problems.append(f"database: unreachable ({type(exc).__name__})")
        beats = None
    if beats is not None:
        now = utcnow()
        seen = {stage: (last, n) for stage, last, n in beats}
        stages = {}
        for stage in dict.fromkeys([*cfg.required_stages, *sorted(seen)]):
            required = stage in cfg.required_stages
            if stage not in seen:
                stages[stage] = {"status": "down", "required": required}
            else:
                last, n = seen[stage]
                if last.tzinfo is None:  # SQLite through func.max() loses the column type
                    last = last.replace(tzinfo=timezone.utc)
                age = max(0.0, (now - last).total_seconds())
                state = "stale" if age > cfg.stage_stale_seconds else "ok"
                stages[stage] = {"status": state, "age_seconds": round(age, 1), "processes": n,
                                 "required": required}
            if required and stages[stage]["status"] != "ok":
                problems.append(f"stage {stage}: {stages[stage]['status']}"
                                + (f" (last heartbeat {stages[stage]['age_seconds']:.0f} s ago)"
                                   if "age_seconds" in stages[stage] else " (no heartbeat)"))
        body["stages"] = stages
    if problems:
        body["status"] = "error"
        body["problems"] = problems
    return JSONResponse(body, status_code=503 if problems else 200)


@router.get("/docs", include_in_schema=False, response_class=HTMLResponse)
def docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json", title="dicom-node API",
        swagger_js_url="/static/swagger-ui-bundle.js", swagger_css_url="/static/swagger-ui.css",
        swagger_favicon_url="/static/favicon.svg",
        swagger_ui_parameters={"persistAuthorization": False, "defaultModelsExpandDepth": 0})
