"""Listener limits (issue 11, defects 3 and 4) with real sockets and real DCMTK peers.

Memory is measured on a listener in a child process (its peak RSS, ``VmHWM``), with margins far
below what the old code took. Times are generous: nothing here depends on the machine's speed.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from dicom_node.scp import Listener
from storage.db import open_database
from storage.models import AssociationLog, AssociationResult, Instance
from tests.peers import REPO, need, need_lidc, wait_for

MiB = 1024 * 1024


# --- helpers -------------------------------------------------------------------------------------

CHILD = """
import json, sys
from dicom_node.config import Settings
from dicom_node.node import open_node
from dicom_node.scp import Listener
listener = Listener(open_node(Settings(**json.loads(sys.argv[1]))))
print(listener.start(0), flush=True)
sys.stdin.read()  # until the test closes our stdin
listener.stop()
"""


class ChildListener:
    """The listener alone in a child process, so its memory can be measured."""

    def __init__(self, tmp_path: Path, **node):
        self.db_url = f"sqlite:///{tmp_path / 'child.sqlite3'}"
        settings = {"node": {"data_dir": str(tmp_path / "child-var"), "port": 0, "host": "127.0.0.1", **node},
                    "database": {"url": self.db_url}, "sources": [{"ae_title": "STORESCU"}, {"ae_title": "NODETEST"}]}
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(settings)], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        self.port = int(self.proc.stdout.readline())

    def peak_rss(self) -> int:
        """Peak resident memory of the listener process so far (bytes)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def rows(self) -> list[AssociationLog]:
        with open_database(self.db_url)() as s:
            return s.scalars(select(AssociationLog).order_by(AssociationLog.id)).all()

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def child(tmp_path):
    made = []

    def _make(**node) -> ChildListener:
        made.append(ChildListener(tmp_path, **node))
        return made[-1]

    yield _make
    for c in made:
        c.stop()


@pytest.fixture
def make_listener(make_node, tmp_path):
    """An in-process listener on SQLite with ``[node]`` overrides (limits are not database-specific)."""
    made = []

    def _make(**node):
        n = make_node(f"sqlite:///{tmp_path / 'node.sqlite3'}", node=node)
        scp = Listener(n)
        scp.start(0)
        made.append(scp)
        return n, scp

    yield _make
    for scp in made:
        scp.stop()


def rows(node) -> list[AssociationLog]:
    with node.sessions() as s:
        return s.scalars(select(AssociationLog).order_by(AssociationLog.id)).all()


