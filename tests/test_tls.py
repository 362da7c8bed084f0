"""DICOM TLS (PS3.15 Annex B) and HTTPS against real peers on loopback: DCMTK's TLS-enabled
storescu, echoscu and storescp (``+tls``), the node's own SCU, and uvicorn over HTTPS.

A throw-away PKI is made per module with the ``openssl`` command: a CA, a server certificate
(SAN localhost and 127.0.0.1), a client certificate, both signed by the CA, and a second, rogue
CA with its own client and server certificates that the node must not trust.
"""
from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.dispatch import dispatch_once
from dicom_node.scp import Listener
from storage.models import AssociationLog, AssociationResult, Destination, Instance, Transfer, TransferState
from tests.peers import REPO, free_port, need, wait_for, wait_port
from tests.results.synthetic_ct import SeriesSpec, write_series
from tests.web.webtools import csrf_of, page_login


# --- a throw-away PKI -----------------------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run([need("openssl"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _make_ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)


def _make_leaf(folder: Path, name: str, ca: str) -> None:
    (folder / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                        "extendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    _make_ca(folder, "ca")
    _make_ca(folder, "rogue-ca")
    _make_leaf(folder, "server", "ca")
    _make_leaf(folder, "client", "ca")
    _make_leaf(folder, "rogue-client", "rogue-ca")
    _make_leaf(folder, "rogue-server", "rogue-ca")
    return folder


def tls_settings(pki: Path, **overrides) -> dict:
    return {"enabled": True, "port": 0, "certificate": str(pki / "server.pem"), "private_key": str(pki / "server.key"),
            "ca_certificates": str(pki / "ca.pem"), "handshake_timeout_seconds": 20, **overrides}


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory) -> list[Path]:
    return write_series(tmp_path_factory.mktemp("ct"), SeriesSpec(n_slices=2, rows=8, columns=8))


@contextlib.contextmanager
def running_listener(node):
    scp = Listener(node)
    scp.start(0)
    try:
        yield scp
    finally:
        scp.stop()


