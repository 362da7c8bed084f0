"""User repository functions: web accounts with a role (admin or radiologist).

Like ``storage.repo``, these take a ``Session`` and never commit: the caller owns the
transaction. Passwords arrive here already hashed (hashing lives with the web stage, in
``dicom_node.web.security``), so this leaf module needs no crypto library.
"""
from __future__ import annotations

import re

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.models import Role, User

_USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class UserError(ValueError):
    """A user cannot be created, changed or removed; the message says why."""


def check_username(name: str) -> str:
    """A user name: 1-64 characters, letters, digits and ``._@-``, starting with a letter or digit."""
    if not isinstance(name, str) or not _USERNAME_RE.match(name):
        raise UserError(f"user name {name!r} must be 1-64 letters, digits or ._@- and start with a letter or digit")
    return name


def parse_role(role: str | Role) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise UserError(f"role {role!r} is not one of {[r.value for r in Role]}") from None


def get_user(s: Session, username: str) -> User | None:
    return s.scalar(select(User).where(User.username == username))


def list_users(s: Session) -> list[User]:
    return list(s.scalars(select(User).order_by(User.username)))


def count_users(s: Session, role: Role | None = None) -> int:
    stmt = select(func.count()).select_from(User)
    if role is not None:
        stmt = stmt.where(User.role == role)
    return int(s.scalar(stmt) or 0)


def add_user(s: Session, username: str, role: str | Role, password_hash: str) -> User:
    """Create a user; raises ``UserError`` if the name is invalid or taken."""
    check_username(username)
    role = parse_role(role)
    if get_user(s, username) is not None:
        raise UserError(f"user {username!r} already exists")
    user = User(username=username, role=role, password_hash=password_hash)
    s.add(user)
    s.flush()
    return user


def _require(s: Session, username: str) -> User:
    user = get_user(s, username)
    if user is None:
        raise UserError(f"user {username!r} does not exist")
    return user


def set_password_hash(s: Session, username: str, password_hash: str) -> User:
    user = _require(s, username)
    user.password_hash = password_hash
    return user


def set_role(s: Session, username: str, role: str | Role) -> User:
    """Change a role; refuses to demote the last admin (nobody could administer the node)."""
    user = _require(s, username)
    role = parse_role(role)
    if user.role is Role.ADMIN and role is not Role.ADMIN and count_users(s, Role.ADMIN) <= 1:
        raise UserError(f"user {username!r} is the last admin; add another admin first")
    user.role = role
    return user


def remove_user(s: Session, username: str, *, allow_last_admin: bool = False) -> None:
    """Delete a user; refuses to remove the last admin unless ``allow_last_admin``."""
    user = _require(s, username)
    if not allow_last_admin and user.role is Role.ADMIN and count_users(s, Role.ADMIN) <= 1:
        raise UserError(f"user {username!r} is the last admin; add another admin first")
    s.delete(user)
    s.flush()
