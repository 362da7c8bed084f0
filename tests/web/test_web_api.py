"""JSON API on SQLite and PostgreSQL: authentication, roles on every route, the worklist,
studies with findings, sources, destinations with a real C-ECHO, queues, users, settings,
audit and metrics."""
from __future__ import annotations

import re
import time

import pytest
from sqlalchemy import select

from web_phantom import NODULE_DIAMETER_MM, NODULE_MM, add_done_job, add_study_row, nodule_mask, store_phantom
from storage import repo
from storage.models import (
    AssociationLog,
    AssociationResult,
    AuditEvent,
    Destination,
    Job,
    JobState,
    StudyStatus,
    Transfer,
    TransferState,
)
from webtools import ADMIN, RAD, StoreSCP, free_port

ANY = "any"  # radiologist and admin
ADM = "admin"

#: Every API route and who may use it. A route missing here fails test_every_api_route_is_classified.
ROLES = {
    ("GET", "/api/me"): ANY,
    ("POST", "/api/logout"): ANY,
    ("POST", "/api/logout-all"): ANY,
    ("GET", "/api/studies"): ANY,
    ("GET", "/api/studies/{study_uid}"): ANY,
    ("POST", "/api/studies/{study_uid}/complete"): ADM,
    ("POST", "/api/studies/{study_uid}/series/{series_uid}/complete"): ADM,
    ("GET", "/api/findings/{finding_id}/image"): ANY,
    ("GET", "/api/results/{result_id}/file"): ANY,
    ("POST", "/api/studies/{study_uid}/findings/{number}/review"): ANY,
    ("GET", "/api/findings/export"): ANY,
    ("POST", "/api/jobs/{job_id}/rerun"): ANY,
    ("POST", "/api/jobs/{job_id}/resend"): ANY,
    ("POST", "/api/jobs/{job_id}/cancel"): ADM,
    ("GET", "/api/jobs"): ADM,
    ("GET", "/api/sources"): ADM,
    ("POST", "/api/sources"): ADM,
    ("PUT", "/api/sources/{ae_title}"): ADM,
    ("DELETE", "/api/sources/{ae_title}"): ADM,
    ("GET", "/api/destinations"): ADM,
    ("POST", "/api/destinations"): ADM,
    ("PUT", "/api/destinations/{name}"): ADM,
    ("DELETE", "/api/destinations/{name}"): ADM,
    ("POST", "/api/destinations/{name}/echo"): ADM,
    ("GET", "/api/transfers"): ADM,
    ("POST", "/api/transfers/{transfer_id}/retry"): ADM,
    ("POST", "/api/transfers/{transfer_id}/cancel"): ADM,
    ("GET", "/api/associations"): ADM,
    ("GET", "/api/audit"): ADM,
    ("GET", "/api/users"): ADM,
    ("POST", "/api/users"): ADM,
    ("PATCH", "/api/users/{username}"): ADM,
    ("DELETE", "/api/users/{username}"): ADM,
    ("GET", "/api/settings"): ADM,
    ("PATCH", "/api/settings"): ADM,
    ("GET", "/api/storage"): ADM,
    ("GET", "/api/rules"): ADM,
    ("POST", "/api/rules"): ADM,
    ("POST", "/api/rules/reorder"): ADM,
    ("POST", "/api/rules/dry-run"): ADM,
    ("GET", "/api/rules/{name}"): ADM,
    ("PUT", "/api/rules/{name}"): ADM,
    ("DELETE", "/api/rules/{name}"): ADM,
}
PUBLIC = {("POST", "/api/token")}
#: Routes that end the caller's own token: called with a fresh one, not the session's.
ENDS_SESSION = {("POST", "/api/logout"), ("POST", "/api/logout-all")}


def api_routes(app):
    """Every (method, path) under /api, from the OpenAPI schema (all API routes are in it)."""
    for path, ops in app.openapi()["paths"].items():
        if path.startswith("/api"):
            for method in ops:
                yield method.upper(), path


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "999999", path)


def test_every_api_route_is_classified(client):
    found = set(api_routes(client.app))
    assert found - PUBLIC == set(ROLES), f"unclassified: {found - PUBLIC - set(ROLES)}; stale: {set(ROLES) - found}"


