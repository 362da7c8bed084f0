"""Sessions and tokens that end when they should, cookies and headers fit for HTTPS.

Server-side sessions (``web_sessions``): logout ends the page session at once (a captured
cookie is worthless afterwards), a password change -- through the API, the admin page or the
CLI -- ends every session and token of that user, ``POST /api/logout`` ends a token and
``POST /api/logout-all`` everything of the caller. Cookies are ``Secure`` under HTTPS (or
always, with ``[web] force_secure_cookies``), ``HttpOnly`` and ``SameSite``; every response
carries a Content-Security-Policy without inline scripts or styles.
"""
from __future__ import annotations

import io
import re
import sys

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from storage.models import AuditEvent
from webtools import ADMIN, RAD, csrf_of, page_login

CAROL = ("carol", "carol-pass-1")


@pytest.fixture
def browser(client):
    """A second cookie jar on the session's application."""
    with TestClient(client.app) as c:
        yield c


@pytest.fixture
def carol(node, client, admin_h):
    r = client.post("/api/users", headers=admin_h, json={"username": CAROL[0], "role": "radiologist",
                                                        "password": CAROL[1]})
    assert r.status_code == 201, r.text
    return CAROL


def _token(client, user) -> dict:
    r = client.post("/api/token", data={"username": user[0], "password": user[1]})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def _session_cookie(c: TestClient) -> str:
    value = c.cookies.get("dicom_node_session")
    assert value, "no session cookie"
    return value


def _with_cookie(app, cookie: str) -> TestClient:
    c = TestClient(app)
    c.cookies.set("dicom_node_session", cookie)
    return c


