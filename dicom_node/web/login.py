"""Logging in and out: the password check, server-side sessions and tokens, their audit.

Contract: ``Authenticator`` owns every state change of a login -- the audit record of each
attempt (``login``, ``login.failed``, ``login.throttled``, ``logout``; actor = the user name
tried, target = the client address, detail = client address and page/API, never the password),
the session or token row, a stronger re-hash -- and holds no database connection while Argon2
runs:

1. a short read session loads the user (id, hash) and is closed;
2. the password is checked (or, for an unknown name, a dummy hash, so both cost the same);
3. a short write transaction records the audit and, on success, the session; it also refuses
   the login if the password changed between 1 and 3 (so a revocation cannot be outrun).

"Log out everywhere" (``logout.all``) is an account change like ``dicom-node user logout``:
``dicom_node.app.users.logout_all`` writes it and its audit (target = the user name).

On SQLite a transaction open through step 2 would hold the node's write lock for the length
of a hash (tens of milliseconds, far more on a busy machine), stalling the listener; on
PostgreSQL it would hold a pooled connection.

Sessions are looked up by the SHA-256 of their secret on every request (one indexed read);
``last_seen_at`` is written at most every ``TOUCH_SECONDS``, in its own short transaction.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.web.security import (
    SESSION_SECONDS,
    TOKEN_SECONDS,
    LoginLimiter,
    dummy_verify,
    new_session_secret,
    secret_digest,
    verify_and_update,
)
from storage import repo, users
from storage.models import User, utcnow

log = logging.getLogger(__name__)

#: How often (seconds) a session's ``last_seen_at`` is written; reads in between write nothing.
TOUCH_SECONDS = 300
#: Revoked and expired session rows are deleted this long after they ended (seconds).
PURGE_AFTER_SECONDS = 7 * 24 * 3600
#: Audit columns are 64 characters; a longer attempted name is cut (and marked) there.
ACTOR_CHARS = 64

PAGE, API = "page", "api"
LIFETIME = {PAGE: SESSION_SECONDS, API: TOKEN_SECONDS}


@dataclass(frozen=True)
class LoginResult:
    """``secret`` (the cookie value or bearer token) on success; else ``retry_after`` > 0 when
    the rate limit refused the attempt, 0 for a wrong name or password."""

    user: User | None = None
    secret: str | None = None
    retry_after: int = 0

    @property
    def ok(self) -> bool:
        return self.secret is not None


def _actor(username: str) -> str:
    name = (username or "").strip() or "(empty)"
    return name if len(name) <= ACTOR_CHARS else name[:ACTOR_CHARS - 1] + "…"


class Authenticator:
    def __init__(self, sessions: sessionmaker[Session], limiter: LoginLimiter):
        self.sessions = sessions
        self.limiter = limiter

    # --- login ------------------------------------------------------------------------------

    def login(self, username: str, password: str, client: str, kind: str) -> LoginResult:
        """Check a password and, if right, open a session of ``kind`` (page or api)."""
        username = (username or "").strip()
        detail = {"client": client, "via": kind}
        refusal = self.limiter.attempt(client, username)
        if refusal is not None:
            if refusal.first:  # audited once per window and client (and name): a flood writes nothing
                self._audit(username, "login.throttled", client, {**detail, "retry_after_s": refusal.retry_after})
            log.warning("%s login refused by the rate limit for client %s (retry after %d s)", kind, client,
                        refusal.retry_after)
            return LoginResult(retry_after=refusal.retry_after)

        # 1. A short read, closed before the hash check.
        found = None
        if len(username) <= 64:
            with self.sessions() as s:  # closing keeps the loaded row usable (detached)
                found = users.get_user(s, username)
        # 2. The Argon2 check, with no connection held.
        if found is None:
            dummy_verify(password or "")
            ok, new_hash = False, None
        else:
            ok, new_hash = verify_and_update(password or "", found.password_hash)
        # 3. A short write: audit, session, re-hash.
        secret = new_session_secret() if ok else None
        with self.sessions.begin() as s:
            if ok:
                current = users.get_user(s, username)
                if current is None or current.password_hash != found.password_hash:
                    ok, secret = False, None  # changed or removed while we were hashing
            if ok:
                users.create_session(s, found.id, kind, secret_digest(secret), LIFETIME[kind], client)
                if new_hash:
                    users.rehash_password(s, found.id, found.password_hash, new_hash)
                repo.audit(s, found.username, "login", client, detail)
                users.purge_sessions(s, utcnow() - timedelta(seconds=PURGE_AFTER_SECONDS))
            else:
                reason = "unknown user" if found is None else "wrong password"
                repo.audit(s, _actor(username), "login.failed", client, {**detail, "reason": reason})
        if not ok:
            log.info("%s login refused for client %s (a user name of %d characters)", kind, client, len(username))
            return LoginResult()
        self.limiter.succeeded(client, username)
        log.info("%s login by %s (%s) from %s", kind, found.username, found.role.value, client)
        return LoginResult(user=found, secret=secret)

    def _audit(self, actor: str, action: str, client: str, detail: dict) -> None:
        try:
            with self.sessions.begin() as s:
                repo.audit(s, _actor(actor), action, client, detail)
        except OperationalError as exc:  # the refusal stands even if the audit cannot be written now
            log.warning("could not audit %s: %s", action, exc.__class__.__name__)

    # --- per request ---------------------------------------------------------------------------

    def user_for(self, s: Session, secret: str | None, kind: str) -> User | None:
        """The user of an active session secret, read in ``s`` (whose transaction is ended)."""
        if not secret or not isinstance(secret, str) or len(secret) > 256:
            return None
        now = utcnow()
        found = users.active_session(s, secret_digest(secret), kind, now)
        s.commit()  # end the read: on SQLite an open transaction can hold the write lock
        if found is None:
            return None
        row, user = found
        if (now - row.last_seen_at).total_seconds() > TOUCH_SECONDS:
            try:
                with self.sessions.begin() as w:
                    users.touch_session(w, row.id, now)
            except OperationalError as exc:  # a busy database must not fail the request
                log.debug("could not record session activity: %s", exc.__class__.__name__)
        return user

    # --- logout ---------------------------------------------------------------------------------

    def logout(self, secret: str | None, username: str, client: str, kind: str) -> bool:
        """Revoke one session or token; True if it was active."""
        if not secret:
            return False
        with self.sessions.begin() as s:
            n = users.revoke_session(s, secret_digest(secret))
            if n:
                repo.audit(s, username, "logout", client, {"client": client, "via": kind})
        return bool(n)

    def logout_all(self, user: User, client: str, kind: str) -> int:
        """Revoke every session and token of ``user``; returns how many were active."""
        from dicom_node.app import users as app_users

        with self.sessions.begin() as s:  # the same change and audit as ``dicom-node user logout``
            return app_users.logout_all(s, user.username, user.username, client=client, via=kind)
