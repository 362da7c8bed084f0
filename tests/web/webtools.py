"""Helpers for the web tests: accounts, a DCMTK storescp peer on a free loopback port."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

ADMIN = ("admin", "admin-password-1")
RAD = ("rad", "radiologist-pass-1")
REPO = Path(__file__).resolve().parents[2]
LIDC_SERIES = REPO.parent / "shared" / "data" / "lidc-idri" / "LIDC-IDRI-0001"
#: The reference nodule of LIDC-IDRI-0001 (shared/data/README.md): centre LPS mm, about 23-33 mm.
LIDC_NODULE_MM = (56.17, 86.20, -115.86)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


class StoreSCP:
    """DCMTK ``storescp`` (Debian package dcmtk) on a free loopback port."""

    def __init__(self, folder: Path, ae_title: str = "STORESCP"):
        self.folder, self.ae_title, self.port = Path(folder), ae_title, free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        binary = shutil.which("storescp") or "/usr/bin/storescp"
        if not Path(binary).exists():
            pytest.skip("DCMTK storescp is not installed (apt-get install dcmtk)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([binary, "--aetitle", self.ae_title, "--output-directory", str(self.folder),
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


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
