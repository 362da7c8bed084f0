"""Routing rules through the HTTP interface: the API (admin only, validated, audited, reorder,
dry run) and the admin Rules page (add, edit, move, remove, dry run), on SQLite and PostgreSQL."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from storage import repo
from storage.models import AuditEvent, Source
from webtools import ADMIN, csrf_of, page_login

CHEST = {"name": "chest-ct", "match": {"Modality": "CT", "BodyPartExamined": "/CHEST|LUNG/", "calling_ae": "CT_*"},
         "actions": ["analyse"], "destinations": ["sender"]}


@pytest.fixture
def with_destinations(node):
    with node.sessions.begin() as s:
        repo.ensure_destination(s, "pacs_a", "PACS_A", "127.0.0.1", 10401, ["sr", "seg"])
        repo.ensure_destination(s, "pacs_b", "PACS_B", "127.0.0.1", 10402, ["sr"])
    return node


def test_rules_api_crud_reorder_and_audit(client, admin_h, rad_h, with_destinations):
    assert client.get("/api/rules", headers=rad_h).status_code == 403
    assert client.post("/api/rules", json=CHEST, headers=rad_h).status_code == 403
    r = client.post("/api/rules", json=CHEST, headers=admin_h)
    assert r.status_code == 201, r.text
    assert r.json()["position"] == 1 and r.json()["level"] == "series"
    fwd = {"name": "archive", "match": {"Modality": ["CT", "MR"], "image_count": {"min": 2}},
           "actions": ["forward"], "destinations": ["pacs_b"], "priority": "urgent", "position": 1}
    assert client.post("/api/rules", json=fwd, headers=admin_h).status_code == 201
    assert [x["name"] for x in client.get("/api/rules", headers=admin_h).json()] == ["archive", "chest-ct"]
    assert client.post("/api/rules", json=CHEST, headers=admin_h).status_code == 409
    bad = client.post("/api/rules", json={**CHEST, "name": "x", "match": {"Modality": "/[oops/"}}, headers=admin_h)
    assert bad.status_code == 422 and "regular expression" in bad.text
    bad = client.post("/api/rules", json={**CHEST, "name": "y", "destinations": ["nowhere"]}, headers=admin_h)
    assert bad.status_code == 422 and "unknown destination" in bad.json()["detail"]
    r = client.post("/api/rules/reorder", json={"names": ["chest-ct", "archive"]}, headers=admin_h)
    assert [x["name"] for x in r.json()] == ["chest-ct", "archive"]
    r = client.put("/api/rules/archive", json={**fwd, "enabled": False, "position": None}, headers=admin_h)
    assert r.status_code == 200 and r.json()["enabled"] is False and r.json()["position"] == 2
    assert client.get("/api/rules/nothing", headers=admin_h).status_code == 404
    assert client.delete("/api/rules/archive", headers=admin_h).status_code == 204
    assert [x["name"] for x in client.get("/api/rules", headers=admin_h).json()] == ["chest-ct"]
    with with_destinations.sessions() as s:
        actions = [a.action for a in s.scalars(select(AuditEvent).where(AuditEvent.action.like("rule.%"))
                                               .order_by(AuditEvent.id))]
    assert actions == ["rule.add", "rule.add", "rule.reorder", "rule.update", "rule.remove"]


def test_dry_run_api_explains_match_and_non_match(client, admin_h, with_destinations):
    client.post("/api/rules", json=CHEST, headers=admin_h)
    with with_destinations.sessions.begin() as s:
        s.add(Source(ae_title="CT_A", enabled=True, return_to=["pacs_a"]))
    r = client.post("/api/rules/dry-run", headers=admin_h,
                    json={"attributes": {"Modality": "CT", "BodyPartExamined": "CHEST", "calling_ae": "CT_A"}})
    [d] = r.json()["series"]
    assert d["matched"] == ["chest-ct"] and d["destinations"] == {"pacs_a": ["sr", "seg"]}
    r = client.post("/api/rules/dry-run", headers=admin_h, json={"attributes": {"Modality": "MR", "calling_ae": "X"}})
    [d] = r.json()["series"]
    assert d["matched"] == [] and d["summary"].startswith("kept, not analysed: no routing rule matched")
    assert d["rules"][0]["failed"] == ["Modality 'MR' does not match 'CT'",
                                       "BodyPartExamined is absent, wanted '/CHEST|LUNG/'",
                                       "calling_ae 'X' does not match 'CT_*'"]
    # Unsaved rules can be tried before saving them.
    r = client.post("/api/rules/dry-run", headers=admin_h, json={
        "attributes": {"Modality": "MR"}, "rules": [{"name": "t", "match": {"Modality": "MR"}, "actions": ["discard"]}]})
    assert r.json()["series"][0]["actions"] == ["discard"]
    assert client.post("/api/rules/dry-run", headers=admin_h,
                       json={"study_instance_uid": "1.2.3.4"}).status_code == 404


def test_source_return_to_is_validated(client, admin_h, with_destinations):
    r = client.post("/api/sources", json={"ae_title": "CT_B", "return_to": ["pacs_x"]}, headers=admin_h)
    assert r.status_code == 422 and "pacs_x" in r.json()["detail"]
    r = client.post("/api/sources", json={"ae_title": "CT_B", "return_to": ["pacs_b"]}, headers=admin_h)
    assert r.status_code == 201 and r.json()["return_to"] == ["pacs_b"]


@pytest.fixture
def browser(client):
    with TestClient(client.app) as c:
        yield c


def test_rules_page_add_edit_move_remove_and_dry_run(browser, with_destinations):
    page_login(browser, ADMIN)
    page = browser.get("/admin/rules")
    assert page.status_code == 200 and "No rule: eligible series are analysed" in page.text
    token = csrf_of(page.text)
    r = browser.post("/admin/rules", data={"rule": json.dumps(CHEST), "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/admin/rules"
    page = browser.get("/admin/rules")
    assert "Rule chest-ct added at position 1" in page.text and "BodyPartExamined" in page.text
    r = browser.post("/admin/rules", data={"rule": '{"name": "bad", "actions": ["analyse"], "match": {"Modalty": "CT"}}',
                                           "csrf_token": token})
    assert "neither a DICOM keyword" in r.text
    r = browser.post("/admin/rules", data={"rule": "{not json", "csrf_token": token})
    assert "not valid JSON" in r.text
    browser.post("/admin/rules", data={"rule": json.dumps({"name": "drop-mr", "match": {"Modality": "MR"},
                                                           "actions": ["discard"]}), "csrf_token": token})
    browser.post("/admin/rules/drop-mr/move", data={"position": "1", "csrf_token": token})
    page = browser.get("/admin/rules")
    assert page.text.index("drop-mr") < page.text.index("chest-ct")
    edited = {**CHEST, "destinations": ["pacs_b"]}
    r = browser.post("/admin/rules/chest-ct/update", data={"rule": json.dumps(edited), "csrf_token": token})
    assert "Rule chest-ct saved" in r.text
    r = browser.post("/admin/rules/dry-run", data={"attributes": json.dumps({"Modality": "CT", "BodyPartExamined": "LUNG",
                                                                             "calling_ae": "CT_9"}),
                                                   "csrf_token": token})
    assert r.status_code == 200 and "Dry run result" in r.text
    assert "analyse (ct-nodules), results to pacs_b (sr) [rule chest-ct]" in r.text
    assert "Modality &#39;CT&#39; does not match &#39;MR&#39;" in r.text
    r = browser.post("/admin/rules/dry-run", data={"attributes": "[1]", "csrf_token": token})
    assert r.status_code == 422 and "must be a JSON object" in r.text
    r = browser.post("/admin/rules/drop-mr/remove", data={"csrf_token": token})
    assert "Rule drop-mr removed" in r.text
    # Without the CSRF token nothing changes.
    r = browser.post("/admin/rules/chest-ct/remove", data={}, follow_redirects=False)
    assert r.status_code in (403, 422)
    assert "chest-ct" in browser.get("/admin/rules").text
    with with_destinations.sessions() as s:
        assert s.scalar(select(AuditEvent.actor).where(AuditEvent.action == "rule.update")) == ADMIN[0]
