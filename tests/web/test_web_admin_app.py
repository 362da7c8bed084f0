"""The admin half of the application layer (``dicom_node.app``): the API, the admin pages and the
CLI change sources, destinations, users and runtime settings through one layer, validated by
one model per kind of value and audited under one action name, on SQLite and PostgreSQL."""
from __future__ import annotations

import html
import re
import io
import sys

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from dicom_node.config import ConfigError, load_settings
from storage.models import AuditEvent, Destination, Source
from webtools import ADMIN, csrf_of, page_login

#: pynetdicom refuses it (not ASCII); the hand-written rules before accepted it.
BAD_AE = "ÄBC"
BAD_AE_SAYS = "AE title 'ÄBC' must only contain ASCII characters"


@pytest.fixture
def browser(client):
    with TestClient(client.app) as c:
        page_login(c, ADMIN)
        yield c


def cli(tmp_path, node, *argv, stdin=""):
    """``dicom-node ARGV`` in-process on the node's database; (exit status, stdout, stderr)."""
    from dicom_node.cli import main

    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "cli-data"}"\n[database]\nurl = "{node.settings.database_url}"\n')
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin), out, err
    try:
        rc = main([*argv, "--config", str(cfg)])
    finally:
        sys.stdin, sys.stdout, sys.stderr = old
    return rc, out.getvalue(), err.getvalue()


def audit(node, action: str | None = None) -> list[AuditEvent]:
    with node.sessions() as s:
        q = select(AuditEvent).order_by(AuditEvent.id)
        if action:
            q = q.where(AuditEvent.action == action)
        rows = list(s.scalars(q))
        s.expunge_all()
        return rows


def test_api_sets_max_slice_thickness_like_the_cli(node, client, admin_h, tmp_path):
    r = client.patch("/api/settings", headers=admin_h, json={"eligibility.max_slice_thickness_mm": 2.5})
    assert r.status_code == 200, r.text
    assert r.json()["eligibility.max_slice_thickness_mm"] == 2.5 == node.effective("eligibility.max_slice_thickness_mm")
    assert client.patch("/api/settings", headers=admin_h,
                        json={"eligibility.max_slice_thickness_mm": 0}).status_code == 422
    rc, out, _ = cli(tmp_path, node, "setting", "set", "eligibility.max_slice_thickness_mm", "1.25")
    assert rc == 0 and "eligibility.max_slice_thickness_mm = 1.25" in out
    assert node.effective("eligibility.max_slice_thickness_mm") == 1.25
    # The same limit refuses the same value from both.
    rc, _, err = cli(tmp_path, node, "setting", "set", "eligibility.max_slice_thickness_mm", "0")
    assert rc == 2 and "greater than 0" in err
    events = audit(node, "settings.update")
    assert [(e.actor, e.target) for e in events] == [(ADMIN[0], "eligibility.max_slice_thickness_mm"),
                                                     ("cli", "eligibility.max_slice_thickness_mm")]
    assert events[1].detail == {"eligibility.max_slice_thickness_mm": {"before": 2.5, "after": 1.25}}
    assert audit(node, "setting.set") == []


def test_every_runtime_key_is_settable_through_the_model_the_api_and_cli_share():
    from dicom_node.app.settings import RuntimeSettings
    from dicom_node.node import RUNTIME_KEYS

    assert {f.alias for f in RuntimeSettings.model_fields.values()} == set(RUNTIME_KEYS)


