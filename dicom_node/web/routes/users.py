"""Web users and their roles (admin, radiologist)."""
from __future__ import annotations

from fastapi import APIRouter, status

from dicom_node.web import schemas, services
from dicom_node.web.deps import DB, AdminUser
from storage import users

router = APIRouter(prefix="/api/users", tags=["users"])


@router.get("", response_model=list[schemas.UserOut], summary="List users")
def list_users(s: DB, user: AdminUser) -> list[schemas.UserOut]:
    return [services.user_out(u) for u in users.list_users(s)]


@router.post("", response_model=schemas.UserOut, status_code=status.HTTP_201_CREATED, summary="Add a user")
def add_user(body: schemas.UserIn, s: DB, user: AdminUser) -> schemas.UserOut:
    row = services.create_user(s, user.username, body)
    s.commit()
    return services.user_out(row)


@router.patch("/{username}", response_model=schemas.UserOut, summary="Change a user's role or password")
def update_user(username: str, body: schemas.UserUpdate, s: DB, user: AdminUser) -> schemas.UserOut:
    row = services.update_user(s, user.username, username, body)
    s.commit()
    return services.user_out(row)


@router.delete("/{username}", status_code=status.HTTP_204_NO_CONTENT, summary="Remove a user (not the last admin)")
def remove_user(username: str, s: DB, user: AdminUser) -> None:
    services.delete_user(s, user.username, username)
    s.commit()
