"""Typed dependencies: the node, one database session per request, the logged-in user.

The session is opened here and closed after the route; a route that writes commits it itself
(the caller owns the transaction), so nothing is reported done before it is durable.

Two ways to authenticate, both server-side sessions (``dicom_node.web.login``) that logout,
a password change or the user's removal revoke at once:
* API: ``Authorization: Bearer <token>`` from ``POST /api/token``. Safe methods (GET, HEAD)
  also accept the page session cookie, so pages can load images and JSON with it; unsafe
  methods accept only the bearer token, which is why the API needs no CSRF token.
* Pages: the signed session cookie set by ``/login`` carries the session secret; forms carry
  a CSRF token.
401 without valid credentials, 403 for the wrong role.

Integer query and path parameters are bounded in the schema (``PageNumber``, ``RowId`` here;
page sizes by ``services.MAX_PAGE_SIZE``), so an absurd value is a 422, never a database
overflow (500).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Form, HTTPException, Path, Query, Request, status
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy.orm import Session

from dicom_node.node import Node
from dicom_node.web.login import API, PAGE, Authenticator
from dicom_node.web.security import csrf_matches
from storage.models import Role, User

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def get_node(request: Request) -> Node:
    return request.app.state.node


def get_auth(request: Request) -> Authenticator:
    return request.app.state.auth


def client_host(request: Request) -> str:
    """The client's address as the ASGI server reports it (a trusted proxy's X-Forwarded-For
    when the server is configured to trust it)."""
    return request.client.host if request.client and request.client.host else "unknown"


def db(request: Request) -> Iterator[Session]:
    """The request's session: a read session for safe methods; for the others a write session
    where the storage layer tells the two apart (``sessions.writer()``); the route commits."""
    sessions = request.app.state.node.sessions
    writer = getattr(sessions, "writer", None)
    s = sessions() if request.method in SAFE_METHODS or writer is None else writer()
    try:
        yield s
    finally:
        s.close()


NodeDep = Annotated[Node, Depends(get_node)]
DB = Annotated[Session, Depends(db)]

#: Bounds for list routes: the largest page times the largest page size fits any SQL OFFSET.
MAX_PAGE = 1_000_000
#: Database ids (path parameters): a signed 64-bit integer on every backend.
MAX_ROW_ID = 2**63 - 1
PageNumber = Annotated[int, Query(ge=1, le=MAX_PAGE, description="page number, from 1")]
RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID, description="a database id")]


#: Declares the OAuth2 password flow in OpenAPI (the docs' Authorize button); reads the header.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/token", auto_error=False)


def session_user(request: Request, s: Session) -> User | None:
    """The user of the page session cookie, if its session is active (not logged out, not
    revoked by a password change, not expired)."""
    return get_auth(request).user_for(s, request.session.get("sid"), PAGE)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def api_user(request: Request, s: DB, token: Annotated[str | None, Depends(oauth2_scheme)] = None) -> User:
    if token is None:
        if request.method in SAFE_METHODS:
            user = session_user(request, s)
            if user is not None:
                return user
        raise _unauthorized("not authenticated: send a bearer token from POST /api/token")
    user = get_auth(request).user_for(s, token, API)
    if user is None:
        raise _unauthorized("invalid, expired or revoked token (logged out, password changed or user removed)")
    return user


def require_api(*roles: Role) -> Callable[..., User]:
    def check(user: Annotated[User, Depends(api_user)]) -> User:
        if user.role not in roles:
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                detail=f"role {user.role.value!r} may not do this; needs {[r.value for r in roles]}")
        return user

    return check


AnyUser = Annotated[User, Depends(require_api(Role.ADMIN, Role.RADIOLOGIST))]
AdminUser = Annotated[User, Depends(require_api(Role.ADMIN))]


# --- pages ---------------------------------------------------------------------------------------

class LoginRequired(Exception):
    """Raised by page dependencies; the app answers with a redirect to the login page."""


class PageForbidden(Exception):
    """Raised by page dependencies for the wrong role; the app answers 403 with a page."""


def page_user(request: Request, s: DB) -> User:
    """The signed-in user of a page; a ``sender`` account (STOW-RS only) sees no page."""
    user = session_user(request, s)
    if user is None:
        raise LoginRequired()
    if user.role is Role.SENDER:
        raise PageForbidden()
    return user


def page_admin(user: Annotated[User, Depends(page_user)]) -> User:
    if user.role is not Role.ADMIN:
        raise PageForbidden()
    return user


PageUser = Annotated[User, Depends(page_user)]
PageAdmin = Annotated[User, Depends(page_admin)]


def csrf_protect(request: Request, csrf_token: Annotated[str, Form()] = "") -> None:
    """Every page form POST carries the session's CSRF token."""
    if not csrf_matches(request.session.get("csrf"), csrf_token):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="CSRF token missing or wrong; reload the page and try again")


CSRF = Depends(csrf_protect)
