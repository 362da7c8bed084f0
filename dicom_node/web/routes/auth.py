"""``POST /api/token`` (OAuth2 password flow), ``POST /api/logout``, ``POST /api/logout-all``,
``GET /api/me``.

A token is a server-side session (``dicom_node.web.login``): valid for ``TOKEN_SECONDS`` unless
revoked first by ``/api/logout`` (that token), ``/api/logout-all`` (every session and token of
the caller), a password change or the user's removal.
"""
from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.security import OAuth2PasswordRequestForm
from pydantic import BaseModel

from dicom_node.web import schemas
from dicom_node.web.deps import AnyUser, client_host, get_auth, oauth2_scheme
from dicom_node.web.login import API, LIFETIME

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api", tags=["auth"])


class Revoked(BaseModel):
    revoked: int  # how many sessions and tokens were still active


@router.post("/token", response_model=schemas.Token, summary="Get a bearer token (OAuth2 password flow)",
             responses={401: {"description": "wrong user name or password"},
                        429: {"description": "too many failed logins from this client; see Retry-After"}})
def token(request: Request, form: Annotated[OAuth2PasswordRequestForm, Depends()]) -> schemas.Token:
    result = get_auth(request).login(form.username, form.password, client_host(request), API)
    if result.retry_after:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                            detail=f"too many failed logins from this client; try again in {result.retry_after} s",
                            headers={"Retry-After": str(result.retry_after)})
    if not result.ok:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="wrong user name or password",
                            headers={"WWW-Authenticate": "Bearer"})
    return schemas.Token(access_token=result.secret, expires_in=LIFETIME[API], role=result.user.role.value)


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT, summary="Revoke this bearer token")
def logout(request: Request, user: AnyUser, token: Annotated[str | None, Depends(oauth2_scheme)] = None) -> Response:
    get_auth(request).logout(token, user.username, client_host(request), API)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/logout-all", response_model=Revoked,
             summary="Revoke every session and token of the caller (all browsers and scripts)")
def logout_all(request: Request, user: AnyUser) -> Revoked:
    return Revoked(revoked=get_auth(request).logout_all(user, client_host(request), API))


@router.get("/me", response_model=schemas.UserOut, summary="The authenticated user")
def me(user: AnyUser) -> schemas.UserOut:
    return schemas.UserOut(username=user.username, role=user.role.value, created_at=user.created_at)