def test_logout_ends_the_session_for_a_captured_cookie(node, browser):
    page_login(browser, RAD)
    captured = _session_cookie(browser)
    assert browser.get("/worklist").status_code == 200
    token = csrf_of(browser.get("/worklist").text)
    r = browser.post("/logout", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    # The cookie captured before logout is refused: pages redirect to login, the API says 401.
    with _with_cookie(browser.app, captured) as thief:
        r = thief.get("/worklist", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        assert thief.get("/api/studies").status_code == 401
    with node.sessions() as s:
        actions = [a for (a,) in s.execute(select(AuditEvent.action).where(AuditEvent.actor == RAD[0])
                                           .order_by(AuditEvent.id))]
    assert actions == ["login", "logout"]


def _change_password_api(client, admin_h, tmp_path, node, name, new):
    assert client.patch(f"/api/users/{name}", headers=admin_h, json={"password": new}).status_code == 200


def _change_password_page(client, admin_h, tmp_path, node, name, new):
    with TestClient(client.app) as admin_browser:
        page_login(admin_browser, ADMIN)
        token = csrf_of(admin_browser.get("/admin/users").text)
        r = admin_browser.post(f"/admin/users/{name}/update", data={"password": new, "csrf_token": token})
        assert f"User {name}: password changed" in r.text


def _cli(tmp_path, node, argv, stdin=""):
    from dicom_node.cli import main

    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "cli-data"}"\n[database]\nurl = "{node.settings.database_url}"\n')
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        return main([*argv, "--config", str(cfg)])
    finally:
        sys.stdin = old_stdin


def _change_password_cli(client, admin_h, tmp_path, node, name, new):
    assert _cli(tmp_path, node, ["user", "passwd", name, "--password-stdin"], new + "\n") == 0


@pytest.mark.parametrize("change", [_change_password_api, _change_password_page, _change_password_cli],
                         ids=["api", "admin-page", "cli"])
def test_password_change_ends_every_session_and_token(node, client, admin_h, carol, browser, tmp_path, change):
    page_login(browser, carol)
    captured = _session_cookie(browser)
    carol_h = _token(client, carol)
    assert browser.get("/worklist").status_code == 200 and client.get("/api/me", headers=carol_h).status_code == 200
    change(client, admin_h, tmp_path, node, carol[0], "carol-pass-2")
    assert client.get("/api/me", headers=carol_h).status_code == 401
    r = browser.get("/worklist", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    with _with_cookie(client.app, captured) as thief:
        assert thief.get("/worklist", follow_redirects=False).status_code == 303
    # The new password works; the old one does not.
    assert client.post("/api/token", data={"username": carol[0], "password": carol[1]}).status_code == 401
    assert client.get("/api/me", headers=_token(client, (carol[0], "carol-pass-2"))).status_code == 200


def test_api_logout_and_logout_all(node, client, carol, browser):
    first, second = _token(client, carol), _token(client, carol)
    assert client.post("/api/logout", headers=first).status_code == 204
    assert client.get("/api/me", headers=first).status_code == 401
    assert client.get("/api/me", headers=second).status_code == 200
    page_login(browser, carol)
    third = _token(client, carol)
    r = client.post("/api/logout-all", headers=third)
    assert r.status_code == 200 and r.json()["revoked"] == 3  # second, third and the page session
    assert client.get("/api/me", headers=second).status_code == 401
    assert client.get("/api/me", headers=third).status_code == 401
    assert browser.get("/worklist", follow_redirects=False).status_code == 303
    # The page cookie alone cannot end sessions (unsafe API methods need the bearer token).
    page_login(browser, carol)
    assert browser.post("/api/logout-all").status_code == 401


def test_cli_user_logout_ends_sessions_and_tokens(node, client, carol, browser, tmp_path, capsys):
    page_login(browser, carol)
    carol_h = _token(client, carol)
    assert _cli(tmp_path, node, ["user", "logout", carol[0]]) == 0
    assert "2 web session(s) and API token(s) of carol ended" in capsys.readouterr().out
    assert client.get("/api/me", headers=carol_h).status_code == 401
    assert browser.get("/worklist", follow_redirects=False).status_code == 303
    assert client.get("/api/me", headers=_token(client, carol)).status_code == 200  # the password still works
    assert _cli(tmp_path, node, ["user", "logout", "nobody"]) == 1


def test_removed_user_loses_sessions(node, client, admin_h, carol, browser):
    page_login(browser, carol)
    carol_h = _token(client, carol)
    assert client.delete(f"/api/users/{carol[0]}", headers=admin_h).status_code == 204
    assert client.get("/api/me", headers=carol_h).status_code == 401
    assert browser.get("/worklist", follow_redirects=False).status_code == 303


def _set_cookie_attrs(response) -> list[set[str]]:
    out = []
    for header in response.headers.get_list("set-cookie"):
        out.append({part.strip().split("=")[0].lower() for part in header.split(";")[1:]})
    return out


def _login_response(c: TestClient, user):
    token = csrf_of(c.get("/login").text)
    return c.post("/login", data={"username": user[0], "password": user[1], "csrf_token": token, "next": "/worklist"},
                  follow_redirects=False)


def test_cookie_secure_under_https_httponly_and_samesite(node, client):
    with TestClient(client.app, base_url="https://node.example") as https:
        r = _login_response(https, RAD)
        assert r.status_code == 303
        attrs = _set_cookie_attrs(r)
        assert attrs and all({"secure", "httponly", "samesite"} <= a for a in attrs), r.headers.get_list("set-cookie")
        assert https.get("/worklist").status_code == 200  # the client sends the Secure cookie back over HTTPS
    with TestClient(client.app, base_url="http://127.0.0.1") as plain:
        r = _login_response(plain, RAD)
        attrs = _set_cookie_attrs(r)
        assert attrs and all("secure" not in a and {"httponly", "samesite"} <= a for a in attrs)


def test_force_secure_cookies_option(node):
    from dicom_node.node import Node
    from dicom_node.web.app import create_app

    web = node.settings.web.model_copy(update={"force_secure_cookies": True})
    forced = Node(settings=node.settings.model_copy(update={"web": web}), sessions=node.sessions, store=node.store)
    # Behind a TLS-terminating proxy that the app does not trust, the scheme reads http.
    with TestClient(create_app(forced), base_url="http://127.0.0.1") as c:
        r = c.get("/login")  # sets the cookie that carries the CSRF token
        assert r.status_code == 200
        attrs = _set_cookie_attrs(r)
        assert attrs and all("secure" in a for a in attrs), r.headers.get_list("set-cookie")


def _csp(response) -> dict[str, list[str]]:
    header = response.headers.get("content-security-policy")
    assert header, f"no Content-Security-Policy on {response.url}"
    out = {}
    for part in header.split(";"):
        words = part.split()
        if words:
            out[words[0]] = words[1:]
    return out


def test_csp_and_security_headers_on_every_page(node, client, browser):
    page_login(browser, ADMIN)
    for url in ["/login", "/worklist", "/admin/node", "/admin/users", "/admin/audit", "/studies/9.9.9", "/docs",
                "/api/me", "/no-such-page"]:
        r = browser.get(url)
        csp = _csp(r)
        assert csp["default-src"] == ["'self'"], url
        assert csp["frame-ancestors"] == ["'none'"], url
        assert "'unsafe-inline'" not in csp.get("script-src", []) and "'unsafe-eval'" not in csp.get("script-src", [])
        assert r.headers["x-content-type-options"] == "nosniff", url
        assert r.headers["referrer-policy"] in ("same-origin", "no-referrer", "strict-origin-when-cross-origin"), url


def test_pages_have_no_inline_script_or_style(node, client, browser):
    """What the CSP would block: inline <script>, style="" and on*="" attributes, <style> blocks."""
    from web_phantom import add_study_row

    with node.sessions.begin() as s:
        add_study_row(s, "1.2.7.1", malignancy=0.63, diameter=9.0, count=1, accession="ACCCSP")
    page_login(browser, ADMIN)
    for url in ["/login", "/worklist", "/worklist?fragment=1", "/admin/node", "/admin/sources", "/admin/destinations",
                "/admin/queues", "/admin/associations", "/admin/users", "/admin/audit", "/studies/9.9.9"]:
        html = browser.get(url).text
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), f"inline script on {url}"
        assert not re.search(r"\sstyle\s*=", html), f"inline style attribute on {url}"
        assert "<style" not in html, f"style element on {url}"
        assert not re.search(r"\son[a-z]+\s*=", html), f"inline event handler on {url}"
    assert "ACCCSP" in browser.get("/worklist").text


def test_docs_csp_allows_only_its_own_inline_script(node, client, browser):
    """Swagger UI's page starts with one inline script: its hash, and nothing else, is allowed."""
    import base64
    import hashlib

    page_login(browser, ADMIN)
    r = browser.get("/docs")
    scripts = re.findall(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", r.text, re.S)
    assert scripts
    hashes = {"'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'" for s in scripts}
    assert hashes <= set(_csp(r)["script-src"])
    assert not any(h.startswith("'sha256-") for h in _csp(browser.get("/worklist")).get("script-src", []))


def test_csp_can_be_relaxed_for_one_route_prefix(node):
    """The place a route widens the policy, for itself only (as the OHIF viewer does under /viewer)."""
    from dicom_node.web.app import create_app

    app = create_app(node)
    app.state.csp.relax("/plugin", script_src=["'wasm-unsafe-eval'"], worker_src=["blob:"])
    with TestClient(app) as c:
        plugin = _csp(c.get("/plugin/index.html"))
        assert plugin["script-src"] == ["'self'", "'wasm-unsafe-eval'"] and plugin["worker-src"] == ["'self'", "blob:"]
        assert plugin["frame-ancestors"] == ["'none'"]
        for url in ("/login", "/pluginx", "/viewerx", "/api/me"):
            csp = _csp(c.get(url))
            assert csp["script-src"] == ["'self'"] and "worker-src" not in csp, url


def test_session_activity_is_recorded_without_a_write_per_request(node, client, browser):
    from datetime import timedelta

    from sqlalchemy import update

    from storage.models import WebSession

    page_login(browser, RAD)
    with node.sessions() as s:
        row = s.scalar(select(WebSession).where(WebSession.kind == "page").order_by(WebSession.id.desc()))
    first_seen = row.last_seen_at
    browser.get("/worklist")
    with node.sessions() as s:
        assert s.get(WebSession, row.id).last_seen_at == first_seen  # a request within minutes writes nothing
    with node.sessions.begin() as s:
        s.execute(update(WebSession).where(WebSession.id == row.id).values(last_seen_at=first_seen - timedelta(hours=1)))
    browser.get("/worklist")
    with node.sessions() as s:
        assert s.get(WebSession, row.id).last_seen_at > first_seen - timedelta(minutes=1)
        # Only a digest of the secret is stored, never the cookie's value.
        assert s.get(WebSession, row.id).token_hash not in _session_cookie(browser)
