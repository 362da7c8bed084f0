"""The web stage: worklist and study pages, admin pages, JSON API, metrics.

Contract: ``create_app(node)`` builds a FastAPI application from a ``Node`` (settings, session
factory, file store) and holds no other state than caches; it reads everything from the
database on each request, so several web processes on several hosts may serve one node, and
changes made by the listener, worker and dispatcher show at once. Nothing is fetched from the
network at run time: templates, styles, scripts and the API docs (Swagger UI) are served from
this package.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import HTTPException as FastAPIHTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.sessions import SessionMiddleware

from dicom_node import __version__
from dicom_node.node import Node
from dicom_node.web.deps import LoginRequired, PageForbidden, session_user
from dicom_node.web.headers import ContentSecurityPolicies, SecurityHeaders, inline_script_hashes
from dicom_node.web.images import KeyImages
from dicom_node.web.login import Authenticator
from dicom_node.web.metrics import make_registry
from dicom_node.web.security import SESSION_SECONDS, LoginLimiter, load_secret_key, prepare_dummy_hash
from dicom_node.app.errors import AppError
from dicom_node.web.services import ServiceError
from dicom_node.web.templating import make_templates, render
from storage import users

log = logging.getLogger(__name__)

HERE = Path(__file__).parent

DESCRIPTION = """JSON API of the dicom-node web stage: the worklist, studies and findings, sources,
destinations (with C-ECHO), queues, the association log, users and runtime settings.

Authenticate with `POST /api/token` (OAuth2 password flow) and send `Authorization: Bearer <token>`.
Roles: **radiologist** (worklist, studies, re-run/re-send) and **admin** (everything).
Research use only; not a medical device."""


def _warn_if_no_user(node: Node) -> None:
    with node.sessions() as s:
        if users.count_users(s) == 0:
            log.warning("no web user exists yet; create an admin with: "
                        "echo 'PASSWORD' | dicom-node user add NAME --role admin --password-stdin --config PATH")


def create_app(node: Node) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        _warn_if_no_user(node)
        yield

    app = FastAPI(title="dicom-node", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    web = node.settings.web
    secret = load_secret_key(web.secret_key, node.settings.node.data_dir)
    app.state.node = node
    app.state.auth = Authenticator(node.sessions, LoginLimiter(
        per_user_and_client=web.login_failures_per_user_and_client, per_client=web.login_failures_per_client,
        window=web.login_window_seconds))
    prepare_dummy_hash()
    #: Where a route needs a laxer Content-Security-Policy (the OHIF viewer: relax("/viewer", ...)).
    app.state.csp = ContentSecurityPolicies()
    app.state.key_images = KeyImages(node)
    app.state.metrics_registry = make_registry(node.sessions)
    app.state.templates = make_templates(HERE / "templates")
    # The cookie carries the session secret (checked against web_sessions on every request);
    # HttpOnly and SameSite=Lax here, Secure added by SecurityHeaders under HTTPS.
    app.add_middleware(SessionMiddleware, secret_key=secret, session_cookie="dicom_node_session",
                       max_age=SESSION_SECONDS, same_site="lax", https_only=False)
    app.add_middleware(SecurityHeaders, policies=app.state.csp, force_secure_cookies=web.force_secure_cookies)

    @app.middleware("http")
    async def no_store(request: Request, call_next):
        response = await call_next(request)
        if response.headers.get("content-type", "").startswith(("text/html", "application/json")) or \
                request.url.path.startswith("/dicom-web"):
            response.headers.setdefault("Cache-Control", "no-store")  # patient data stays out of caches
        return response

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code)

    @app.exception_handler(AppError)
    async def app_error(request: Request, exc: AppError):
        """The application layer's refusals: NotFound 404, Conflict 409, Invalid 422."""
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        from urllib.parse import quote

        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    @app.exception_handler(PageForbidden)
    async def page_forbidden(request: Request, exc: PageForbidden):
        with node.sessions() as s:
            user = session_user(request, s)  # to keep the navigation on the error page
        role = user.role.value if user is not None else "radiologist"
        message = ("This account may only store studies with DICOMweb STOW-RS; it has no pages." if role == "sender"
                   else f"This page is for administrators. Your account is a {role} account.")
        return render(request, "error.html", {"user": user if role != "sender" else None, "title": "Not allowed",
                                             "code": 403, "message": message},
                      status_code=403)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        if _json_errors(request.url.path):
            return await request_validation_exception_handler(request, exc)
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'value'}: {e['msg']}" for e in exc.errors())
        return render(request, "error.html", {"title": "Invalid request", "code": 422, "message": message},
                      status_code=422)

    @app.exception_handler(FastAPIHTTPException)
    async def http_error(request: Request, exc: FastAPIHTTPException):
        if _json_errors(request.url.path):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))
        return render(request, "error.html", {"title": "Error", "code": exc.status_code, "message": str(exc.detail)},
                      status_code=exc.status_code)

    from dicom_node.web.routes import (
        admin_pages,
        associations,
        auth,
        destinations,
        jobs,
        ops,
        pages,
        rules,
        settings,
        sources,
        studies,
        transfers,
    )
    from dicom_node.web.routes import users as users_routes

    for module in (auth, studies, sources, destinations, rules, transfers, jobs, associations, users_routes, settings,
                   ops):
        app.include_router(module.router)
    app.include_router(pages.router, include_in_schema=False)
    app.include_router(admin_pages.router, include_in_schema=False)
    from dicom_node.web.routes import storage as storage_routes  # storage usage and retention (operations)
    app.include_router(storage_routes.router)
    from dicom_node.web import dicomweb

    dicomweb.install(app, node)  # QIDO-RS, WADO-RS, STOW-RS under /dicom-web
    from dicom_node.web.routes import viewer  # the OHIF viewer under /viewer (docs/viewing/viewer.md)

    app.include_router(viewer.router, include_in_schema=False)
    viewer.install_csp(app)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _allow_docs_script(app, ops.router)
    return app


def _json_errors(path: str) -> bool:
    """Routes that answer errors as JSON (API clients, DICOMweb clients), not as an HTML page."""
    return path.startswith(("/api", "/dicom-web")) or path in ("/metrics", "/healthz", "/openapi.json")


def _allow_docs_script(app: FastAPI, router) -> None:  # noqa: ANN001
    """Swagger UI's page (``/docs``) starts with one fixed inline script: allow exactly that
    script, by its hash, on that page only."""
    for route in router.routes:
        if getattr(route, "path", None) == "/docs" and hasattr(route, "endpoint"):
            try:
                html = route.endpoint().body.decode()
            except Exception as exc:  # noqa: BLE001 - without the hash the page is blocked, not the app
                log.warning("API docs page not rendered at start-up (%s); its script will be blocked", exc)
                return
            hashes = inline_script_hashes(html)
            if hashes:
                app.state.csp.relax("/docs", script_src=hashes)
            return
