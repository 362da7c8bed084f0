"""Web accounts: add, change role or password, remove, end every session. The one place that
writes a ``User`` row or ends another user's sessions, each change audited in the same
transaction: ``user.add`` (role), ``user.update`` (role, and ``password: "changed"``: the API,
the admin page and ``dicom-node user passwd`` alike), ``user.remove``, ``logout.all`` (every
session and token of the user ended: ``POST /api/logout-all`` and ``dicom-node user logout``).

A new password ends every session and token of its user (``storage.users.set_password_hash``).
Passwords are hashed by ``hash_password`` before the write transaction (Argon2 takes tens of
milliseconds; no transaction is held meanwhile). Logins and single logouts are the
``web.login.Authenticator``'s. Functions take the caller's session and never commit.
"""
from __future__ import annotations

from sqlalchemy.orm import Session

from dicom_node.app.errors import Conflict, Invalid, NotFound
from storage import repo, users
from storage.models import User

ROLES = ("admin", "radiologist", "sender")


def hash_password(password: str) -> str:
    """The Argon2 hash of ``password`` (at least 8 characters, else ``Invalid``)."""
    from dicom_node.web.security import PasswordError
    from dicom_node.web.security import hash_password as argon2

    try:
        return argon2(password)
    except PasswordError as exc:
        raise Invalid(str(exc)) from None


def get(s: Session, username: str) -> User:
    row = users.get_user(s, username)
    if row is None:
        raise NotFound(f"user {username!r} not found")
    return row


def _role(role: str) -> str:
    if role not in ROLES:
        raise Invalid(f"role {role!r} is not one of {list(ROLES)}")
    return role


def check_new(s: Session, username: str) -> None:
    """``Invalid`` for a bad user name, ``Conflict`` for a taken one."""
    try:
        users.check_username(username)
    except users.UserError as exc:
        raise Invalid(str(exc)) from None
    if users.get_user(s, username) is not None:
        raise Conflict(f"user {username!r} already exists")


def add(s: Session, actor: str, username: str, role: str, password_hash: str) -> User:
    check_new(s, username)
    row = users.add_user(s, username, _role(role), password_hash)
    repo.audit(s, actor, "user.add", username, {"role": role})
    return row


def update(s: Session, actor: str, username: str, *, role: str | None = None,
           password_hash: str | None = None) -> User:
    """Change the role and/or the password (which ends every session and token of the user)."""
    get(s, username)
    try:
        if role is not None:
            users.set_role(s, username, _role(role))
        if password_hash is not None:
            users.set_password_hash(s, username, password_hash)
    except users.UserError as exc:  # the last admin
        raise Conflict(str(exc)) from None
    detail = {}
    if role is not None:
        detail["role"] = role
    if password_hash is not None:
        detail["password"] = "changed"
    repo.audit(s, actor, "user.update", username, detail)
    return get(s, username)


def remove(s: Session, actor: str, username: str) -> None:
    get(s, username)
    try:
        users.remove_user(s, username)
    except users.UserError as exc:  # the last admin
        raise Conflict(str(exc)) from None
    repo.audit(s, actor, "user.remove", username)


def logout_all(s: Session, actor: str, username: str, **detail) -> int:
    """End every active session and API token of ``username``; returns how many. ``detail``
    (e.g. client, via) is added to the audit record."""
    n = users.revoke_user_sessions(s, get(s, username).id)
    repo.audit(s, actor, "logout.all", username, {**detail, "revoked": n})
    return n