def dcmtk(binary: str, port: int, *args: str, tls: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """A DCMTK SCU (storescu/echoscu) as STORESCU -> DICOM_NODE; ``tls`` its TLS options."""
    return subprocess.run([need(binary), "-aet", "STORESCU", "-aec", "DICOM_NODE", "-to", "30", *tls,
                           "127.0.0.1", str(port), *args], capture_output=True, text=True, timeout=120)


def with_cert(pki: Path, name: str = "client", ca: str = "ca") -> tuple[str, ...]:
    return ("+tls", str(pki / f"{name}.key"), str(pki / f"{name}.pem"), "+cf", str(pki / f"{ca}.pem"))


def anonymous(pki: Path) -> tuple[str, ...]:
    return ("+tla", "+cf", str(pki / "ca.pem"))


def audit_rows(node) -> list[AssociationLog]:
    with node.sessions() as s:
        return s.scalars(select(AssociationLog).order_by(AssociationLog.id)).all()


def wait_audit(node, text: str) -> AssociationLog:
    return wait_for(lambda: next((r for r in audit_rows(node) if text in (r.reason or "")), None), 30,
                    what=f"an audit row with {text!r}")


# --- the listener -----------------------------------------------------------------------------------

def test_storescu_over_tls_is_stored_indexed_and_audited(make_node, pki, ct_files):
    node = make_node(tls=tls_settings(pki))
    with running_listener(node) as scp:
        assert scp.tls_port and scp.tls_port != scp.port  # beside the plain port
        r = dcmtk("storescu", scp.tls_port, *map(str, ct_files), tls=with_cert(pki))
        assert r.returncode == 0, r.stderr
        with node.sessions() as s:
            stored = {i.sop_instance_uid for i in s.scalars(select(Instance))}
        assert stored == {dcmread(p).SOPInstanceUID for p in ct_files}
        row = wait_for(lambda: next((a for a in audit_rows(node) if a.ended_at is not None), None), 30, what="audit")
        assert row.result is AssociationResult.ACCEPTED and row.instances == len(ct_files)
        # The plain port still serves plain TCP.
        assert dcmtk("echoscu", scp.port).returncode == 0


def test_plain_tcp_on_the_tls_port_is_refused_once_clearly_and_the_node_keeps_serving(make_node, pki, ct_files, caplog):
    node = make_node(tls=tls_settings(pki))
    with running_listener(node) as scp, caplog.at_level(logging.INFO):
        r = dcmtk("storescu", scp.tls_port, str(ct_files[0]))
        assert r.returncode != 0
        row = wait_audit(node, "does not speak TLS")
        assert row.result is AssociationResult.REJECTED and "plain TCP on the TLS port" in row.reason
        assert dcmtk("echoscu", scp.tls_port, tls=with_cert(pki)).returncode == 0  # still serving
    with node.sessions() as s:
        assert s.scalar(select(Instance)) is None
    refusals = [r for r in caplog.records if "does not speak TLS" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_required_client_certificate_refuses_anonymous_and_untrusted_callers(make_node, pki):
    node = make_node(tls=tls_settings(pki, require_client_certificate=True))
    with running_listener(node) as scp:
        assert dcmtk("echoscu", scp.tls_port, tls=anonymous(pki)).returncode != 0
        assert "no client certificate" in wait_audit(node, "no client certificate").reason
        assert dcmtk("echoscu", scp.tls_port, tls=with_cert(pki, "rogue-client")).returncode != 0
        assert "certificate not accepted" in wait_audit(node, "certificate not accepted").reason
        assert dcmtk("echoscu", scp.tls_port, tls=with_cert(pki)).returncode == 0
    assert [r.result for r in audit_rows(node)].count(AssociationResult.REJECTED) == 2


def test_optional_client_certificate_accepts_anonymous_tls(make_node, pki):
    node = make_node(tls=tls_settings(pki))
    with running_listener(node) as scp:
        assert dcmtk("echoscu", scp.tls_port, tls=anonymous(pki)).returncode == 0


def test_min_version_is_enforced(make_node, pki):
    node = make_node(tls=tls_settings(pki, min_version="1.3"))
    with running_listener(node) as scp:
        tls12 = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        with socket.create_connection(("127.0.0.1", scp.tls_port)) as raw:
            with pytest.raises(ssl.SSLError):
                tls12.wrap_socket(raw, server_hostname="localhost")
        assert "version" in wait_audit(node, "TLS handshake failed").reason
        tls13 = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with socket.create_connection(("127.0.0.1", scp.tls_port)) as raw, \
                tls13.wrap_socket(raw, server_hostname="localhost") as conn:
            assert conn.version() == "TLSv1.3"


def test_a_missing_certificate_stops_the_listener_with_one_clear_line(make_node, pki, tmp_path, caplog):
    from dicom_node.scp import run_listener

    missing = tmp_path / "nowhere" / "node.pem"
    node = make_node(tls=tls_settings(pki, certificate=str(missing)))
    with pytest.raises(SystemExit) as stopped:
        run_listener(node, threading.Event())
    assert stopped.value.code == 2
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert lines == [f"cannot start the DICOM TLS listener: [tls] certificate/private_key: file {missing} does not exist"]


def test_tls_only_listener_has_no_plain_port(make_node, pki):
    node = make_node(tls=tls_settings(pki, plain=False))
    with running_listener(node) as scp:
        assert scp.port is None and scp.tls_port
        assert dcmtk("echoscu", scp.tls_port, tls=with_cert(pki)).returncode == 0
        assert dcmtk("echoscu", scp.tls_port).returncode != 0


def test_a_silent_client_does_not_hold_up_the_tls_port_and_is_cut_off(make_node, pki):
    """pynetdicom handshakes in its accepting thread when left to itself: one client that
    connects and says nothing would stop every other caller from being accepted."""
    node = make_node(tls=tls_settings(pki, handshake_timeout_seconds=5))
    with running_listener(node) as scp:
        with socket.create_connection(("127.0.0.1", scp.tls_port)) as silent:
            assert dcmtk("echoscu", scp.tls_port, tls=with_cert(pki)).returncode == 0
            silent.settimeout(60)
            assert silent.recv(1) == b""  # closed by the node after the handshake timeout
        assert "within 5 s" in wait_audit(node, "handshake not completed").reason


def test_listen_stage_serves_tls_with_certificate_paths_relative_to_the_config(tmp_path, pki, ct_files):
    import os
    import shutil
    import signal

    for name in ("server.pem", "server.key", "ca.pem"):
        shutil.copy(pki / name, tmp_path / name)
    tls_port = free_port()
    cfg = tmp_path / "config.toml"
    cfg.write_text(textwrap.dedent(f"""
        [node]
        host = "127.0.0.1"
        port = {free_port()}
        data_dir = "var"
        [tls]
        enabled = true
        port = {tls_port}
        plain = false
        certificate = "server.pem"
        private_key = "server.key"
        ca_certificates = "ca.pem"
        [[sources]]
        ae_title = "STORESCU"
        """))
    with open(tmp_path / "listen.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "listen", "--config", str(cfg)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(tls_port, timeout=60, proc=proc)
        r = dcmtk("storescu", tls_port, str(ct_files[0]), tls=with_cert(pki))
        assert r.returncode == 0, r.stderr
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert "with DICOM TLS on 127.0.0.1" in (tmp_path / "listen.log").read_text()


# --- the node as SCU --------------------------------------------------------------------------------

class TLSStoreSCP:
    """DCMTK ``storescp +tls`` on a free loopback port; peer certificates required (``-rc``)."""

    def __init__(self, folder: Path, pki: Path, server: str = "server", ae_title: str = "STORESCP"):
        self.folder, self.port, self.ae_title = folder, free_port(), ae_title
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = open(folder.parent / f"storescp-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [need("storescp"), "--aetitle", ae_title, "--output-directory", str(folder), "--accept-all",
             "+tls", str(pki / f"{server}.key"), str(pki / f"{server}.pem"), "+cf", str(pki / "ca.pem"), "-rc",
             str(self.port)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, proc=self.proc)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def tls_storescp(tmp_path, pki):
    peers: list[TLSStoreSCP] = []

    def _start(server: str = "server") -> TLSStoreSCP:
        peers.append(TLSStoreSCP(tmp_path / f"received-{len(peers)}", pki, server))
        return peers[-1]

    yield _start
    for p in peers:
        p.stop()


def queue_tls_transfer(node, port: int, files: list[Path], tls: bool = True) -> int:
    """A done job whose result objects are ``files``, and one transfer to a TLS destination."""
    import shutil

    from storage.models import Job, JobState, ResultObject, Series, Study

    with node.sessions.begin() as s:
        study = Study(study_instance_uid=f"1.2.3.{free_port()}")
        series = Series(series_instance_uid=f"1.2.3.4.{free_port()}", study=study)
        job = Job(series=series, idempotency_key=f"tls-{port}-{time.monotonic_ns()}", state=JobState.DONE)
        dest = Destination(name=f"pacs{port}", ae_title="STORESCP", host="127.0.0.1", port=port,
                           outputs=["sr", "seg"], tls=tls)
        s.add_all([study, series, job, dest])
        s.flush()
        ids = []
        for f in files:
            ds = dcmread(f, stop_before_pixels=True)
            rel = f"results/{job.id}/{f.name}"
            node.store.path(rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, node.store.path(rel))
            obj = ResultObject(job=job, kind="sc", sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
                               series_instance_uid=ds.SeriesInstanceUID, path=rel)
            s.add(obj)
            s.flush()
            ids.append(obj.id)
        t = Transfer(job=job, destination=dest, result_object_ids=ids, sent_sop_instance_uids=[],
                     state=TransferState.PENDING)
        s.add(t)
        s.flush()
        return t.id


def test_results_are_dispatched_into_storescp_over_tls(make_node, pki, ct_files, tls_storescp):
    peer = tls_storescp()
    # The node's [tls] certificate is its client identity: storescp -rc requires one.
    node = make_node(tls=tls_settings(pki, enabled=False), dispatch={"timeout_seconds": 20})
    tid = queue_tls_transfer(node, peer.port, ct_files)
    assert dispatch_once(node, "test")
    with node.sessions() as s:
        t = s.get(Transfer, tid)
        assert t.state is TransferState.SENT, t.error
        assert sorted(t.sent_sop_instance_uids) == sorted(dcmread(p).SOPInstanceUID for p in ct_files)
    received = {dcmread(p).SOPInstanceUID for p in wait_for(lambda: len(peer.files()) == len(ct_files) and peer.files(),
                                                             30, what="files at storescp")}
    assert received == {dcmread(p).SOPInstanceUID for p in ct_files}


def test_a_destination_with_an_untrusted_certificate_fails_permanently_with_the_reason(
        make_node, pki, ct_files, tls_storescp, caplog):
    peer = tls_storescp("rogue-server")
    node = make_node(tls=tls_settings(pki, enabled=False), dispatch={"timeout_seconds": 20})
    tid = queue_tls_transfer(node, peer.port, ct_files)
    assert dispatch_once(node, "test")
    with node.sessions() as s:
        t = s.get(Transfer, tid)
        assert t.state is TransferState.FAILED and not t.sent_sop_instance_uids
        assert "certificate not accepted" in t.error and "STORESCP@127.0.0.1" in t.error, t.error
    assert peer.files() == []
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_a_destination_that_requires_a_client_certificate_the_node_lacks_fails_with_the_reason(
        make_node, pki, ct_files, tls_storescp):
    peer = tls_storescp()
    node = make_node(tls={"ca_certificates": str(pki / "ca.pem")}, dispatch={"timeout_seconds": 20})
    tid = queue_tls_transfer(node, peer.port, ct_files)
    assert dispatch_once(node, "test")
    with node.sessions() as s:
        t = s.get(Transfer, tid)
        assert t.state is TransferState.FAILED and "requires a client certificate" in t.error, t.error


def test_a_tls_destination_on_a_plain_peer_is_retried_with_the_reason(make_node, pki, ct_files, tmp_path):
    """DCMTK's plain storescp resets a connection that starts with a ClientHello: from the node's
    side that looks like a peer restarting, so the transfer is retried (transient), never SENT."""
    from tests.peers import StoreSCP

    peer = StoreSCP(tmp_path / "plain-received").start()
    try:
        node = make_node(tls=tls_settings(pki, enabled=False), dispatch={"timeout_seconds": 10})
        tid = queue_tls_transfer(node, peer.port, ct_files)
        assert dispatch_once(node, "test")
        with node.sessions() as s:
            t = s.get(Transfer, tid)
            assert t.state is TransferState.PENDING and t.attempts == 1, (t.state, t.error)
            assert "TLS handshake failed: connection lost" in t.error, t.error
        assert peer.files() == []
    finally:
        peer.stop()


def test_a_plain_destination_on_a_tls_peer_is_not_reported_sent(make_node, pki, ct_files, tls_storescp):
    peer = tls_storescp()
    node = make_node(tls=tls_settings(pki, enabled=False), dispatch={"timeout_seconds": 10})
    tid = queue_tls_transfer(node, peer.port, ct_files, tls=False)
    assert dispatch_once(node, "test")
    with node.sessions() as s:
        assert s.get(Transfer, tid).state is not TransferState.SENT


def _config(tmp_path: Path, pki: Path, port: int = 0, **tls) -> Path:
    cfg = tmp_path / "config.toml"
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in tls_settings(pki, enabled=False, **tls).items())
    cfg.write_text(textwrap.dedent(f"""
        [node]
        ae_title = "DICOM_NODE"
        data_dir = "{tmp_path / 'var'}"
        port = {port}
        [tls]
        """) + lines)
    return cfg


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args, "--config", str(cfg)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_echo_and_destination_commands_over_tls(tmp_path, pki, tls_storescp):
    peer = tls_storescp()
    cfg = _config(tmp_path, pki)
    peer_arg = f"STORESCP@127.0.0.1:{peer.port}"
    r = cli(cfg, "echo", peer_arg, "--tls")
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stderr
    assert cli(cfg, "echo", peer_arg, "--timeout", "5").returncode != 0  # plain TCP to a TLS peer
    r = cli(cfg, "destination", "add", "pacs", peer_arg, "--tls")
    assert r.returncode == 0 and "over TLS" in r.stdout, r.stderr
    assert "tls" in cli(cfg, "destination", "list").stdout
    r = cli(cfg, "destination", "echo", "pacs")
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stderr
    # Re-added without --tls: the flag is cleared, and the echo fails against the TLS peer.
    assert cli(cfg, "destination", "add", "pacs", peer_arg).returncode == 0
    assert cli(cfg, "destination", "echo", "pacs").returncode != 0


def test_destination_tls_flag_through_the_api_and_the_seed(make_node, db_url, pki, tls_storescp):
    from fastapi.testclient import TestClient

    from dicom_node.web.app import create_app
    from dicom_node.web.security import hash_password
    from storage import users

    peer = tls_storescp()
    node = make_node(db_url, tls=tls_settings(pki, enabled=False),
                     destinations=[{"name": "seeded", "ae_title": "STORESCP", "host": "127.0.0.1",
                                    "port": peer.port, "tls": True}])
    with node.sessions.begin() as s:
        assert s.scalar(select(Destination).where(Destination.name == "seeded")).tls is True
        users.add_user(s, "admin", "admin", hash_password("correct horse battery"))
    with TestClient(create_app(node)) as client:
        token = client.post("/api/token", data={"username": "admin", "password": "correct horse battery"}).json()
        h = {"Authorization": f"Bearer {token['access_token']}"}
        listed = {d["name"]: d for d in client.get("/api/destinations", headers=h).json()}
        assert listed["seeded"]["tls"] is True
        echo = client.post("/api/destinations/seeded/echo", headers=h).json()
        assert echo["ok"], echo
        body = {"name": "plain", "ae_title": "STORESCP", "host": "127.0.0.1", "port": peer.port}
        assert client.post("/api/destinations", json=body, headers=h).json()["tls"] is False
        assert client.put("/api/destinations/plain", json={**body, "tls": True}, headers=h).json()["tls"] is True
        assert client.post("/api/destinations/plain/echo", headers=h).json()["ok"]
        # The admin page's form: the TLS box sets and clears the flag.
        page_login(client, ("admin", "correct horse battery"))
        page = client.get("/admin/destinations").text
        assert 'name="tls"' in page
        form = {"name": "paged", "ae_title": "STORESCP", "host": "127.0.0.1", "port": str(peer.port),
                "outputs": ["sr"], "enabled": "1", "csrf_token": csrf_of(page)}
        assert "Destination paged added" in client.post("/admin/destinations", data={**form, "tls": "1"}).text
        paged = lambda: [d["tls"] for d in client.get("/api/destinations", headers=h).json() if d["name"] == "paged"]  # noqa: E731
        assert paged() == [True]
        assert "saved" in client.post("/admin/destinations/paged/update", data=form).text
        assert paged() == [False]


# --- HTTPS for the web -------------------------------------------------------------------------------

@contextlib.contextmanager
def serving(config):
    import uvicorn

    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_port(config.port)
        yield
    finally:
        server.should_exit = True
        thread.join(30)


def test_web_serves_https_with_the_configured_certificate(make_node, pki):
    from dicom_node.stages import run_web

    port = free_port()
    node = make_node(web={"port": port, "certificate": str(pki / "server.pem"), "private_key": str(pki / "server.key")})
    stop = threading.Event()
    thread = threading.Thread(target=run_web, args=(node, stop), daemon=True)
    thread.start()
    try:
        wait_port(port)
        trust = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/openapi.json", context=trust, timeout=30) as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.URLError):  # not trusted without the CA
            urllib.request.urlopen(f"https://127.0.0.1:{port}/openapi.json", context=ssl.create_default_context(),
                                   timeout=30)
    finally:
        stop.set()
        thread.join(30)


async def _echo_app(scope, receive, send):
    """ASGI app answering with what the server made of the request: scheme and client address."""
    if scope["type"] != "http":
        return
    body = json.dumps({"scheme": scope["scheme"], "client": scope["client"][0]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def _ask(port: int) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"X-Forwarded-Proto": "https",
                                                                       "X-Forwarded-For": "203.0.113.7"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize("trusted, believed", [([], False), (["127.0.0.1"], True), (["192.0.2.1"], False)])
def test_forwarded_headers_are_believed_only_from_trusted_proxies(trusted, believed):
    from dicom_node.config import WebSection
    from dicom_node.tls import web_config

    web = WebSection(port=free_port(), trusted_proxies=trusted)
    with serving(web_config(_echo_app, web, log_level="warning", lifespan="off")):
        seen = _ask(web.port)
    if believed:
        assert seen == {"scheme": "https", "client": "203.0.113.7"}
    else:
        assert seen == {"scheme": "http", "client": "127.0.0.1"}