def test_cli_and_api_write_the_same_audit_action(node, client, admin_h, tmp_path):
    assert client.post("/api/users", headers=admin_h, json={"username": "carol", "role": "radiologist",
                                                           "password": "carol-pass-1"}).status_code == 201
    assert client.patch("/api/users/carol", headers=admin_h, json={"password": "carol-pass-2"}).status_code == 200
    assert cli(tmp_path, node, "user", "passwd", "carol", "--password-stdin", stdin="carol-pass-3\n")[0] == 0
    token = client.post("/api/token", data={"username": "carol", "password": "carol-pass-3"}).json()["access_token"]
    assert client.post("/api/logout-all", headers={"Authorization": f"Bearer {token}"}).json() == {"revoked": 1}
    assert cli(tmp_path, node, "user", "logout", "carol")[0] == 0
    assert cli(tmp_path, node, "user", "add", "dave", "--role", "sender", "--password-stdin",
               stdin="dave-pass-1\n")[0] == 0
    changes = [(e.actor, e.action, e.target, e.detail) for e in audit(node) if not e.action.startswith("login")]
    assert changes == [
        (ADMIN[0], "user.add", "carol", {"role": "radiologist"}),
        (ADMIN[0], "user.update", "carol", {"password": "changed"}),
        ("cli", "user.update", "carol", {"password": "changed"}),
        ("carol", "logout.all", "carol", {"client": "testclient", "via": "api", "revoked": 1}),
        ("cli", "logout.all", "carol", {"revoked": 0}),
        ("cli", "user.add", "dave", {"role": "sender"}),
    ]
    # Sources and destinations: one action name per change, whoever makes it.
    assert client.post("/api/destinations", headers=admin_h,
                       json={"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}).status_code == 201
    assert cli(tmp_path, node, "destination", "add", "pacs", "PACS@127.0.0.1:105")[0] == 0
    assert cli(tmp_path, node, "source", "add", "CT_A")[0] == 0
    assert client.put("/api/sources/CT_A", headers=admin_h, json={"ae_title": "CT_A", "host": "10.0.0.1"}).status_code == 200
    assert cli(tmp_path, node, "source", "remove", "CT_A")[0] == 0
    tail = [(e.actor, e.action) for e in audit(node)][-5:]
    assert tail == [(ADMIN[0], "destination.add"), ("cli", "destination.update"), ("cli", "source.add"),
                    (ADMIN[0], "source.update"), ("cli", "source.remove")]
    assert audit(node, "user.passwd") == audit(node, "user.logout") == []


def test_an_ae_title_pynetdicom_refuses_is_refused_everywhere_with_one_message(node, client, admin_h, browser,
                                                                                 tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[[sources]]\nae_title = "{BAD_AE}"\n')
    with pytest.raises(ConfigError, match=BAD_AE_SAYS):
        load_settings(cfg)
    cfg.write_text(f'[node]\nae_title = "{BAD_AE}"\n')
    with pytest.raises(ConfigError, match=BAD_AE_SAYS):
        load_settings(cfg)
    for r in (client.post("/api/sources", headers=admin_h, json={"ae_title": BAD_AE}),
              client.patch("/api/settings", headers=admin_h, json={"node.ae_title": BAD_AE}),
              client.post("/api/destinations", headers=admin_h,
                          json={"name": "x", "ae_title": BAD_AE, "host": "h", "port": 104})):
        assert r.status_code == 422 and BAD_AE_SAYS in r.text, r.text
    for argv in (["source", "add", BAD_AE], ["setting", "set", "node.ae_title", BAD_AE],
                 ["destination", "add", "x", f"{BAD_AE}@127.0.0.1:104"]):
        rc, _, err = cli(tmp_path, node, *argv)
        assert rc == 2 and BAD_AE_SAYS in err and len(err.strip().splitlines()) == 1, (argv, err)
    token = csrf_of(browser.get("/admin/sources").text)
    page = browser.post("/admin/sources", data={"ae_title": BAD_AE, "csrf_token": token}).text
    assert BAD_AE_SAYS in html.unescape(page), re.findall(r"flash-.*", page)
    with node.sessions() as s:
        assert s.scalar(select(Source).where(Source.ae_title == BAD_AE)) is None
        assert list(s.scalars(select(Destination))) == []
    assert node.effective("node.ae_title") == "WEBTEST"


def _destination(node, name: str) -> Destination:
    with node.sessions() as s:
        row = s.scalar(select(Destination).where(Destination.name == name))
        s.expunge_all()
        return row


def test_destination_kind_and_url_through_the_cli_the_form_and_the_api(node, client, admin_h, browser, tmp_path):
    url = "http://127.0.0.1:8042/dicom-web"
    rc, out, err = cli(tmp_path, node, "destination", "add", "web", "--kind", "dicomweb", "--url", url)
    assert rc == 0 and f"destination web added: dicomweb -> {url}" in out, err
    row = _destination(node, "web")
    assert (row.kind, row.url, row.ae_title, row.port) == ("dicomweb", url, "", 0)
    assert f"web               dicomweb  {url}" in cli(tmp_path, node, "destination", "list")[1]
    rc, _, err = cli(tmp_path, node, "destination", "add", "web2", "--kind", "dicomweb")
    assert rc == 2 and "kind dicomweb needs a url" in err
    rc, _, err = cli(tmp_path, node, "destination", "add", "web2")
    assert rc == 2 and "kind dicom needs AE@HOST:PORT" in err
    token = csrf_of(browser.get("/admin/destinations").text)
    r = browser.post("/admin/destinations", data={"name": "web2", "kind": "dicomweb", "url": url + "/2",
                                                  "outputs": ["sr", "seg"], "enabled": "1", "csrf_token": token})
    assert "Destination web2 added" in r.text and "DICOMweb" in r.text and url + "/2" in r.text
    assert (_destination(node, "web2").kind, _destination(node, "web2").url) == ("dicomweb", url + "/2")
    r = browser.post("/admin/destinations", data={"name": "web3", "kind": "dicomweb", "url": "ftp://x",
                                                  "csrf_token": token})
    assert "kind dicomweb needs a url" in r.text and _destination(node, "web3") is None
    r = browser.post("/admin/destinations/web2/update", data={"name": "web2", "kind": "dicom", "ae_title": "PACS",
                                                              "host": "127.0.0.1", "port": "104", "outputs": ["sr"],
                                                              "enabled": "1", "csrf_token": token})
    assert "Destination web2 saved" in r.text
    assert (_destination(node, "web2").kind, _destination(node, "web2").port) == ("dicom", 104)
    listed = {d["name"]: d for d in client.get("/api/destinations", headers=admin_h).json()}
    assert listed["web"]["kind"] == "dicomweb" and listed["web"]["url"] == url and listed["web2"]["kind"] == "dicom"
    r = client.post("/api/destinations", headers=admin_h, json={"name": "web4", "kind": "dicomweb"})
    assert r.status_code == 422 and "kind dicomweb needs a url" in r.text


def test_source_quiet_seconds_through_the_api_the_form_and_the_cli(node, client, admin_h, browser, tmp_path):
    r = client.post("/api/sources", headers=admin_h, json={"ae_title": "CT_A", "quiet_seconds": 42})
    assert r.status_code == 201 and r.json()["quiet_seconds"] == 42
    assert client.post("/api/sources", headers=admin_h, json={"ae_title": "CT_X", "quiet_seconds": -1}).status_code == 422
    rc, out, _ = cli(tmp_path, node, "source", "add", "CT_B", "--quiet-seconds", "7")
    assert rc == 0 and "source CT_B added" in out
    assert "quiet=7s" in cli(tmp_path, node, "source", "list")[1]
    token = csrf_of(browser.get("/admin/sources").text)
    r = browser.post("/admin/sources", data={"ae_title": "CT_C", "quiet_seconds": "5.5", "enabled": "1",
                                             "csrf_token": token})
    assert "Source CT_C added" in r.text and "5.5" in r.text
    browser.post("/admin/sources/CT_A/update", data={"ae_title": "CT_A", "quiet_seconds": "", "enabled": "1",
                                                     "csrf_token": token})
    with node.sessions() as s:
        got = {x.ae_title: x.quiet_seconds for x in s.scalars(select(Source))}
    assert got == {"CT_A": None, "CT_B": 7.0, "CT_C": 5.5}
    assert [x["quiet_seconds"] for x in client.get("/api/sources", headers=admin_h).json()] == [None, 7.0, 5.5]


def test_the_node_page_sets_max_slice_thickness(node, browser):
    token = csrf_of(browser.get("/admin/node").text)
    r = browser.post("/admin/node", data={"ae_title": "WEBTEST", "port": "11112", "unknown_callers": "reject",
                                          "quiet_seconds": "10", "min_slices": "16", "max_slice_spacing_mm": "3.0",
                                          "max_slice_thickness_mm": "2.0", "csrf_token": token})
    assert "eligibility.max_slice_thickness_mm = 2.0" in r.text
    assert node.effective("eligibility.max_slice_thickness_mm") == 2.0


def test_a_row_stored_under_the_older_ae_rules_still_lists(node, client, admin_h):
    """Rows written before pynetdicom's rules applied (a non-ASCII AE title) are shown, not a 500."""
    from storage import repo

    with node.sessions.begin() as s:
        repo.ensure_source(s, BAD_AE)
        repo.ensure_destination(s, "old", BAD_AE, "127.0.0.1", 104, ["sr"])
    assert [x["ae_title"] for x in client.get("/api/sources", headers=admin_h).json()] == [BAD_AE]
    assert [x["ae_title"] for x in client.get("/api/destinations", headers=admin_h).json()] == [BAD_AE]
    r = client.put(f"/api/sources/{BAD_AE}", headers=admin_h, json={"ae_title": "NEW_AE"})
    assert r.status_code == 200 and r.json()["ae_title"] == "NEW_AE"  # and it can be corrected
