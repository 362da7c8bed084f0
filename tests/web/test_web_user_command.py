"""``dicom-node user`` add / list / passwd / remove against a real SQLite database."""
from __future__ import annotations

import io
import sys

from dicom_node.cli import main
from dicom_node.config import load_settings
from dicom_node.web.security import verify_password
from storage import users
from storage.db import open_database


def _run(monkeypatch, argv, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main(argv)


def test_user_command_lifecycle(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[node]\ndata_dir = "var"\n')
    c = ["--config", str(cfg)]
    assert _run(monkeypatch, ["user", "list", *c]) == 0
    assert "no users; create one with: dicom-node user add NAME --role admin --password-stdin" in capsys.readouterr().out
    assert _run(monkeypatch, ["user", "add", "alice", "--role", "admin", "--password-stdin", *c], "s3cret-pass\n") == 0
    assert _run(monkeypatch, ["user", "add", "bob", "--role", "radiologist", "--password-stdin", *c], "bob-pass-99\n") == 0
    assert _run(monkeypatch, ["user", "add", "bob", "--role", "admin", "--password-stdin", *c], "another-pass\n") == 2
    assert "already exists" in capsys.readouterr().err
    assert _run(monkeypatch, ["user", "add", "carl", "--role", "admin", "--password-stdin", *c], "short\n") == 2
    assert "at least 8 characters" in capsys.readouterr().err
    assert _run(monkeypatch, ["user", "add", "bad name", "--role", "admin", "--password-stdin", *c], "long-enough\n") == 2
    assert _run(monkeypatch, ["user", "list", *c]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] for line in listing] == [["alice", "admin"], ["bob", "radiologist"]]
    assert _run(monkeypatch, ["user", "passwd", "bob", "--password-stdin", *c], "new-bob-pass\n") == 0
    assert _run(monkeypatch, ["user", "remove", "alice", *c]) == 2  # the last admin stays
    assert "last admin" in capsys.readouterr().err
    assert _run(monkeypatch, ["user", "remove", "bob", *c]) == 0
    assert _run(monkeypatch, ["user", "remove", "nobody", *c]) == 1

    sessions = open_database(load_settings(cfg).database_url)
    with sessions() as s:
        alice = users.get_user(s, "alice")
        assert alice.password_hash.startswith("$argon2id$") and "s3cret-pass" not in alice.password_hash
        assert verify_password("s3cret-pass", alice.password_hash)
        assert users.get_user(s, "bob") is None
