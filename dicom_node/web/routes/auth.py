"""``POST /api/token`` (OAuth2 password flow) and ``GET /api/me``."""
from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.security import OAuth2PasswordRequestForm

from dicom_node.web import schemas
from dicom_node.web.deps import DB, AnyUser
from dicom_node.web.security import dummy_verify, verify_password
from storage import users

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api", tags=["auth"])


@router.post("/token", response_model=schemas.Token, summary="Get a bearer token (OAuth2 password flow)")
def token(request: Request, s: DB, form: Annotated[OAuth2PasswordRequestForm, Depends()]) -> schemas.Token:
    throttle = request.app.state.login_throttle
    wait = throttle.retry_after(form.username)
    if wait:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                            detail=f"too many failed logins for this user name; try again in {wait} s",
                            headers={"Retry-After": str(wait)})
    user = users.get_user(s, form.username)
    if user is None:
        dummy_verify(form.password)
        ok = False
    else:
        ok = verify_password(form.password, user.password_hash)
    if not ok:
        throttle.failed(form.username)
        log.info("API login refused for a user name of %d characters", len(form.username or ""))
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="wrong user name or password",
                            headers={"WWW-Authenticate": "Bearer"})
    throttle.succeeded(form.username)
    tokens = request.app.state.tokens
    return schemas.Token(access_token=tokens.issue(user.username, user.password_hash), expires_in=tokens.max_age,
                         role=user.role.value)


@router.get("/me", response_model=schemas.UserOut, summary="The authenticated user")
def me(user: AnyUser) -> schemas.UserOut:
    return schemas.UserOut(username=user.username, role=user.role.value, created_at=user.created_at)
