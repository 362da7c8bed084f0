"""Passwords, API tokens, session cookies and CSRF tokens.

* Passwords are hashed with Argon2id (``pwdlib``); no default password exists anywhere.
* API bearer tokens and the session cookie are signed with the node's secret key
  (``[web] secret_key``, else a random key kept in ``data_dir/web-secret``, created once with
  mode 0600, so every web process of one node shares it). A token carries the user name and a
  fingerprint of the password hash: changing a password or removing the user revokes every
  token and session issued before.
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
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

log = logging.getLogger(__name__)

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


# A valid hash to compare against when the user does not exist, so that a login with an
# unknown name takes as long as one with a wrong password.
_DUMMY_HASH: str | None = None


def dummy_verify(password: str) -> None:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = _password_hasher().hash("not-a-real-password-" + secrets.token_hex(8))
    verify_password(password, _DUMMY_HASH)


def password_fingerprint(password_hash: str) -> str:
    """A short digest of the stored hash: tokens carry it, so a new password revokes them."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


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


@dataclass(frozen=True)
class TokenClaims:
    username: str
    fingerprint: str


class Tokens:
    """Signed, timestamped bearer tokens (itsdangerous); verification checks the age."""

    def __init__(self, secret_key: str, max_age: int = TOKEN_SECONDS):
        self._serializer = URLSafeTimedSerializer(secret_key, salt="dicom-node.api-token")
        self.max_age = max_age

    def issue(self, username: str, password_hash: str) -> str:
        return self._serializer.dumps({"u": username, "f": password_fingerprint(password_hash)})

    def verify(self, token: str) -> TokenClaims | None:
        try:
            data = self._serializer.loads(token, max_age=self.max_age)
        except (BadSignature, SignatureExpired):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("u"), str) or not isinstance(data.get("f"), str):
            return None
        return TokenClaims(username=data["u"], fingerprint=data["f"])


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_matches(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


class LoginThrottle:
    """Slows password guessing: after ``limit`` failed logins for one user name within
    ``window`` seconds, further attempts for that name are refused until the window passes.

    Kept in memory per web process (each process counts on its own), which is enough to turn
    an online guessing attack from thousands of tries a minute into a handful.
    """

    def __init__(self, limit: int = 5, window: float = 300.0):
        self.limit, self.window = limit, window
        self._failures: dict[str, deque] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque:
        q = self._failures.setdefault(key, deque())
        while q and now - q[0] > self.window:
            q.popleft()
        return q

    def retry_after(self, username: str) -> int:
        """Seconds until ``username`` may try again; 0 when it may try now."""
        now = time.monotonic()
        with self._lock:
            q = self._recent(username.lower(), now)
            if len(q) < self.limit:
                return 0
            return max(1, int(self.window - (now - q[0])) + 1)

    def failed(self, username: str) -> None:
        now = time.monotonic()
        with self._lock:
            q = self._recent(username.lower(), now)
            q.append(now)
            if len(self._failures) > 10000:  # bound memory under a spray of names
                self._failures = {k: v for k, v in self._failures.items() if v}

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._failures.pop(username.lower(), None)
