"""Typed dependencies: the node, one database session per request, the logged-in user.

The session is opened here and closed after the route; a route that writes commits it itself
(the caller owns the transaction), so nothing is reported done before it is durable.

Two ways to authenticate:
* API: ``Authorization: Bearer <token>`` from ``POST /api/token``. Safe methods (GET, HEAD)
  also accept the page session cookie, so pages can load images and JSON with it; unsafe
  methods accept only the bearer token, which is why the API needs no CSRF token.
* Pages: the signed session cookie set by ``/login``; forms carry a CSRF token.
401 without valid credentials, 403 for the wrong role.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Form, HTTPException, Request, status
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy.orm import Session

from dicom_node.node import Node
from dicom_node.web.security import Tokens, csrf_matches, password_fingerprint
from storage import users
from storage.models import Role, User

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def get_node(request: Request) -> Node:
    return request.app.state.node


def get_tokens(request: Request) -> Tokens:
    return request.app.state.tokens


def db(request: Request) -> Iterator[Session]:
    """The request's session: a read session for GET/HEAD/OPTIONS (never takes the SQLite write
    lock), a write session for the other methods (each transaction a writer; the route commits).
    See ``storage.db``."""
    sessions = request.app.state.node.sessions
    s = sessions() if request.method in SAFE_METHODS else sessions.writer()
    try:
        yield s
    finally:
        s.close()


NodeDep = Annotated[Node, Depends(get_node)]
DB = Annotated[Session, Depends(db)]


#: Declares the OAuth2 password flow in OpenAPI (the docs' Authorize button); reads the header.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/token", auto_error=False)


def _end_read(s: Session) -> None:
    """End the read transaction of the authentication look-up.

    On SQLite a write session's transaction holds the database write lock (BEGIN IMMEDIATE),
    and any open transaction pins a snapshot, so a route that opens its own sessions (C-ECHO,
    key images) must not find this one still open; the next use of ``s`` simply begins a new
    transaction. Loaded objects stay usable
    (``expire_on_commit=False``).
    """
    s.commit()


def session_user(request: Request, s: Session) -> User | None:
    """The user of the page session cookie, if it is valid and the password is unchanged."""
    name = request.session.get("user")
    fp = request.session.get("fp")
    if not name or not fp:
        return None
    user = users.get_user(s, name)
    _end_read(s)
    if user is None or password_fingerprint(user.password_hash) != fp:
        return None
    return user


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def api_user(request: Request, s: DB, token: Annotated[str | None, Depends(oauth2_scheme)] = None) -> User:
    if token is None:
        if request.method in SAFE_METHODS:
            user = session_user(request, s)
            if user is not None:
                return user
        raise _unauthorized("not authenticated: send a bearer token from POST /api/token")
    claims = get_tokens(request).verify(token)
    if claims is None:
        raise _unauthorized("invalid or expired token")
    user = users.get_user(s, claims.username)
    _end_read(s)
    if user is None or password_fingerprint(user.password_hash) != claims.fingerprint:
        raise _unauthorized("token no longer valid (user removed or password changed)")
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
    user = session_user(request, s)
    if user is None:
        raise LoginRequired()
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
