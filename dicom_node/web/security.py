"""Passwords, session and token secrets, CSRF tokens, login rate limits.

* Passwords are hashed with Argon2id (``pwdlib``); no default password exists anywhere. The
  check is CPU work of tens of milliseconds, so callers run it with no database connection
  held (``dicom_node.web.login``).
* Page sessions and API bearer tokens are random 256-bit secrets; the database keeps only their
  SHA-256 digest (``storage.models.WebSession``), so they can be revoked one by one (logout) or
  all at once (password change, user removal, ``POST /api/logout-all``).
* The session cookie itself is signed with the node's secret key (``[web] secret_key``, else a
  random key kept in ``data_dir/web-secret``, created once with mode 0600, so every web process
  of one node shares it); it carries the session secret, the CSRF token and flash messages.
* Pages check a per-session CSRF token on every form POST; the API accepts unsafe methods with
  a bearer token only (never the cookie), so it needs no CSRF token.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Lifetime of an API bearer token and of a page session, in seconds (absolute, from login).
TOKEN_SECONDS = 8 * 3600
SESSION_SECONDS = 12 * 3600
SECRET_FILE = "web-secret"
MIN_PASSWORD_LENGTH = 8

_hasher = None


def _password_hasher():
    global _hasher
    if _hasher is None:
        from pwdlib import PasswordHash
        from pwdlib.hashers.argon2 import Argon2Hasher

        _hasher = PasswordHash((Argon2Hasher(),))
    return _hasher


class PasswordError(ValueError):
    """A password is refused (too short, empty)."""


def check_password_policy(password: str) -> str:
    if password is None or len(password) < MIN_PASSWORD_LENGTH:
        raise PasswordError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    return password


def hash_password(password: str) -> str:
    return _password_hasher().hash(check_password_policy(password))


def verify_password(password: str, password_hash: str) -> bool:
    try:
        return bool(_password_hasher().verify(password, password_hash))
    except Exception:  # noqa: BLE001 - a malformed hash is a failed login, not a crash
        return False


def verify_and_update(password: str, password_hash: str) -> tuple[bool, str | None]:
    """Check a password; also return a new hash when the stored one uses weaker parameters."""
    try:
        ok, new_hash = _password_hasher().verify_and_update(password, password_hash)
    except Exception:  # noqa: BLE001 - a malformed hash is a failed login, not a crash
        return False, None
    return bool(ok), (new_hash if ok else None)


# A valid hash to compare against when the user does not exist, so that a login with an
# unknown name takes as long as one with a wrong password.
_DUMMY_HASH: str | None = None


def prepare_dummy_hash() -> None:
    """Make the comparison hash now (at start-up), so the first unknown name costs no extra hash."""
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = _password_hasher().hash("not-a-real-password-" + secrets.token_hex(8))


def dummy_verify(password: str) -> None:
    """The same Argon2 check as a real login, against a hash no password matches."""
    prepare_dummy_hash()
    verify_and_update(password, _DUMMY_HASH)


def new_session_secret() -> str:
    """A fresh page-session or API-token secret (256 random bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def secret_digest(secret: str) -> str:
    """What the database stores of a session secret: its SHA-256, hex (64 characters)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def load_secret_key(configured: str, data_dir: Path) -> str:
    """The configured key, else the one in ``data_dir/web-secret`` (created once, mode 0600)."""
    if configured:
        return configured
    path = Path(data_dir) / SECRET_FILE
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(48)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another web process won the race: use its key
        return path.read_text(encoding="ascii").strip()
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    log.info("generated a web secret key in %s", path)
    return key


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_matches(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


@dataclass(frozen=True)
class Refusal:
    """A login refused by the rate limit: wait ``retry_after`` seconds; ``first`` is True for
    the first refusal of this client (and name) in the current window (the one to audit)."""

    retry_after: int
    first: bool


class LoginLimiter:
    """Failed-login limits per client and per (client, user name), over a sliding window.

    * ``per_user_and_client`` failures for one name from one client hold back that pair;
    * ``per_client`` failures for any names from one client hold back that client.
    Nothing is counted per account alone, so guessing a user's password from one address never
    locks the user out when logging in from another. An attempt is counted when it starts
    (``attempt``), so parallel guesses cannot overshoot a limit; a successful login takes its
    count back and clears its pair's count, not the client's (one valid account must not reset
    a client that sprays names).

    Kept in memory per web process (several processes each count on their own), bounded to
    ``max_keys`` clients and pairs (the oldest forgotten first). Client addresses are what the
    ASGI server reports: behind a reverse proxy, list it in ``[web] trusted_proxies``, or every
    user shares the proxy's address and its ``per_client`` limit.
    Times in seconds (``time.monotonic``).
    """

    def __init__(self, per_user_and_client: int = 5, per_client: int = 20, window: float = 300.0,
                 max_keys: int = 100_000, clock=time.monotonic):
        self.per_pair, self.per_client, self.window = per_user_and_client, per_client, window
        self.max_keys = max_keys
        self._clock = clock
        self._counts: OrderedDict[tuple, deque] = OrderedDict()
        self._refused: dict[tuple, float] = {}  # key -> when its current refusal was first reported
        self._lock = threading.Lock()

    @staticmethod
    def _keys(client: str, username: str) -> tuple[tuple, tuple]:
        return ("client", client), ("pair", client, (username or "").strip().lower())

    def _recent(self, key: tuple, now: float) -> deque:
        q = self._counts.get(key)
        if q is None:
            return deque()
        while q and now - q[0] > self.window:
            q.popleft()
        return q

    def attempt(self, client: str, username: str) -> Refusal | None:
        """Count an attempt and return None, or refuse it (counting nothing) with the wait."""
        now = self._clock()
        keys = self._keys(client, username)
        with self._lock:
            waits = []
            for key, limit in zip(keys, (self.per_client, self.per_pair)):
                q = self._recent(key, now)
                if len(q) >= limit:
                    waits.append((key, max(1, int(self.window - (now - q[-limit])) + 1)))
            if waits:
                key, wait = max(waits, key=lambda kw: kw[1])
                since = self._refused.get(key)
                first = since is None or now - since > self.window
                if first:
                    self._refused[key] = now
                    if len(self._refused) > self.max_keys:
                        self._refused = {k: v for k, v in self._refused.items() if now - v <= self.window}
                return Refusal(retry_after=wait, first=first)
            for key in keys:
                q = self._recent(key, now)
                q.append(now)
                self._counts[key] = q
                self._counts.move_to_end(key)
            while len(self._counts) > self.max_keys:  # bound memory under a spray of names
                self._counts.popitem(last=False)
            return None

    def succeeded(self, client: str, username: str) -> None:
        """The attempt was a successful login: it does not count."""
        client_key, pair = self._keys(client, username)
        with self._lock:
            self._counts.pop(pair, None)
            self._refused.pop(pair, None)
            q = self._counts.get(client_key)
            if q:
                q.pop()