def test_roles_enforced_on_every_route(node, client, admin_h, rad_h):
    client.cookies.clear()
    bad = {"Authorization": "Bearer not-a-token"}
    session_rad_h, session_admin_h = rad_h, admin_h
    for (method, path), role in ROLES.items():
        url = concrete(path)
        if (method, path) in ENDS_SESSION:
            rad_h, admin_h = (_fresh(client, RAD), _fresh(client, ADMIN))
        else:
            rad_h, admin_h = session_rad_h, session_admin_h
        r = client.request(method, url)
        assert r.status_code == 401, f"{method} {path} without credentials: {r.status_code}"
        assert r.headers.get("www-authenticate") == "Bearer"
        r = client.request(method, url, headers=bad)
        assert r.status_code == 401, f"{method} {path} with a forged token: {r.status_code}"
        r = client.request(method, url, headers=rad_h, json={})
        if role == ADM:
            assert r.status_code == 403, f"{method} {path} as radiologist: {r.status_code}"
        else:
            assert r.status_code not in (401, 403), f"{method} {path} as radiologist: {r.status_code}"
        r = client.request(method, url, headers=admin_h, json={})
        assert r.status_code not in (401, 403), f"{method} {path} as admin: {r.status_code}"
        if (method, path) in ENDS_SESSION:  # logout-all ended the session-wide tokens too: new ones
            session_rad_h.update(_fresh(client, RAD))
            session_admin_h.update(_fresh(client, ADMIN))


def _fresh(client, user) -> dict:
    r = client.post("/api/token", data={"username": user[0], "password": user[1]})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def test_token_refused_for_wrong_password_and_unknown_user(client):
    assert client.post("/api/token", data={"username": ADMIN[0], "password": "wrong-password"}).status_code == 401
    assert client.post("/api/token", data={"username": "nobody", "password": "whatever-123"}).status_code == 401
    r = client.post("/api/token", data={"username": RAD[0], "password": RAD[1]})
    assert r.status_code == 200 and r.json()["role"] == "radiologist" and r.json()["token_type"] == "bearer"