def echoscu(port: int, calling: str = "STORESCU") -> subprocess.CompletedProcess:
    return subprocess.run([need("echoscu"), "-aet", calling, "-aec", "DICOM_NODE", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


def rq_header(length: int) -> bytes:
    """A-ASSOCIATE-RQ PDU header declaring a variable part of ``length`` bytes."""
    return struct.pack(">BBL", 0x01, 0x00, length)


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the other end closes ``sock`` within ``timeout`` s (reads and drops what comes)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


class Drip(threading.Thread):
    """A socket that connects and sends an association request one byte per ``every`` s."""

    def __init__(self, port: int, every: float = 1.0, declared: int = 200, silent: bool = False):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.every, self.declared, self.silent = every, declared, silent
        self.closed_at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        data = rq_header(self.declared) + bytes(self.declared)
        try:
            for i in range(len(data)):
                if self.stop.wait(self.every):
                    return
                if not self.silent:
                    self.sock.send(data[i:i + 1])
                self.sock.settimeout(0.01)
                try:
                    if self.sock.recv(1) == b"":
                        break
                except TimeoutError:
                    continue
        except OSError:
            pass
        self.closed_at = time.monotonic()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def write_big_instance(path: Path, payload: int, *, deflated: bool) -> str:
    """A CT instance whose pixel data is ``payload`` zero bytes, written without ever holding it
    (deflated: a few hundred kB on disk per 256 MiB). Returns its SOP Instance UID."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "LIMITS", "Limits^Test"
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    head = buf.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, payload)
    meta = Dataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS) if deflated else None
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, meta, enforce_standard=True)
        f.write(comp.compress(head) if comp else head)
        zeros = bytes(MiB)
        for _ in range(payload // MiB):
            f.write(comp.compress(zeros) if comp else zeros)
        if comp:
            f.write(comp.flush())
    return str(ds.SOPInstanceUID)


def storescu(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need("storescu"), "-v", "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1", str(port),
                           *args], capture_output=True, text=True, timeout=300)


# --- defect 3: memory ----------------------------------------------------------------------------

def test_oversized_association_request_is_refused_unread_and_memory_stays_flat(child):
    """5 sockets each declare a 200 MiB A-ASSOCIATE-RQ and send 64 MiB of it: the listener reads
    the 6-byte header, refuses, and its peak memory does not move (the old code read it all)."""
    scp = child()  # default max_request_pdu: 256 KiB
    before = scp.peak_rss()

    def flood():
        try:
            with socket.create_connection(("127.0.0.1", scp.port)) as s:
                s.sendall(rq_header(200 * MiB))
                chunk = bytes(MiB)
                for _ in range(64):
                    s.sendall(chunk)
                closed_by_peer(s, 10)
        except OSError:
            pass  # refused: reset by the listener

    threads = [threading.Thread(target=flood) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    time.sleep(1)
    grown = scp.peak_rss() - before
    assert grown < 40 * MiB, f"listener peak RSS grew by {grown / MiB:.0f} MiB"
    wait_for(lambda: len([r for r in scp.rows() if r.reason and "declares PDU length" in r.reason]) == 5, 30,
             what="5 audited refusals")
    refused = [r for r in scp.rows() if r.reason and "declares PDU length" in r.reason]
    assert all(r.result is AssociationResult.REJECTED for r in refused)
    assert f"declares PDU length {200 * MiB} bytes, more than max_request_pdu {256 * 1024}" in refused[0].reason
    assert echoscu(scp.port).returncode == 0  # and the listener still serves


def test_deflated_bomb_is_refused_with_a_permanent_status_and_never_inflated(child, tmp_path):
    """256 kB on the wire (DCMTK storescu -xd keeps it deflated) that inflates to 256 MiB: refused
    with 0xC000 and the reason; nothing stored; peak memory far below the inflated size."""
    bomb = tmp_path / "bomb.dcm"
    write_big_instance(bomb, 256 * MiB, deflated=True)
    assert bomb.stat().st_size < 2 * MiB
    scp = child(max_dataset_bytes=64 * MiB)
    before = scp.peak_rss()
    r = storescu(scp.port, "-xd", str(bomb))
    grown = scp.peak_rss() - before
    assert "Deflated Explicit VR Little Endian -> Deflated Explicit VR Little Endian" in r.stderr, r.stderr
    assert "Error: CannotUnderstand" in r.stderr, r.stderr  # 0xC000: a failure, not retried
    assert grown < 48 * MiB, f"listener peak RSS grew by {grown / MiB:.0f} MiB"
    with open_database(scp.db_url)() as s:
        assert s.scalars(select(Instance)).all() == []
    row = wait_for(lambda: [r for r in scp.rows() if r.ended_at is not None and r.reason] or None, 30,
                   what="the association's audit row")[-1]
    assert row.reason == f"dataset exceeds {64 * MiB} bytes after inflation (max_dataset_bytes): 1 instance(s) refused"


def test_oversized_uncompressed_instance_is_refused_and_not_kept_in_memory(child, tmp_path):
    """A 160 MiB instance against a 16 MiB cap: the listener stops keeping its bytes at the cap,
    answers 0xC000 once the last fragment is in, and the next instance on the same association
    is stored."""
    big = tmp_path / "big.dcm"
    write_big_instance(big, 160 * MiB, deflated=False)
    small = sorted(need_lidc().iterdir())[0]
    scp = child(max_dataset_bytes=16 * MiB)
    before = scp.peak_rss()
    r = storescu(scp.port, "-nh", str(big), str(small))  # -nh: go on after a refusal
    grown = scp.peak_rss() - before
    assert "Error: CannotUnderstand" in r.stderr and "Received Store Response (Success)" in r.stderr, r.stderr
    assert grown < 96 * MiB, f"listener peak RSS grew by {grown / MiB:.0f} MiB for a 160 MiB instance"
    with open_database(scp.db_url)() as s:
        assert len(s.scalars(select(Instance)).all()) == 1


def test_a_large_but_real_association_request_is_accepted_with_the_defaults(make_listener):
    """128 presentation contexts each proposing all 45 transfer syntaxes pynetdicom knows: a
    148 kB A-ASSOCIATE-RQ, within the default max_request_pdu."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts

    node, scp = make_listener()
    ae = AE(ae_title="NODETEST")
    for cx in StoragePresentationContexts[:127]:
        ae.add_requested_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_requested_context(Verification, ALL_TRANSFER_SYNTAXES)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="DICOM_NODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_declared_pdu_over_max_pdu_aborts_the_association_with_the_reason(make_listener):
    node, scp = make_listener(max_pdu=16384)
    ae = AE(ae_title="NODETEST")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="DICOM_NODE")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 0x04, 0x00, 200 * MiB) + bytes(64 * 1024))
    wait_for(lambda: not assoc.is_established or assoc.is_aborted, 30, what="the abort")
    row = wait_for(lambda: [r for r in rows(node) if r.result is AssociationResult.ABORTED] or None, 30,
                   what="the audit row")[-1]
    assert row.reason == f"declared PDU length {200 * MiB} bytes exceeds {16384 + 64 * 1024} (max_pdu)"
    assoc.abort()


