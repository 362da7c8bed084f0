"""Security headers on every response, and ``Secure`` cookies under HTTPS.

Content-Security-Policy: the pages use no inline script, style or event handler (scripts and
styles come from ``/static``; the malignancy bar is a CSS class, not a ``style`` attribute), so
the default policy is ``'self'`` only, and ``frame-ancestors 'none'``. Key images are shown as
``blob:`` URLs and Swagger UI draws icons from ``data:`` URLs, hence ``img-src``.

Per-route exceptions live in one place, ``ContentSecurityPolicies``: a path prefix gets extra
sources for some directives (``relax("/docs", script_src=["'sha256-...'"])``). The OHIF viewer
that a later issue serves under ``/viewer`` registers its needs there (``relax("/viewer",
...)``) and every other route keeps the strict policy. A route that sets its own
``Content-Security-Policy`` header is left as it is.
"""
from __future__ import annotations

import base64
import hashlib
import re

DEFAULT_POLICY: dict[str, tuple[str, ...]] = {
    "default-src": ("'self'",),
    "script-src": ("'self'",),
    "style-src": ("'self'",),
    "img-src": ("'self'", "data:", "blob:"),
    "font-src": ("'self'",),
    "connect-src": ("'self'",),
    "object-src": ("'none'",),
    "base-uri": ("'none'",),
    "form-action": ("'self'",),
    "frame-ancestors": ("'none'",),
}

#: Headers set on every response unless the route set them.
STATIC_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def _render(policy: dict[str, tuple[str, ...]]) -> str:
    return "; ".join(" ".join((name, *sources)) for name, sources in policy.items())


class ContentSecurityPolicies:
    """The default policy, and relaxed copies for path prefixes (the longest prefix wins)."""

    def __init__(self, default: dict[str, tuple[str, ...]] | None = None):
        self._default = dict(default or DEFAULT_POLICY)
        self._by_prefix: dict[str, str] = {}
        self._default_header = _render(self._default)

    def relax(self, prefix: str, **extra: list[str] | tuple[str, ...]) -> None:
        """Allow more sources under ``prefix``: ``relax("/viewer", script_src=["'wasm-unsafe-eval'"])``
        (directive names with ``_`` for ``-``). Adds to what an earlier call allowed."""
        policy = {k: tuple(v) for k, v in self._parse(self._by_prefix.get(prefix, self._default_header)).items()}
        for key, sources in extra.items():
            name = key.replace("_", "-")
            policy[name] = tuple(dict.fromkeys((*policy.get(name, policy["default-src"]), *sources)))
        self._by_prefix[prefix] = _render(policy)

    @staticmethod
    def _parse(header: str) -> dict[str, list[str]]:
        out = {}
        for part in header.split(";"):
            words = part.split()
            if words:
                out[words[0]] = words[1:]
        return out

    def for_path(self, path: str) -> str:
        best = ""
        for prefix in self._by_prefix:
            if (path == prefix or path.startswith(prefix.rstrip("/") + "/")) and len(prefix) > len(best):
                best = prefix
        return self._by_prefix[best] if best else self._default_header


_INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.S | re.I)


def inline_script_hashes(html: str) -> list[str]:
    """CSP source expressions (``'sha256-...'``) for the inline scripts of a fixed page."""
    return ["'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
            for body in _INLINE_SCRIPT.findall(html)]


def _has_attribute(cookie: bytes, name: bytes) -> bool:
    return any(part.strip().split(b"=")[0].lower() == name for part in cookie.split(b";")[1:])


class SecurityHeaders:
    """ASGI middleware: the headers above on every HTTP response, and ``Secure`` added to every
    ``Set-Cookie`` when the request came over HTTPS (``scope["scheme"]``, which the server sets
    from ``X-Forwarded-Proto`` only for a proxy it trusts) or when ``force_secure_cookies``."""

    def __init__(self, app, policies: ContentSecurityPolicies, force_secure_cookies: bool = False):
        self.app = app
        self.policies = policies
        self.force_secure = force_secure_cookies

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        secure = self.force_secure or scope.get("scheme") == "https"
        csp = self.policies.for_path(scope.get("path", "")).encode()

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = []
                present = set()
                for key, value in message.get("headers", []):
                    lower = key.lower()
                    present.add(lower)
                    if secure and lower == b"set-cookie" and not _has_attribute(value, b"secure"):
                        value = value + b"; Secure"
                    headers.append((key, value))
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", csp))
                for name, value in STATIC_HEADERS.items():
                    if name.lower().encode() not in present:
                        headers.append((name.lower().encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
