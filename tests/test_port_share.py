"""A port shared by several listener processes (``[node] listeners``) belongs to one node.

SO_REUSEPORT alone would let a second dicom-node (another data directory) join the first one's
port silently and take part of its traffic: ``dicom_node.port_share`` refuses it. The claim
lives in a flock, so a killed holder leaves nothing stale.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dicom_node.port_share import PortShare, node_identity
from dicom_node.stages import EXIT_CONFIG, StageConfigError
from tests.peers import REPO, NodeProcess, free_port, listening, wait_for


def test_the_same_node_shares_and_another_node_is_refused_with_one_line(tmp_path):
    mine = node_identity("sqlite:///a.db", tmp_path / "a")
    first = PortShare(4242, mine, "/data/a", directory=tmp_path)
    second = PortShare(4242, mine, "/data/a", directory=tmp_path)
    first.claim()
    second.claim()  # another listener process of the same node
    other = PortShare(4242, node_identity("sqlite:///b.db", tmp_path / "b"), "/data/b", directory=tmp_path)
    with pytest.raises(StageConfigError) as refused:
        other.claim()
    message = str(refused.value)
    assert "port 4242" in message and "/data/a" in message and "\n" not in message
    PortShare(4243, node_identity("x", tmp_path), "/data/b", directory=tmp_path).claim()  # another port: free
    first.release()
    with pytest.raises(StageConfigError):
        other.claim()  # one listener of the first node still holds it
    second.release()
    other.claim()  # the first node is gone: the port is free for the other
    other.release()


def test_the_identity_never_carries_the_database_password(tmp_path):
    ident = node_identity("postgresql://user:s3cret@db/node", tmp_path)
    assert "s3cret" not in ident and len(ident) == 32
    assert ident != node_identity("postgresql://user:s3cret@db/other", tmp_path)
    assert ident != node_identity("postgresql://user:s3cret@db/node", tmp_path / "elsewhere")


def test_a_killed_holder_leaves_no_stale_claim(tmp_path):
    code = ("import sys, time; from pathlib import Path; from dicom_node.port_share import PortShare;"
            f"PortShare(4244, 'a' * 32, '/data/a', directory=Path({str(tmp_path)!r})).claim();"
            "print('claimed', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "claimed"
        other = PortShare(4244, "b" * 32, "/data/b", directory=tmp_path)
        with pytest.raises(StageConfigError):
            other.claim()
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        other.claim()
        other.release()
    finally:
        holder.kill()
        holder.wait(30)


def _with_listeners(node: NodeProcess, n: int, port: int) -> NodeProcess:
    text = node.config.read_text().replace("[node]\n", f"[node]\nlisteners = {n}\n", 1)
    node.config.write_text(text.replace(f"port = {node.port}\n", f"port = {port}\n", 1))
    node.port = port
    return node


def _listen(node: NodeProcess) -> subprocess.Popen:
    """A standalone ``dicom-node listen`` of ``node`` (scale-out), in its own process group."""
    return subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "listen", "--config", str(node.config)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def _echoes(port: int, n: int) -> int:
    """Associations (of ``n``) that a node on ``port`` accepted."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(Verification)
    ok = 0
    for _ in range(n):
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
        if assoc.is_established:
            ok += 1
            assoc.release()
    return ok


def test_a_listener_of_another_node_is_refused_on_a_shared_port(tmp_path):
    """Two standalone ``listen`` processes of one node share the port (``listeners = 2``); a
    ``listen`` of another node (other data directory) with the same setting is refused with exit
    code 78 and one line naming the first node's data directory, instead of silently taking part
    of its associations; after it, every association still reaches the first node."""
    port = free_port()
    first = _with_listeners(NodeProcess(tmp_path / "first"), 2, port)
    other = _with_listeners(NodeProcess(tmp_path / "other"), 2, port)
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_listen(first))
        wait_for(lambda: listening(port), timeout=120, what="the first listener")
        procs.append(_listen(first))  # a second listener process of the same node: shares the port
        intruder = _listen(other)
        procs.append(intruder)  # stopped with the others, should it (wrongly) keep running
        out, _ = intruder.communicate(timeout=180)
        assert intruder.returncode == EXIT_CONFIG, out[-2000:]
        assert f"port {port} is already shared by the listeners of another dicom-node" in out
        assert str(first.data_dir.resolve()) in out
        assert "Traceback" not in out
        time.sleep(2)
        assert all(p.poll() is None for p in procs[:2]), "a listener of the first node stopped"
        assert _echoes(port, 20) == 20
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)


def test_a_second_serve_on_a_shared_port_is_refused_with_one_line(tmp_path):
    port = free_port()
    first = _with_listeners(NodeProcess(tmp_path / "first"), 2, port)
    second = _with_listeners(NodeProcess(tmp_path / "second"), 2, port)
    try:
        first.start(timeout=120)
        r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(second.config)],
                           cwd=REPO, capture_output=True, text=True, timeout=180)
        out = r.stdout + r.stderr
        assert r.returncode == EXIT_CONFIG, out[-2000:]
        assert f"port {port}" in out and "Traceback" not in out
        assert _echoes(port, 10) == 10
    finally:
        first.kill()
