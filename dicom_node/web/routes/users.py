"""Web users and their roles (admin, radiologist, sender). Changes are ``dicom_node.app.users``
(audited); refusals answer 404, 409 or 422."""
from __future__ import annotations

from fastapi import APIRouter, status

from dicom_node.app import users as app_users
from dicom_node.web import schemas
from dicom_node.web.deps import DB, AdminUser
from storage import users

router = APIRouter(prefix="/api/users", tags=["users"])


def user_out(u) -> schemas.UserOut:  # noqa: ANN001 - storage.models.User
    return schemas.UserOut(username=u.username, role=u.role.value, created_at=u.created_at)


@router.get("", response_model=list[schemas.UserOut], summary="List users")
def list_users(s: DB, user: AdminUser) -> list[schemas.UserOut]:
    return [user_out(u) for u in users.list_users(s)]


@router.post("", response_model=schemas.UserOut, status_code=status.HTTP_201_CREATED, summary="Add a user")
def add_user(body: schemas.UserIn, s: DB, user: AdminUser) -> schemas.UserOut:
    row = app_users.add(s, user.username, body.username, body.role, app_users.hash_password(body.password))
    s.commit()
    return user_out(row)


@router.patch("/{username}", response_model=schemas.UserOut, summary="Change a user's role or password")
def update_user(username: str, body: schemas.UserUpdate, s: DB, user: AdminUser) -> schemas.UserOut:
    new_hash = None if body.password is None else app_users.hash_password(body.password)
    row = app_users.update(s, user.username, username, role=body.role, password_hash=new_hash)
    s.commit()
    return user_out(row)


@router.delete("/{username}", status_code=status.HTTP_204_NO_CONTENT, summary="Remove a user (not the last admin)")
def remove_user(username: str, s: DB, user: AdminUser) -> None:
    app_users.remove(s, user.username, username)
    s.commit()
