"""Real peers for tests, started on loopback on free ports: DCMTK storescp, Orthanc, and the
node itself (``dicom-node serve`` as a child process in its own process group)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
LIDC_SERIES = DATA / "lidc-idri" / "LIDC-IDRI-0001"
LIDC_NODULE_MM = (56.17, 86.20, -115.86)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (make test installs the Debian peers)")
    return path


def need_lidc() -> Path:
    if not LIDC_SERIES.is_dir():
        pytest.skip(f"LIDC-IDRI-0001 not found at {LIDC_SERIES} (shared data absent)")
    return LIDC_SERIES


class StoreSCP:
    """DCMTK storescp writing into ``folder``; ``accept_ae`` restricts the called AE title."""

    def __init__(self, folder: Path, ae_title: str = "STORESCP", port: int | None = None):
        self.folder, self.ae_title = Path(folder), ae_title
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [need("storescp"), "--aetitle", self.ae_title, "--output-directory", str(self.folder),
             "--accept-all", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


#: The Debian package orthanc-dicomweb's plugin (DICOMweb under /dicom-web/ once loaded).
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class Orthanc:
    """A real Orthanc PACS with its REST API, DICOM server and one modality (the node)."""

    def __init__(self, folder: Path, node_ae: str, node_port: int, ae_title: str = "ORTHANC",
                 dicom_port: int | None = None, plugins: list[str] = (), config: dict | None = None,
                 env: dict | None = None):
        """``plugins``: shared libraries to load (e.g. the Debian orthanc-dicomweb plugin,
        ``DICOMWEB_PLUGIN``); ``config``: more configuration keys; ``env``: more environment."""
        self.plugins, self.extra_config, self.env = list(plugins), dict(config or {}), dict(env or {})
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.http_port, self.dicom_port = free_port(), dicom_port or free_port()
        self.node_ae, self.node_port = node_ae, node_port
        self.proc: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        binary = shutil.which("Orthanc") or shutil.which("orthanc")
        if binary is None:
            pytest.skip("Orthanc is not installed (make test installs it)")
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "test-pacs", "StorageDirectory": str(self.folder / "db"), "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
            "DicomModalities": {"node": [self.node_ae, "127.0.0.1", self.node_port]},
            "Plugins": self.plugins, "DicomScpTimeout": 30, "StableAge": 2, "LogExportedResources": False,
            **self.extra_config,
        }
        (self.folder / "orthanc.json").write_text(json.dumps(cfg))
        self.log = open(self.folder / "orthanc.log", "w")
        self.proc = subprocess.Popen([binary, str(self.folder / "orthanc.json")], stdout=self.log, stderr=self.log,
                                     env={**os.environ, **self.env})
        wait_port(self.http_port, proc=self.proc)
        wait_port(self.dicom_port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.log.close()

    def rest(self, method: str, path: str, body: bytes | dict | list | None = None):
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=120) as resp:
            raw = resp.read()
        return json.loads(raw) if raw[:1] in (b"{", b"[") else raw

    def upload(self, folder: Path) -> str:
        """Upload every file under ``folder``; returns the Orthanc study ID."""
        study = None
        for f in sorted(folder.iterdir()):
            if f.is_file():
                study = self.rest("POST", "/instances", f.read_bytes())["ParentStudy"]
        return study


class NodeProcess:
    """``dicom-node serve`` in its own process group, with a config written for the test."""

    def __init__(self, folder: Path, *, ae_title: str = "DICOM_NODE", sources=("STORESCU", "ORTHANC", "NODETEST"),
                 destinations: list[dict] = (), quiet_seconds: float = 2.0, database_url: str = "",
                 web: bool = False, extra: str = ""):
        self.folder = Path(folder)
        self.port, self.web_port = free_port(), free_port()
        self.ae_title = ae_title
        self.data_dir = self.folder / "var"
        src = "".join(f'\n[[sources]]\nae_title = "{s}"\n' for s in sources)
        dst = "".join(
            f'\n[[destinations]]\nname = "{d["name"]}"\nae_title = "{d["ae_title"]}"\nhost = "127.0.0.1"\n'
            f'port = {d["port"]}\noutputs = {json.dumps(d.get("outputs", ["sr", "seg"]))}\n' for d in destinations)
        self.config = self.folder / "config.toml"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(textwrap.dedent(f"""
            [node]
            ae_title = "{ae_title}"
            host = "127.0.0.1"
            port = {self.port}
            data_dir = "{self.data_dir}"
            [database]
            url = "{database_url}"
            [web]
            enabled = {str(web).lower()}
            port = {self.web_port}
            [completion]
            quiet_seconds = {quiet_seconds}
            [worker]
            lease_seconds = 6
            poll_seconds = 0.5
            [dispatch]
            backoff_base_seconds = 1
            backoff_max_seconds = 2
            timeout_seconds = 10
            """) + extra + src + dst)
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "dicom_node.cli", *args, "--config", str(self.config)],
                           capture_output=True, text=True, input=input, cwd=REPO, timeout=300)
        if check and r.returncode != 0:
            raise AssertionError(f"dicom-node {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
        return r

    def start(self, timeout: float = 60.0) -> NodeProcess:
        self.log = open(self.folder / "node.log", "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config)],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_port(self.port, timeout=timeout, proc=self.proc)
        return self

    def stop(self, timeout: float = 40.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()
            self.log.close()

    def kill(self) -> None:
        """SIGKILL the whole process group (the supervisor and every stage)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def log_text(self) -> str:
        return (self.folder / "node.log").read_text(errors="replace")

    def sessions(self):
        from storage.db import open_database, sqlite_url

        return open_database(self.database_url or sqlite_url(self.data_dir))

    @property
    def database_url(self) -> str:
        import tomllib

        return tomllib.loads(self.config.read_text())["database"]["url"]


PG_ADMIN_URL = os.environ.get("DICOM_NODE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def pg_database(prefix: str = "dicomnode_test"):
    """A fresh, empty PostgreSQL database (its URL), dropped afterwards. Skips the test with a
    message when no server answers at ``DICOM_NODE_TEST_PG``."""
    import psycopg

    def admin():
        try:
            return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
        except psycopg.OperationalError as exc:
            pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL} ({exc.__class__.__name__}); "
                        "set DICOM_NODE_TEST_PG or start a server to run the PostgreSQL variants")

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port`` now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