# --- defect 4: association limits and slow connections -------------------------------------------

def test_slow_association_requests_do_not_keep_real_senders_out(make_listener):
    """12 sockets dripping a request one byte per second (the old node refused everyone with 11):
    a real storescu still gets in, and the cut connections are audited with their reason."""
    node, scp = make_listener(max_associations=4, association_request_timeout=300)
    drips = [Drip(scp.port) for _ in range(12)]
    for d in drips:
        d.start()
    try:
        time.sleep(3)
        r = subprocess.run([need("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1", str(scp.port),
                            str(sorted(need_lidc().iterdir())[0])], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        with node.sessions() as s:
            assert len(s.scalars(select(Instance)).all()) == 1
        reasons = [x.reason or "" for x in rows(node)]
        assert any(x.startswith("too many connections waiting to send an association request (4)") for x in reasons)
    finally:
        for d in drips:
            d.close()


def test_request_timeout_holds_against_a_drip_and_a_silent_socket(make_listener):
    node, scp = make_listener(association_request_timeout=3)
    drip, silent = Drip(scp.port), Drip(scp.port, silent=True)
    started = time.monotonic()
    drip.start()
    silent.start()
    try:
        wait_for(lambda: drip.closed_at and silent.closed_at, 30, interval=0.2, what="both sockets cut")
        assert drip.closed_at - started < 20 and silent.closed_at - started < 20
        assert drip.closed_at - started >= 2.5  # not before the timeout
        timed_out = wait_for(lambda: [r for r in rows(node) if r.reason == "association request not complete "
                                      "after 3 s (association_request_timeout)"] or None, 20, what="audit rows")
        wait_for(lambda: len([r for r in rows(node) if (r.reason or "").startswith("association request not "
                                                                                   "complete")]) == 2, 20,
                 what="both audited")
        assert all(r.result is AssociationResult.REJECTED for r in timed_out)
    finally:
        drip.close()
        silent.close()


def test_max_associations_is_configurable_and_the_next_gets_a_transient_rejection(make_listener):
    node, scp = make_listener(max_associations=2)
    ae = AE(ae_title="NODETEST")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", scp.port, ae_title="DICOM_NODE") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        r = echoscu(scp.port)
        assert r.returncode != 0
        assert "Rejected Transient" in r.stderr and "Local Limit Exceeded" in r.stderr, r.stderr
        row = [x for x in rows(node) if x.result is AssociationResult.REJECTED][-1]
        assert row.reason == "maximum associations reached (2, max_associations)" and row.calling_ae == "STORESCU"
        held.pop().release()
        wait_for(lambda: echoscu(scp.port).returncode == 0, 30, interval=1, what="a freed slot")
    finally:
        for a in held:
            a.release()


def test_per_peer_limit_refuses_that_host_only(make_listener):
    node, scp = make_listener(max_associations_per_peer=1)
    ae = AE(ae_title="NODETEST")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", scp.port, ae_title="DICOM_NODE")
    try:
        assert first.is_established
        r = echoscu(scp.port)
        assert r.returncode != 0 and "Rejected Transient" in r.stderr, r.stderr
        row = [x for x in rows(node) if x.result is AssociationResult.REJECTED][-1]
        assert row.reason == "too many associations from 127.0.0.1 (1, max_associations_per_peer)"
        other = ae.associate("127.0.0.1", scp.port, ae_title="DICOM_NODE", bind_address=("127.0.0.2", 0))
        assert other.is_established  # another host is not affected
        other.release()
    finally:
        first.release()


def test_a_pdu_dripped_on_an_established_association_is_cut_at_idle_timeout(make_listener):
    node, scp = make_listener(idle_timeout=3)
    ae = AE(ae_title="NODETEST")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="DICOM_NODE")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    stop = threading.Event()

    def drip():  # a P-DATA-TF of 1000 bytes, one byte per 0.5 s: never idle, never complete
        try:
            raw.sendall(struct.pack(">BBL", 0x04, 0x00, 1000))
            while not stop.wait(0.5):
                raw.send(b"\0")
        except OSError:
            pass

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    try:
        row = wait_for(lambda: [r for r in rows(node) if r.result is AssociationResult.ABORTED] or None, 30,
                       what="the association cut")[-1]
        assert row.reason == "no complete PDU for 3 s (idle_timeout)"
    finally:
        stop.set()
        assoc.abort()


def test_a_silent_established_association_is_aborted_at_idle_timeout(make_listener):
    """idle_timeout is configurable (pynetdicom's network timeout was fixed at 60 s) and the
    abort is audited with that reason, not as a peer abort."""
    node, scp = make_listener(idle_timeout=2)
    ae = AE(ae_title="NODETEST")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="DICOM_NODE")
    assert assoc.is_established
    try:
        row = wait_for(lambda: [r for r in rows(node) if r.result is AssociationResult.ABORTED] or None, 30,
                       what="the idle association aborted")[-1]
        assert row.reason == "no complete PDU for 2 s (idle_timeout)"
        assert row.duration_s < 20
    finally:
        assoc.abort()


