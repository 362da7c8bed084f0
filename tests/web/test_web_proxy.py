"""Cookies and login limits under the real web server, as the web stage starts it
(``dicom_node.tls.web_config``: HTTPS with ``[web] certificate``, proxy headers believed only
from ``[web] trusted_proxies``).

* HTTPS served by the node itself: the session cookie is ``Secure``.
* Behind a trusted TLS-terminating proxy (``X-Forwarded-Proto: https``): ``Secure``; the same
  header from an untrusted address changes nothing.
* The login limits count the client the trusted proxy names in ``X-Forwarded-For``, so one
  guessing client behind the proxy does not hold back another.
"""
from __future__ import annotations

import contextlib
import ssl
import threading

import httpx
import pytest
from sqlalchemy import select

from storage.models import AuditEvent
from webtools import ADMIN, RAD, build_node, create_accounts, csrf_of, free_port, wait_port


@contextlib.contextmanager
def serving(node, **web):
    """The node's app under uvicorn, configured as the web stage configures it."""
    import uvicorn

    from dicom_node.config import WebSection
    from dicom_node.tls import web_config
    from dicom_node.web.app import create_app

    section = WebSection(port=free_port(), **web)
    server = uvicorn.Server(web_config(create_app(node), section, log_level="warning", access_log=False))
    server.install_signal_handlers = lambda: None
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_port(section.port)
        yield section.port
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def web_node(tmp_path):
    node = build_node(f"sqlite:///{tmp_path / 'node.sqlite3'}", tmp_path / "data")
    create_accounts(node)
    yield node
    node.sessions.kw["bind"].dispose()


def _cookie_attrs(response: httpx.Response) -> list[set[str]]:
    return [{p.strip().split("=")[0].lower() for p in h.split(";")[1:]} for h in response.headers.get_list("set-cookie")]


def test_https_served_by_the_node_sets_secure_cookies(web_node, tmp_path_factory):
    from tests.test_tls import _make_ca, _make_leaf

    pki = tmp_path_factory.mktemp("pki")
    _make_ca(pki, "ca")
    _make_leaf(pki, "server", "ca")
    trust = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with serving(web_node, certificate=str(pki / "server.pem"), private_key=str(pki / "server.key")) as port:
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=trust, timeout=60) as c:
            r = c.get("/login")
            assert r.status_code == 200
            attrs = _cookie_attrs(r)
            assert attrs and all({"secure", "httponly", "samesite"} <= a for a in attrs)
            r = c.post("/login", data={"username": RAD[0], "password": RAD[1], "csrf_token": csrf_of(r.text)})
            assert r.status_code == 303 and all("secure" in a for a in _cookie_attrs(r))
            assert c.get("/worklist").status_code == 200
            assert "default-src 'self'" in c.get("/worklist").headers["content-security-policy"]


@pytest.mark.parametrize("trusted, secure", [(["127.0.0.1"], True), ([], False)], ids=["trusted", "untrusted"])
def test_forwarded_proto_makes_cookies_secure_only_from_a_trusted_proxy(web_node, trusted, secure):
    with serving(web_node, trusted_proxies=trusted) as port:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            r = c.get("/login", headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"})
            attrs = _cookie_attrs(r)
            assert attrs and all(("secure" in a) is secure for a in attrs)


def test_limits_count_the_client_a_trusted_proxy_names(web_node):
    with serving(web_node, trusted_proxies=["127.0.0.1"]) as port:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as proxy:
            def login(client_ip, password):
                return proxy.post("/api/token", data={"username": ADMIN[0], "password": password},
                                  headers={"X-Forwarded-For": client_ip})

            assert [login("203.0.113.5", f"guess-{i}").status_code for i in range(5)] == [401] * 5
            r = login("203.0.113.5", ADMIN[1])
            assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
            assert login("203.0.113.6", ADMIN[1]).status_code == 200
    with web_node.sessions() as s:
        rows = [(e.action, e.detail["client"]) for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert rows == [("login.failed", "203.0.113.5")] * 5 + [("login.throttled", "203.0.113.5"),
                                                            ("login", "203.0.113.6")]
