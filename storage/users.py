"""User repository functions: web accounts with a role (admin, radiologist or sender).

Like ``storage.repo``, these take a ``Session`` and never commit: the caller owns the
transaction. Passwords arrive here already hashed (hashing lives with the web stage, in
``dicom_node.web.security``), so this leaf module needs no crypto library; so do sessions
(``WebSession``), which arrive as the SHA-256 digest of their secret.

A new password or the removal of a user revokes every session and API token of that user in
the same transaction, whoever makes the change (CLI, API, admin page).
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from storage.models import Role, User, WebSession, utcnow

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
    """Set a new password hash and revoke every session and token of the user."""
    user = _require(s, username)
    user.password_hash = password_hash
    revoke_user_sessions(s, user.id)
    return user


def rehash_password(s: Session, user_id: int, old_hash: str, new_hash: str) -> bool:
    """Replace a hash with a stronger one of the same password (after a successful login),
    unless the password was changed meanwhile. Sessions stay valid: the password is the same."""
    result = s.execute(update(User).where(User.id == user_id, User.password_hash == old_hash)
                       .values(password_hash=new_hash).execution_options(synchronize_session=False))
    return result.rowcount == 1


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
    s.execute(delete(WebSession).where(WebSession.user_id == user.id))
    s.delete(user)
    s.flush()


# --- sessions and API tokens ------------------------------------------------------------------

def create_session(s: Session, user_id: int, kind: str, token_hash: str, lifetime_s: float,
                   client_host: str | None = None, now: datetime | None = None) -> WebSession:
    """Record a new session (``kind`` "page" or "api") valid for ``lifetime_s`` seconds."""
    now = now or utcnow()
    row = WebSession(token_hash=token_hash, user_id=user_id, kind=kind, client_host=client_host[:255] if client_host else None,
                     created_at=now, last_seen_at=now, expires_at=now + timedelta(seconds=lifetime_s))
    s.add(row)
    s.flush()
    return row


def active_session(s: Session, token_hash: str, kind: str, now: datetime | None = None) -> tuple[WebSession, User] | None:
    """The unrevoked, unexpired session with this digest and its user, else None."""
    now = now or utcnow()
    row = s.execute(select(WebSession, User).join(User, User.id == WebSession.user_id)
                    .where(WebSession.token_hash == token_hash, WebSession.kind == kind,
                           WebSession.revoked_at.is_(None), WebSession.expires_at > now)).first()
    return None if row is None else (row[0], row[1])


def touch_session(s: Session, session_id: int, now: datetime | None = None) -> None:
    s.execute(update(WebSession).where(WebSession.id == session_id).values(last_seen_at=now or utcnow())
              .execution_options(synchronize_session=False))


def revoke_session(s: Session, token_hash: str, now: datetime | None = None) -> int:
    """Revoke one session by digest; returns 1 if it was active, else 0."""
    result = s.execute(update(WebSession).where(WebSession.token_hash == token_hash, WebSession.revoked_at.is_(None))
                       .values(revoked_at=now or utcnow()).execution_options(synchronize_session=False))
    return result.rowcount


def revoke_user_sessions(s: Session, user_id: int, now: datetime | None = None) -> int:
    """Revoke every active session and token of a user; returns how many."""
    now = now or utcnow()
    result = s.execute(update(WebSession).where(WebSession.user_id == user_id, WebSession.revoked_at.is_(None),
                                                WebSession.expires_at > now)
                       .values(revoked_at=now).execution_options(synchronize_session=False))
    return result.rowcount


def purge_sessions(s: Session, older_than: datetime) -> int:
    """Delete sessions that expired before ``older_than`` (revoked ones included: they expire too)."""
    result = s.execute(delete(WebSession).where(WebSession.expires_at < older_than)
                       .execution_options(synchronize_session=False))
    return result.rowcount