def test_refusals_are_counted_by_reason_in_metrics(make_listener):
    from prometheus_client import generate_latest

    from dicom_node.web.metrics import make_registry

    node, scp = make_listener(max_associations_per_peer=1, association_request_timeout=2)
    ae = AE(ae_title="NODETEST")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", scp.port, ae_title="DICOM_NODE")
    try:
        assert echoscu(scp.port).returncode != 0  # per-peer limit
        with socket.create_connection(("127.0.0.1", scp.port)) as s:
            s.sendall(rq_header(10 * MiB))  # request too large
            closed_by_peer(s, 10)
        with socket.create_connection(("127.0.0.1", scp.port)) as s:  # says nothing: request timeout
            assert closed_by_peer(s, 20)
    finally:
        held.release()
    wait_for(lambda: len([r for r in rows(node) if r.result is AssociationResult.REJECTED]) >= 3, 20,
             what="three refusals")
    text = generate_latest(make_registry(node.sessions)).decode()
    assert 'dicom_node_listener_refusals_total{reason="per_peer_limit"} 1.0' in text
    assert 'dicom_node_listener_refusals_total{reason="request_too_large"} 1.0' in text
    assert 'dicom_node_listener_refusals_total{reason="request_timeout"} 1.0' in text
    assert 'dicom_node_listener_refusals_total{reason="max_associations"} 0.0' in text