def test_password_guessing_is_throttled(client):
    for _ in range(5):
        assert client.post("/api/token", data={"username": "mallory", "password": "guess-1234"}).status_code == 401
    r = client.post("/api/token", data={"username": "mallory", "password": "guess-1234"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    # Other names are not affected.
    assert client.post("/api/token", data={"username": RAD[0], "password": RAD[1]}).status_code == 200


def test_worklist_order_filters_and_pagination(node, client, rad_h):
    with node.sessions.begin() as s:
        add_study_row(s, "1.2.3.1", malignancy=0.35, diameter=6.0, count=1, study_date="20260110", accession="A1")
        add_study_row(s, "1.2.3.2", malignancy=0.91, diameter=22.0, count=2, study_date="20260105", accession="A2",
                      patient=("SMITH^ANN", "P2"))
        add_study_row(s, "1.2.3.3", status=StudyStatus.DONE, count=0, study_date="20260120", accession="A3")
        add_study_row(s, "1.2.3.4", status=StudyStatus.NOT_ELIGIBLE, reason="slice spacing 5.0 mm > 3.0 mm",
                      study_date="20251230", modalities="CR", accession="A4")
        add_study_row(s, "1.2.3.5", status=StudyStatus.FAILED, reason="series has a gap at z=-40 mm", accession="A5")
        add_study_row(s, "1.2.3.6", malignancy=0.91, diameter=9.0, count=1, accession="A6", modalities="CT\\SR")
    r = client.get("/api/studies", headers=rad_h)
    assert r.status_code == 200
    body = r.json()
    uids = [i["study_instance_uid"] for i in body["items"]]
    assert body["total"] == 6
    # Most suspicious first: malignancy, then diameter breaks the tie; no findings last.
    assert uids[:3] == ["1.2.3.2", "1.2.3.6", "1.2.3.1"]
    top = body["items"][0]
    assert top["status"] == "done" and top["findings_count"] == 2
    assert top["max_malignancy"] == pytest.approx(0.91) and top["max_diameter_mm"] == pytest.approx(22.0)
    assert top["patient_name"] == "SMITH, ANN" and top["study_date"] == "2026-01-05"

    def uids_for(**params):
        r = client.get("/api/studies", headers=rad_h, params=params)
        assert r.status_code == 200, r.text
        return sorted(i["study_instance_uid"] for i in r.json()["items"])

    assert uids_for(status="not_eligible") == ["1.2.3.4"]
    ne = client.get("/api/studies", headers=rad_h, params={"status": "failed"}).json()["items"][0]
    assert ne["status_reason"] == "series has a gap at z=-40 mm"
    assert uids_for(date_from="2026-01-06", date_to="2026-01-20") == ["1.2.3.1", "1.2.3.3"]
    assert uids_for(modality="CR") == ["1.2.3.4"]
    assert uids_for(modality="sr") == ["1.2.3.6"]
    assert uids_for(q="smith") == ["1.2.3.2"]
    assert uids_for(q="A5") == ["1.2.3.5"]
    page2 = client.get("/api/studies", headers=rad_h, params={"page": 2, "page_size": 4}).json()
    assert page2["total"] == 6 and len(page2["items"]) == 2
    assert client.get("/api/studies", headers=rad_h, params={"status": "bogus"}).status_code == 422


def test_processed_study_listed_done_with_findings_and_images(node, client, rad_h):
    ph = store_phantom(node)
    mask = nodule_mask(ph.hu, (-142.5, -142.5, -100.0), (2.5, 3.0, 3.0), NODULE_MM, NODULE_DIAMETER_MM)
    job_id = add_done_job(node, ph.series_uid, [
        {"center_mm": NODULE_MM, "diameter_mm": NODULE_DIAMETER_MM, "volume_mm3": 1436.0, "malignancy": 0.82,
         "location": "right lung"},
        {"center_mm": (55.0, 0.0, -70.0), "diameter_mm": 5.0, "volume_mm3": 65.0, "malignancy": 0.12},
    ], seg_from=ph, seg_mask=mask)
    items = client.get("/api/studies", headers=rad_h).json()["items"]
    assert items[0]["study_instance_uid"] == ph.study_uid
    assert items[0]["status"] == "done" and items[0]["findings_count"] == 2

    detail = client.get(f"/api/studies/{ph.study_uid}", headers=rad_h).json()
    assert [f["number"] for f in detail["findings"]] == [1, 2]  # most malignant first
    assert detail["findings"][0]["location"] == "right lung"
    assert {r["kind"] for r in detail["results"]} == {"sr", "seg"}
    assert detail["jobs"][0]["id"] == job_id and detail["jobs"][0]["state"] == "done"
    assert detail["series"][0]["instance_count"] == 30

    seg = next(r for r in detail["results"] if r["kind"] == "seg")
    r = client.get(seg["download_url"], headers=rad_h)
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    assert r.content[128:132] == b"DICM"

    first = detail["findings"][0]
    r = client.get(first["image_url"], headers=rad_h)
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert r.headers["x-outline"] == "seg"
    assert int(r.headers["x-slice-index"]) == 15  # z = -62.5 mm -> slice 15
    for plane in ("coronal", "sagittal"):
        r = client.get(f"/api/findings/{first['id']}/image", params={"plane": plane}, headers=rad_h)
        assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
    r = client.get(f"/api/findings/{first['id']}/image", params={"offset": 3}, headers=rad_h)
    assert int(r.headers["x-slice-index"]) == 18
    r = client.get(f"/api/findings/{first['id']}/image", params={"offset": 400}, headers=rad_h)
    assert int(r.headers["x-slice-index"]) == 29  # clamped to the last slice
    # The second nodule is in no SEG segment: outlined with a circle of its diameter.
    second = detail["findings"][1]
    assert client.get(second["image_url"], headers=rad_h).headers["x-outline"] == "circle"
    assert client.get("/api/findings/12345678/image", headers=rad_h).status_code == 404
    assert client.get("/api/findings/1/image", params={"plane": "oblique"}, headers=rad_h).status_code in (404, 422)


def test_outlined_pixels_are_drawn_on_the_nodule(node, client, rad_h):
    """The yellow outline is where the nodule is: around the image position of its centre."""
    import io

    import numpy as np
    from PIL import Image

    ph = store_phantom(node)
    add_done_job(node, ph.series_uid, [{"center_mm": NODULE_MM, "diameter_mm": NODULE_DIAMETER_MM, "malignancy": 0.7}])
    fid = client.get(f"/api/studies/{ph.study_uid}", headers=rad_h).json()["findings"][0]["id"]
    png = client.get(f"/api/findings/{fid}/image", headers=rad_h).content
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    yellow = (rgb[..., 0] > 200) & (rgb[..., 1] > 150) & (rgb[..., 2] < 80)
    ys, xs = np.nonzero(yellow)
    assert len(xs) > 20
    scale = 512 / (96 * 3.0)  # display px per mm
    cx = (NODULE_MM[0] - (-142.5) + 1.5) * scale
    cy = (NODULE_MM[1] - (-142.5) + 1.5) * scale
    assert abs(xs.mean() - cx) < 6 and abs(ys.mean() - cy) < 6
    # Zoomed 4x: a 512 px square centred on the nodule, the outline 4 times as far from it.
    r = client.get(f"/api/findings/{fid}/image", params={"zoom": 4}, headers=rad_h)
    assert r.headers["x-zoom"] == "4"
    rgb = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
    assert rgb.shape == (512, 512, 3)
    yellow = (rgb[..., 0] > 200) & (rgb[..., 1] > 150) & (rgb[..., 2] < 80)
    ys4, xs4 = np.nonzero(yellow)
    assert abs(xs4.mean() - 256) < 8 and abs(ys4.mean() - 256) < 8
    assert np.ptp(xs4) == pytest.approx(4 * np.ptp(xs), rel=0.25)
    assert client.get(f"/api/findings/{fid}/image", params={"zoom": 3}, headers=rad_h).status_code == 422


def test_source_added_through_api_is_allowed_at_once(node, client, admin_h):
    with node.sessions() as s:
        assert repo.source_allows(s, "MODALITY7", "10.1.2.3") is not None
    r = client.post("/api/sources", headers=admin_h, json={"ae_title": "MODALITY7", "host": "10.1.2.3",
                                                          "description": "CT scanner 7"})
    assert r.status_code == 201, r.text
    with node.sessions() as s:
        assert repo.source_allows(s, "MODALITY7", "10.1.2.3") is None
        assert "10.1.2.3" in repo.source_allows(s, "MODALITY7", "10.9.9.9")
    assert client.post("/api/sources", headers=admin_h, json={"ae_title": "MODALITY7"}).status_code == 409
    r = client.post("/api/sources", headers=admin_h, json={"ae_title": "BAD\\AE"})
    assert r.status_code == 422 and "backslash" in r.text
    assert client.post("/api/sources", headers=admin_h, json={"ae_title": "X" * 17}).status_code == 422
    r = client.put("/api/sources/MODALITY7", headers=admin_h, json={"ae_title": "MODALITY7", "enabled": False})
    assert r.status_code == 200 and r.json()["host"] is None
    with node.sessions() as s:
        assert "disabled" in repo.source_allows(s, "MODALITY7", None)
    assert client.delete("/api/sources/MODALITY7", headers=admin_h).status_code == 204
    assert client.get("/api/sources", headers=admin_h).json() == []
    with node.sessions() as s:
        actions = [a for (a,) in s.execute(select(AuditEvent.action).order_by(AuditEvent.id))]
        actors = {a for (a,) in s.execute(select(AuditEvent.actor))}
    assert actions == ["source.add", "source.update", "source.remove"] and actors == {ADMIN[0]}


def test_destination_echo_against_real_storescp(node, client, admin_h, tmp_path):
    scp = StoreSCP(tmp_path / "scp", ae_title="ECHOSCP").start()
    try:
        r = client.post("/api/destinations", headers=admin_h, json={
            "name": "pacs", "ae_title": "ECHOSCP", "host": "127.0.0.1", "port": scp.port, "outputs": ["sr", "seg"]})
        assert r.status_code == 201, r.text
        r = client.post("/api/destinations/pacs/echo", headers=admin_h)
        assert r.status_code == 200
        assert r.json()["ok"] is True, r.json()
    finally:
        scp.stop()
    # The same peer, now stopped: the echo fails and says why.
    r = client.post("/api/destinations/pacs/echo", headers=admin_h).json()
    assert r["ok"] is False and "could not connect" in r["message"]
    closed = free_port()
    client.put("/api/destinations/pacs", headers=admin_h, json={
        "name": "pacs", "ae_title": "ECHOSCP", "host": "127.0.0.1", "port": closed, "outputs": ["sr"]})
    assert client.get("/api/destinations", headers=admin_h).json()[0]["outputs"] == ["sr"]
    assert client.post("/api/destinations/nope/echo", headers=admin_h).status_code == 404
    r = client.post("/api/destinations", headers=admin_h, json={
        "name": "x", "ae_title": "A", "host": "h", "port": 104, "outputs": ["pdf"]})
    assert r.status_code == 422 and "pdf" in r.text


def _job_with_results(node):
    ph = store_phantom(node)
    job_id = add_done_job(node, ph.series_uid, [{"center_mm": NODULE_MM, "diameter_mm": 14.0, "malignancy": 0.8}],
                          key="content-hash:model-v1")
    return ph, job_id


def test_jobs_rerun_and_resend(node, client, admin_h, rad_h):
    ph, job_id = _job_with_results(node)
    with node.sessions.begin() as s:
        repo.ensure_destination(s, "pacs", "PACS", "127.0.0.1", 104, ["sr", "seg"])
        repo.ensure_destination(s, "viewer", "VIEW", "127.0.0.1", 105, ["seg"])
    r1 = client.post(f"/api/jobs/{job_id}/rerun", headers=rad_h)
    assert r1.status_code == 201, r1.text
    r2 = client.post(f"/api/jobs/{r1.json()['id']}/rerun", headers=admin_h)
    assert r1.json()["idempotency_key"] == "content-hash:model-v1:rerun:1"
    assert r2.json()["idempotency_key"] == "content-hash:model-v1:rerun:2"
    assert r2.json()["state"] == "pending"
    study = client.get(f"/api/studies/{ph.study_uid}", headers=rad_h).json()
    assert study["status"] == "waiting"

    r = client.post(f"/api/jobs/{job_id}/resend", headers=rad_h)
    assert r.status_code == 201, r.text
    # "pacs" takes SR and SEG, "viewer" only SEG: the job has an SR only, so one transfer.
    assert [t["destination"] for t in r.json()] == ["pacs"]
    with node.sessions() as s:
        t = s.scalar(select(Transfer))
        assert t.state is TransferState.PENDING and t.job_id == job_id and len(t.result_object_ids) == 1
    r = client.post(f"/api/jobs/{job_id}/resend", headers=admin_h, json={"destinations": ["viewer"]})
    assert r.status_code == 409
    assert client.post(f"/api/jobs/{r2.json()['id']}/resend", headers=admin_h).status_code == 409  # no results yet
    jobs = client.get("/api/jobs", headers=admin_h, params={"state": "pending"}).json()
    assert jobs["total"] == 2 and jobs["items"][0]["study_instance_uid"] == ph.study_uid


def test_transfers_retry_and_cancel(node, client, admin_h):
    _, job_id = _job_with_results(node)
    with node.sessions.begin() as s:
        d = repo.ensure_destination(s, "pacs", "PACS", "127.0.0.1", 104, ["sr"])
        s.flush()
        failed = Transfer(job_id=job_id, destination_id=d.id, state=TransferState.FAILED, attempts=12,
                          error="association rejected by PACS@127.0.0.1:104", result_object_ids=[1])
        sent = Transfer(job_id=job_id, destination_id=d.id, state=TransferState.SENT, attempts=1, result_object_ids=[1])
        s.add_all([failed, sent])
        s.flush()
        failed_id, sent_id = failed.id, sent.id
    listed = client.get("/api/transfers", headers=admin_h, params={"state": "failed"}).json()
    assert [t["id"] for t in listed["items"]] == [failed_id] and "rejected" in listed["items"][0]["error"]
    r = client.post(f"/api/transfers/{failed_id}/retry", headers=admin_h)
    assert r.status_code == 200 and r.json()["state"] == "pending" and r.json()["attempts"] == 0
    assert r.json()["error"] is None
    r = client.post(f"/api/transfers/{failed_id}/cancel", headers=admin_h)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert client.post(f"/api/transfers/{sent_id}/cancel", headers=admin_h).status_code == 409
    assert client.post(f"/api/transfers/{sent_id}/retry", headers=admin_h).status_code == 409
    assert client.post("/api/transfers/987654/retry", headers=admin_h).status_code == 404


def test_associations_log(node, client, admin_h):
    with node.sessions.begin() as s:
        repo.log_association(s, calling_ae="STORESCU", called_ae="WEBTEST", peer_host="127.0.0.1", peer_port=40000,
                             result=AssociationResult.ACCEPTED, instances=133, duration_s=4.2)
        repo.log_association(s, calling_ae="INTRUDER", called_ae="WEBTEST", peer_host="10.0.0.66",
                             result=AssociationResult.REJECTED,
                             reason="calling AE title 'INTRUDER' is not a configured source")
    body = client.get("/api/associations", headers=admin_h).json()
    assert body["total"] == 2 and body["items"][0]["calling_ae"] == "INTRUDER"
    rejected = client.get("/api/associations", headers=admin_h, params={"result": "rejected"}).json()["items"]
    assert len(rejected) == 1 and "not a configured source" in rejected[0]["reason"]


def test_runtime_settings_persist_and_are_audited(node, client, admin_h):
    r = client.get("/api/settings", headers=admin_h).json()
    assert r["node.ae_title"] == "WEBTEST" and r["completion.quiet_seconds"] == 10.0
    r = client.patch("/api/settings", headers=admin_h, json={"node.ae_title": "NEW_NODE", "completion.quiet_seconds": 4})
    assert r.status_code == 200, r.text
    assert node.effective("node.ae_title") == "NEW_NODE" and node.effective("completion.quiet_seconds") == 4
    assert client.patch("/api/settings", headers=admin_h, json={"node.port": 70000}).status_code == 422
    assert client.patch("/api/settings", headers=admin_h, json={"node.ae_title": "A\\B"}).status_code == 422
    assert client.patch("/api/settings", headers=admin_h, json={"nope": 1}).status_code == 422
    audit = client.get("/api/audit", headers=admin_h).json()["items"]
    assert audit[0]["action"] == "settings.update" and audit[0]["actor"] == ADMIN[0]
    assert audit[0]["detail"]["node.ae_title"] == {"before": "WEBTEST", "after": "NEW_NODE"}


def test_users_api(node, client, admin_h):
    r = client.post("/api/users", headers=admin_h, json={"username": "carol", "role": "radiologist",
                                                        "password": "carol-pass-1"})
    assert r.status_code == 201, r.text
    assert client.post("/api/users", headers=admin_h, json={"username": "carol", "role": "radiologist",
                                                           "password": "carol-pass-1"}).status_code == 409
    assert client.post("/api/users", headers=admin_h, json={"username": "dave", "role": "radiologist",
                                                           "password": "short"}).status_code == 422
    assert client.post("/api/users", headers=admin_h, json={"username": "eve", "role": "root",
                                                           "password": "long-enough-1"}).status_code == 422
    token = client.post("/api/token", data={"username": "carol", "password": "carol-pass-1"}).json()["access_token"]
    carol = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/studies", headers=carol).status_code == 200
    # A new password revokes the tokens issued before it.
    assert client.patch("/api/users/carol", headers=admin_h, json={"password": "carol-pass-2"}).status_code == 200
    assert client.get("/api/studies", headers=carol).status_code == 401
    # The last admin can be neither demoted nor removed.
    assert client.patch("/api/users/admin", headers=admin_h, json={"role": "radiologist"}).status_code == 409
    assert client.delete("/api/users/admin", headers=admin_h).status_code == 409
    assert client.delete("/api/users/carol", headers=admin_h).status_code == 204
    assert [u["username"] for u in client.get("/api/users", headers=admin_h).json()] == ["admin", "rad"]
    actions = [e["action"] for e in client.get("/api/audit", headers=admin_h).json()["items"]]
    assert [a for a in actions if not a.startswith("login")] == ["user.remove", "user.update", "user.add"]
    assert actions.count("login") == 1  # carol's
    assert "carol-pass" not in client.get("/api/audit", headers=admin_h).text  # never the password itself


def test_metrics_counted_from_the_database(node, client):
    _, job_id = _job_with_results(node)
    with node.sessions.begin() as s:
        repo.log_association(s, calling_ae="A", called_ae="WEBTEST", result=AssociationResult.ACCEPTED)
        repo.log_association(s, calling_ae="B", called_ae="WEBTEST", result=AssociationResult.REJECTED, reason="x")
        repo.log_association(s, calling_ae="C", called_ae="WEBTEST", result=AssociationResult.REJECTED, reason="y")
        d = repo.ensure_destination(s, "pacs", "PACS", "127.0.0.1", 104, ["sr"])
        s.flush()
        s.add_all([Transfer(job_id=job_id, destination_id=d.id, state=TransferState.SENT),
                   Transfer(job_id=job_id, destination_id=d.id, state=TransferState.FAILED)])
        s.add(Job(series_id=s.get(Job, job_id).series_id, idempotency_key="k2", state=JobState.FAILED,
                  inference_seconds=1.5, error="boom"))
    text = client.get("/metrics").text
    assert "dicom_node_instances_received_total 30.0" in text
    assert 'dicom_node_associations_total{direction="in",result="accepted"} 1.0' in text
    assert 'dicom_node_associations_total{direction="in",result="rejected"} 2.0' in text
    assert 'dicom_node_jobs{state="done"} 1.0' in text and 'dicom_node_jobs{state="failed"} 1.0' in text
    assert "dicom_node_inference_seconds_count 2.0" in text and "dicom_node_inference_seconds_sum 5.0" in text
    assert 'dicom_node_transfers{state="sent"} 1.0' in text and 'dicom_node_transfers{state="failed"} 1.0' in text
    assert 'dicom_node_studies{status="done"} 1.0' in text


def test_health_openapi_and_offline_docs(client):
    health = client.get("/healthz").json()  # no stage runs in this test: only the database is "ok"
    assert health["database"] == "ok" and health["stages"]["listen"]["status"] == "down"
    spec = client.get("/openapi.json").json()
    for path in ("/api/token", "/api/studies", "/api/studies/{study_uid}", "/api/sources", "/api/destinations",
                 "/api/destinations/{name}/echo", "/api/transfers", "/api/associations", "/api/users"):
        assert path in spec["paths"], path
    assert "OAuth2PasswordBearer" in spec["components"]["securitySchemes"]
    html = client.get("/docs").text
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"""url: ?['"]([^'"]+)['"]""", html)
    assert urls and all(u.startswith("/") for u in urls), urls
    for asset in ("/static/swagger-ui-bundle.js", "/static/swagger-ui.css", "/static/app.css", "/static/app.js"):
        assert client.get(asset).status_code == 200, asset


def test_unknown_study_is_404(node, client, rad_h):
    assert client.get("/api/studies/1.2.3.999", headers=rad_h).status_code == 404
    assert client.get("/api/results/424242/file", headers=rad_h).status_code == 404
    with node.sessions() as s:
        assert s.scalar(select(Destination)) is None and s.scalar(select(AssociationLog)) is None


def test_source_added_through_api_is_accepted_by_the_listener_at_once(node, client, admin_h):
    """The real SCP (dicom_node.scp.Listener) on a free loopback port, a real C-ECHO SCU."""
    from dicom_node import scu
    from dicom_node.scp import Listener

    listener = Listener(node)
    port = listener.start(port=0)
    try:
        before = scu.echo("WEBTEST", "127.0.0.1", port, calling_ae="NEW_MODALITY", timeout=5)
        assert not before.ok and "rejected" in before.message
        r = client.post("/api/sources", headers=admin_h, json={"ae_title": "NEW_MODALITY", "host": "127.0.0.1"})
        assert r.status_code == 201
        after = scu.echo("WEBTEST", "127.0.0.1", port, calling_ae="NEW_MODALITY", timeout=5)
        assert after.ok, after.message
        # The listener audits an association when its connection closes: wait for both rows.
        deadline = time.monotonic() + 10
        while True:
            log = client.get("/api/associations", headers=admin_h).json()["items"]
            if len(log) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        listener.stop()
    assert sorted((a["calling_ae"], a["result"]) for a in log) == [("NEW_MODALITY", "accepted"),
                                                                   ("NEW_MODALITY", "rejected")]


def test_complete_now_marks_the_series_and_is_audited(node, client, admin_h, rad_h):
    from storage.models import Series

    with node.sessions.begin() as s:
        study = add_study_row(s, "1.2.9.1", status=StudyStatus.RECEIVED)
        s.add_all([Series(series_instance_uid="1.2.9.1.1", study=study, dirty=True),
                   Series(series_instance_uid="1.2.9.1.2", study=study, dirty=True)])
    assert client.post("/api/studies/1.2.9.1/complete", headers=rad_h).status_code == 403
    r = client.post("/api/studies/1.2.9.1/series/1.2.9.1.2/complete", headers=admin_h)
    assert r.status_code == 200 and r.json()["series"] == ["1.2.9.1.2"]
    with node.sessions() as s:
        marked = {x.series_instance_uid: x.complete_requested for x in s.scalars(select(Series))}
    assert marked == {"1.2.9.1.1": False, "1.2.9.1.2": True}
    r = client.post("/api/studies/1.2.9.1/complete", headers=admin_h)
    assert r.status_code == 200 and r.json()["series"] == ["1.2.9.1.1", "1.2.9.1.2"]
    assert client.post("/api/studies/9.9.9/complete", headers=admin_h).status_code == 404
    assert client.post("/api/studies/1.2.9.1/series/9.9/complete", headers=admin_h).status_code == 404
    with node.sessions() as s:
        assert s.scalars(select(AuditEvent.action).where(AuditEvent.target == "1.2.9.1")).all() == \
            ["study.complete", "study.complete"]


def test_study_detail_says_why_an_undecided_series_is_waiting(node, client, admin_h):
    """An open association from CT_A holds one series (until its start + max_open_seconds); the
    other waits for its quiet period; a decided series says nothing."""
    from datetime import timedelta

    from storage.models import AssociationLog, AssociationResult, Instance, Series, StageHeartbeat, utcnow

    now = utcnow()
    with node.sessions.begin() as s:
        study = add_study_row(s, "1.2.9.7", status=StudyStatus.RECEIVED)
        held = Series(series_instance_uid="1.2.9.7.1", study=study, dirty=True, last_received_at=now)
        quiet = Series(series_instance_uid="1.2.9.7.2", study=study, dirty=True, last_received_at=now)
        done = Series(series_instance_uid="1.2.9.7.3", study=study, dirty=False, last_received_at=now)
        s.add_all([held, quiet, done, StageHeartbeat(stage="listen", identity="host:1", last_seen=now)])
        a = AssociationLog(direction="in", calling_ae="CT_A", result=AssociationResult.ACCEPTED, started_at=now,
                           listener="host:1")
        s.add(a)
        s.flush()
        for n, se in enumerate((held, quiet)):
            s.add(Instance(series=se, sop_instance_uid=f"1.2.9.7.9.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                           transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"x/{n}.dcm", size_bytes=1, sha256="0" * 64,
                           calling_ae="CT_A", association_id=a.id if se is held else None, received_at=now))
    series = {x["series_instance_uid"]: x for x in client.get("/api/studies/1.2.9.7", headers=admin_h).json()["series"]}
    until = now + timedelta(seconds=node.settings.completion.max_open_seconds)
    assert series["1.2.9.7.1"]["waiting_reason"] == f"association from CT_A still open, at most until {until:%H:%M:%S} UTC"
    quiet_until = now + timedelta(seconds=node.settings.completion.quiet_seconds)
    assert series["1.2.9.7.2"]["waiting_reason"].startswith(f"quiet period until {quiet_until:%H:%M:%S} UTC")
    assert series["1.2.9.7.3"]["waiting_reason"] is None
    from fastapi.testclient import TestClient
    from webtools import page_login

    with TestClient(client.app) as browser:  # its own cookie jar: the session client stays logged out
        page_login(browser, ADMIN)
        page = browser.get("/studies/1.2.9.7")
    assert page.status_code == 200 and "waiting: association from CT_A still open" in page.text


def test_cancel_a_pending_job_is_audited_and_refused_for_a_finished_one(node, client, admin_h, rad_h):
    from storage.models import Job, JobState, Series, Study

    with node.sessions.begin() as s:
        study = add_study_row(s, "1.2.9.8", status=StudyStatus.WAITING)
        series = Series(series_instance_uid="1.2.9.8.1", study=study, dirty=False)
        pending = Job(series=series, idempotency_key="k-pending", state=JobState.PENDING)
        done = Job(series=series, idempotency_key="k-done", state=JobState.DONE)
        s.add_all([series, done])
        s.flush()
        s.add(pending)
        s.flush()
        pending_id, done_id = pending.id, done.id
    assert client.post(f"/api/jobs/{pending_id}/cancel", headers=rad_h).status_code == 403
    r = client.post(f"/api/jobs/{pending_id}/cancel", headers=admin_h)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    r = client.post(f"/api/jobs/{done_id}/cancel", headers=admin_h)
    assert r.status_code == 409 and "only pending jobs" in r.json()["detail"]
    assert client.post("/api/jobs/999999/cancel", headers=admin_h).status_code == 404
    with node.sessions() as s:
        assert s.scalars(select(AuditEvent.target).where(AuditEvent.action == "job.cancel")).all() == [str(pending_id)]
        assert s.scalar(select(Study).where(Study.study_instance_uid == "1.2.9.8")).status is StudyStatus.DONE
