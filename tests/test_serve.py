"""``dicom-node serve``: stages start, answer, and stop cleanly on SIGTERM; the CLI round trip."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.peers import REPO, NodeProcess, StoreSCP, need


def test_serve_answers_echo_and_stops_cleanly_on_sigterm(tmp_path):
    node = NodeProcess(tmp_path / "node").start(timeout=120)
    try:
        r = node.cli("echo", f"DICOM_NODE@127.0.0.1:{node.port}", "--calling-ae", "STORESCU", check=False)
        assert r.returncode == 0, r.stderr
        t0 = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(60) == 0
        assert time.monotonic() - t0 < 60
        assert "stopped" in node.log_text()
    finally:
        node.kill()


def test_cli_echo_send_and_admin_round_trip(tmp_path):
    peer = StoreSCP(tmp_path / "pacs").start()
    node = NodeProcess(tmp_path / "node")
    try:
        r = node.cli("echo", f"STORESCP@127.0.0.1:{peer.port}")
        assert "succeeded" in r.stdout
        bad = node.cli("echo", "STORESCP@127.0.0.1:1", check=False)
        assert bad.returncode == 1 and "could not connect" in bad.stderr
        sample = REPO.parent / "shared" / "data" / "dicom-samples" / "dcmqi" / "ct-3slice"
        if sample.is_dir():
            r = node.cli("send", str(sample), f"STORESCP@127.0.0.1:{peer.port}")
            assert r.stdout.startswith("3/3 stored")
            assert len(peer.files()) == 3
        node.cli("destination", "add", "pacs", f"STORESCP@127.0.0.1:{peer.port}", "--outputs", "sr,seg,sc")
        assert "succeeded" in node.cli("destination", "echo", "pacs").stdout
        assert "pacs" in node.cli("destination", "list").stdout
        node.cli("source", "add", "CT_SCANNER_1", "--host", "10.1.2.3")
        assert "CT_SCANNER_1" in node.cli("source", "list").stdout
        bad_ae = node.cli("source", "add", "A\\B", check=False)
        assert bad_ae.returncode == 2 and "backslash" in bad_ae.stderr
        node.cli("setting", "set", "completion.quiet_seconds", "30")
        assert "completion.quiet_seconds = 30.0" in node.cli("setting", "list").stdout
        refused = node.cli("setting", "set", "node.port", "70000", check=False)
        assert refused.returncode == 2
    finally:
        peer.stop()


def test_corrupt_config_is_refused_with_a_clear_message(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("[node]\nport = 'eleven'\n")
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "jobs", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "node.port" in r.stderr and "eleven" in r.stderr
    cfg.write_text("[node\nport = 1\n")
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "jobs", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "not valid TOML" in r.stderr
    need("storescu")
