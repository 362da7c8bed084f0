"""Quiet command line: no migration chatter at INFO; progress bars only on a terminal.

* A command on a fresh data folder migrates the database; Alembic's "Context impl SQLiteImpl",
  "Will assume ... DDL" and "Running upgrade" lines appear only with ``-v``.
* ``predict --json`` and ``send``: stdout is unchanged (one JSON object per line for predict) whether or not stderr is a terminal;
  a progress bar is drawn on stderr only when stderr is a terminal (a pseudo-terminal here).
"""
from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tests.peers import REPO

CHATTER = ("Context impl", "Will assume", "Running upgrade", "setup plugin")


def _cli(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300, **kw)


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n')
    return cfg


def test_migrations_are_quiet_without_verbose(tmp_path):
    r = _cli(["source", "list", "--config", str(_config(tmp_path))], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "var" / "dicom-node.sqlite3").exists()  # it did migrate a fresh database
    for line in CHATTER:
        assert line not in r.stderr, r.stderr


def test_migrations_are_logged_with_verbose(tmp_path):
    r = _cli(["-v", "source", "list", "--config", str(_config(tmp_path))], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Running upgrade" in r.stderr and "Context impl SQLiteImpl" in r.stderr


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> list[Path]:
    import numpy as np
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("volumes")
    paths = []
    for k in range(2):
        a = np.full((40, 48, 48), -800, np.int16)
        a[15:25, 18 + k:28 + k, 20:30] = 40  # a soft-tissue blob in lung-like background
        img = sitk.GetImageFromArray(a)
        img.SetSpacing((1.0, 1.0, 1.0))
        paths.append(folder / f"crop{k}.mha")
        sitk.WriteImage(img, str(paths[-1]))
    return paths


def _json_lines(stdout: str, n: int) -> list[dict]:
    lines = stdout.splitlines()
    assert len(lines) == n, stdout
    return [json.loads(line) for line in lines]  # every line is exactly one JSON object


def test_predict_json_without_terminal_has_no_bar(tmp_path, volumes):
    args = ["predict", *map(str, volumes), str(tmp_path / "missing.mha"), "--json"]
    r = _cli(args, tmp_path)
    assert r.returncode == 1  # the missing input
    out = _json_lines(r.stdout, 3)
    assert [o["input"] for o in out] == [*map(str, volumes), str(tmp_path / "missing.mha")]
    assert "findings" in out[0] and "error" in out[2]
    assert "\r" not in r.stderr and "predict:" not in r.stderr and "input/s" not in r.stderr, r.stderr


def _run_on_terminal(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """Run the CLI with stderr on a 100-column pseudo-terminal and stdout on a pipe;
    returns (exit status, stdout, what reached the terminal)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", *args],
                            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, cwd=cwd, env=env)
    os.close(slave)
    terminal = b""
    while True:  # drain the terminal while the command runs (a full pty buffer would block it)
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side
                break
            if not chunk:
                break
            terminal += chunk
        elif proc.poll() is not None:
            break
    stdout = proc.stdout.read().decode()
    rc = proc.wait(120)
    os.close(master)
    return rc, stdout, terminal.decode(errors="replace")


def test_predict_json_on_a_terminal_draws_a_bar_on_stderr_only(tmp_path, volumes):
    """stderr is a pseudo-terminal, stdout a pipe: the bar goes to the terminal, stdout stays JSON."""
    rc, stdout, text = _run_on_terminal(["predict", *map(str, volumes), "--json"], tmp_path)
    assert rc == 0, text
    out = _json_lines(stdout, 2)
    assert all("findings" in o for o in out)
    assert "predict: 100%|" in text and "2/2" in text, text  # tqdm's bar reached the terminal


SAMPLE = REPO.parent / "shared" / "data" / "dicom-samples" / "dcmqi" / "ct-3slice"


def test_send_draws_a_bar_only_on_a_terminal(tmp_path):
    from tests.peers import StoreSCP

    if not SAMPLE.is_dir():
        pytest.skip(f"{SAMPLE} not found (shared data absent)")
    peer = StoreSCP(tmp_path / "pacs").start()
    try:
        cfg = _config(tmp_path)
        args = ["send", str(SAMPLE), f"STORESCP@127.0.0.1:{peer.port}", "--config", str(cfg)]
        plain = _cli(args, tmp_path)
        assert plain.returncode == 0 and plain.stdout.startswith("3/3 stored"), plain.stderr
        assert "send:" not in plain.stderr and "\r" not in plain.stderr, plain.stderr
        rc, stdout, text = _run_on_terminal(args, tmp_path)
        assert rc == 0 and stdout.startswith("3/3 stored"), text
        assert "send: 100%|" in text and "3/3" in text, text
    finally:
        peer.stop()


LUNA = REPO.parent / "shared" / "data" / "luna16-nodules"


@pytest.mark.slow
def test_train_draws_a_bar_only_on_a_terminal(tmp_path):
    if not LUNA.is_dir():
        pytest.skip(f"{LUNA} not found (shared data absent)")
    args = ["train", "--steps", "2", "--limit-cubes", "8", "--no-readout", "--phantoms", "1", "--no-lidc-background",
            "--batch-size", "2", "--threads", "1"]
    plain = _cli([*args, "--out", str(tmp_path / "plain")], tmp_path)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.stdout.strip() == str(tmp_path / "plain" / "resmtnet.pt")
    assert "train: 100%" not in plain.stderr and "%|" not in plain.stderr and "\r" not in plain.stderr, plain.stderr[-2000:]
    rc, stdout, text = _run_on_terminal([*args, "--out", str(tmp_path / "tty")], tmp_path)
    assert rc == 0 and stdout.strip() == str(tmp_path / "tty" / "resmtnet.pt"), text[-2000:]
    assert "train: 100%|" in text and "2/2" in text, text[-2000:]