def test_defaults_and_old_configs():
    from dicom_node.config import Settings

    node = Settings(node={"ae_title": "X"}).node  # an old [node] section keeps working
    assert (node.max_associations, node.max_associations_per_peer, node.max_request_pdu) == (64, 16, 256 * 1024)
    assert node.association_request_timeout == 30 and node.idle_timeout == 60
    assert node.max_dataset_bytes == 512 * MiB and node.max_pdu == 0


def test_refusal_categories_are_counted_in_metrics_on_both_databases(make_node, db_url):
    """The category is computed in SQL (a CASE on the reason's opening), on SQLite and PostgreSQL."""
    from prometheus_client import generate_latest

    from dicom_node import scp_reasons
    from dicom_node.web.metrics import make_registry
    from storage import repo

    node = make_node(db_url)
    written = [scp_reasons.request_timeout(30), scp_reasons.request_timeout(5), scp_reasons.max_associations(64),
               scp_reasons.per_peer_limit("10.0.0.5", 16), scp_reasons.dataset_too_large(10, inflated=True),
               scp_reasons.request_too_large(1 << 30, 65536), scp_reasons.MALFORMED + ": unknown PDU type 0x00",
               "association aborted (A-ABORT or connection lost)", "100%_ of nothing"]
    with node.sessions.begin() as s:
        for reason in written:
            repo.log_association(s, direction="in", result=AssociationResult.REJECTED, reason=reason, instances=0)
        repo.log_association(s, direction="out", result=AssociationResult.REJECTED,
                             reason=scp_reasons.max_associations(1), instances=0)  # ours as a sender: not counted
    text = generate_latest(make_registry(node.sessions)).decode()
    expected = {"request_timeout": 2, "max_associations": 1, "per_peer_limit": 1, "dataset_too_large": 1,
                "request_too_large": 1, "malformed": 1, "idle_timeout": 0, "pending_limit": 0}
    for name, n in expected.items():
        assert f'dicom_node_listener_refusals_total{{reason="{name}"}} {float(n)}' in text, name
    assert {scp_reasons.category(r) for r in written[:7]} == set(expected) - {"idle_timeout", "pending_limit"}


def test_a_silent_client_on_the_tls_port_does_not_stop_tls_senders(make_listener, tmp_path):
    """pynetdicom does the TLS handshake in its accept loop: one client that connects and says
    nothing stopped every other connection (DCMTK's TLS echoscu timed out). The handshake now
    happens in the connection's own thread, under association_request_timeout."""
    import ssl

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([need("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    node, scp = make_listener()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server = scp.ae.start_server(("127.0.0.1", 0), block=False, ssl_context=ctx, evt_handlers=scp.handlers())
    port = server.server_address[1]
    silent = socket.create_connection(("127.0.0.1", port))  # never sends a ClientHello
    try:
        time.sleep(1)
        r = subprocess.run([need("echoscu"), "+tla", "+cf", str(cert), "-to", "20", "-aet", "STORESCU",
                            "-aec", "DICOM_NODE", "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        plain = echoscu(port)  # plain TCP on the TLS port: refused, and audited as such
        assert plain.returncode != 0
        wait_for(lambda: any("TLS handshake failed" in (x.reason or "") for x in rows(node)), 20,
                 what="the audited TLS failure")
    finally:
        silent.close()
        server.shutdown()


def test_each_association_gets_its_own_copy_of_the_supported_contexts(make_listener):
    """The shallow copy that replaced pynetdicom's deepcopy: equal contexts, none shared, and an
    association still negotiates (echoscu: Success)."""
    from dicom_node.scp_limits import _copy_contexts

    _, scp = make_listener()
    server = scp._server
    copies = _copy_contexts(server.contexts)
    assert [(c.abstract_syntax, c.transfer_syntax, c.scu_role, c.scp_role) for c in copies] == \
        [(c.abstract_syntax, c.transfer_syntax, c.scu_role, c.scp_role) for c in server.contexts]
    for new, old in zip(copies, server.contexts):
        assert new is not old and new._transfer_syntax is not old._transfer_syntax
    copies[0].transfer_syntax = [ExplicitVRLittleEndian]
    assert len(server.contexts[0].transfer_syntax) > 1
    r = echoscu(scp.port)
    assert r.returncode == 0, r.stderr
