"""Helpers for the web tests: accounts, a DCMTK storescp peer on a free loopback port."""
from __future__ import annotations

import re
import threading
import uuid
from pathlib import Path

from tests.peers import StoreSCP, free_port, wait_port  # noqa: F401 - re-exported for the web tests

ADMIN = ("admin", "admin-password-1")
RAD = ("rad", "radiologist-pass-1")
REPO = Path(__file__).resolve().parents[2]
LIDC_SERIES = REPO.parent / "shared" / "data" / "lidc-idri" / "LIDC-IDRI-0001"
#: The reference nodule of LIDC-IDRI-0001 (shared/data/README.md): centre LPS mm, about 23-33 mm.
LIDC_NODULE_MM = (56.17, 86.20, -115.86)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, "no CSRF token in the page"
    return m.group(1)


def page_login(client, user: tuple[str, str]) -> None:
    """Log ``client`` in through the login form (cookie session)."""
    client.cookies.clear()
    token = csrf_of(client.get("/login").text)
    r = client.post("/login", data={"username": user[0], "password": user[1], "csrf_token": token, "next": "/worklist"},
                    follow_redirects=False)
    assert r.status_code == 303, r.text


def build_node(database_url: str, data_dir):
    from dicom_node.config import Settings
    from dicom_node.node import open_node

    settings = Settings(node={"data_dir": str(data_dir), "port": 11112, "host": "127.0.0.1", "ae_title": "WEBTEST"},
                        database={"url": database_url}, web={"secret_key": "test-secret-" + uuid.uuid4().hex})
    return open_node(settings)


def create_accounts(node) -> None:
    from dicom_node.web.security import hash_password
    from storage import users

    with node.sessions.begin() as s:
        for (name, password), role in ((ADMIN, "admin"), (RAD, "radiologist")):
            if users.get_user(s, name) is None:
                users.add_user(s, name, role, hash_password(password))


class WebServer:
    """An application under a real uvicorn server in a thread, on ``127.0.0.1:port``."""

    def __init__(self, app, port: int):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = port

    def __enter__(self):
        self.thread.start()
        wait_port(self.port)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


# --- a real browser: Debian's Chromium, headless, driven by Playwright ------------------------------

CHROMIUM = __import__("os").environ.get("DICOM_NODE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1366, "height": 768}


def launch_chromium():
    """A context manager yielding a launched Playwright browser (skips when Chromium is absent)."""
    import contextlib
    import os

    import pytest

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    @contextlib.contextmanager
    def _browser():
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield browser
            finally:
                browser.close()

    return _browser()


def open_page(browser, base_url: str, *, timeout_ms: int = 15000):
    """A context manager yielding ``(page, offsite, console)`` in a fresh browser context.

    ``offsite`` collects every request to anything but ``base_url`` (and blob:/data:), ``console``
    every console message; the caller asserts on them after the ``with`` block."""
    import contextlib

    @contextlib.contextmanager
    def _page():
        context = browser.new_context(viewport=VIEWPORT, base_url=base_url)
        offsite: list[str] = []
        console: list[str] = []
        context.on("request", lambda req: offsite.append(req.url)
                   if not req.url.startswith((base_url, "blob:", "data:")) else None)
        pg = context.new_page()
        pg.set_default_timeout(timeout_ms)
        pg.on("console", lambda m: console.append(m.text))
        try:
            yield pg, offsite, console
        finally:
            context.close()

    return _page()
