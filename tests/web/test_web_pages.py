"""Server-rendered pages through the HTTP interface: login, CSRF, roles, worklist, study, admin forms."""
from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from web_phantom import NODULE_MM, add_done_job, add_study_row, store_phantom
from storage import repo
from storage.models import AuditEvent, Source, StudyStatus
from webtools import ADMIN, RAD, build_node, csrf_of, page_login

ADMIN_PAGES = ["/admin/node", "/admin/sources", "/admin/destinations", "/admin/rules", "/admin/queues", "/admin/associations",
               "/admin/users", "/admin/audit"]


@pytest.fixture
def browser(client):
    """A separate cookie jar on the same application."""
    with TestClient(client.app) as c:
        yield c


def test_pages_need_login(node, browser):
    for url in ["/worklist", "/studies/1.2.3", *ADMIN_PAGES]:
        r = browser.get(url, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next="), url


def test_login_wrong_password_and_csrf(node, browser):
    token = csrf_of(browser.get("/login").text)
    r = browser.post("/login", data={"username": ADMIN[0], "password": "nope-nope", "csrf_token": token})
    assert r.status_code == 401 and "Wrong user name or password" in r.text
    r = browser.post("/login", data={"username": ADMIN[0], "password": ADMIN[1], "csrf_token": "forged"})
    assert r.status_code == 403
    page_login(browser, ADMIN)
    assert browser.get("/worklist").status_code == 200
    # A form posted without the session's CSRF token is refused and changes nothing.
    r = browser.post("/admin/sources", data={"ae_title": "SNEAKY", "enabled": "1"})
    assert r.status_code == 403
    with node.sessions() as s:
        assert s.scalar(select(Source)) is None


def test_radiologist_refused_admin_pages(node, browser):
    page_login(browser, RAD)
    for url in ADMIN_PAGES:
        r = browser.get(url)
        assert r.status_code == 403 and "for administrators" in r.text, url
    token = csrf_of(browser.get("/worklist").text)
    r = browser.post("/admin/sources", data={"ae_title": "RADSRC", "csrf_token": token, "enabled": "1"})
    assert r.status_code == 403
    with node.sessions() as s:
        assert s.scalar(select(Source)) is None
    assert "Administration" not in browser.get("/worklist").text


def test_worklist_page_filters_and_fragment(node, browser):
    with node.sessions.begin() as s:
        add_study_row(s, "1.2.9.1", malignancy=0.2, diameter=5.0, count=1, patient=("LOW^RISK", "L1"), accession="ACCLOW")
        add_study_row(s, "1.2.9.2", malignancy=0.93, diameter=24.0, count=3, patient=("HIGH^RISK", "H1"),
                      accession="ACCHIGH")
        add_study_row(s, "1.2.9.3", status=StudyStatus.NOT_ELIGIBLE, reason="CR is not analysed by this version",
                      patient=("NOT^ELIGIBLE", "N1"), accession="ACCNE")
    page_login(browser, RAD)
    html = browser.get("/worklist").text
    assert html.index("ACCHIGH") < html.index("ACCLOW") < html.index("ACCNE")
    assert "High" in html and "0.93" in html and "93%" not in html
    assert "24.0 mm" in html and "CR is not analysed by this version" in html
    assert 'data-refresh-url="/worklist?sort=suspicion&amp;page=1&amp;fragment=1"' in html
    filtered = browser.get("/worklist", params={"status": "not_eligible"}).text
    assert "ACCNE" in filtered and "ACCHIGH" not in filtered
    searched = browser.get("/worklist", params={"q": "high"}).text
    assert "ACCHIGH" in searched and "ACCLOW" not in searched
    fragment = browser.get("/worklist", params={"fragment": 1}).text
    assert "<html" not in fragment and "ACCHIGH" in fragment
    # Garbage filters do not break the page.
    assert browser.get("/worklist", params={"date_from": "yesterday", "status": "x", "sort": "y"}).status_code == 200


def test_study_page_shows_nodules_images_and_actions(node, browser):
    ph = store_phantom(node, accession="ACCSTUDY")
    job_id = add_done_job(node, ph.series_uid, [{"center_mm": NODULE_MM, "diameter_mm": 14.0, "volume_mm3": 1436.8,
                                                  "malignancy": 0.82, "location": "right upper lobe"}])
    with node.sessions.begin() as s:
        repo.ensure_destination(s, "pacs", "PACS", "127.0.0.1", 104, ["sr", "seg"])
    page_login(browser, RAD)
    html = browser.get(f"/studies/{ph.study_uid}").text
    assert "right upper lobe" in html and "14.0 mm" in html and "0.82" in html and "82%" not in html
    assert "/api/findings/" in html and "plane=coronal" in html and "plane=sagittal" in html
    assert "Structured report (SR)" in html
    token = csrf_of(html)
    r = browser.post(f"/studies/{ph.study_uid}/resend", data={"csrf_token": token, "confirmed": "yes"})
    assert "Re-send queued: 1 transfer(s)." in r.text
    r = browser.post(f"/studies/{ph.study_uid}/rerun", data={"csrf_token": token, "confirmed": "yes"})
    assert "Re-run queued" in r.text
    with node.sessions() as s:
        actions = [a for (a,) in s.execute(select(AuditEvent.action).order_by(AuditEvent.id))]
    assert actions == ["login", "job.resend", "job.rerun"]
    assert browser.get("/studies/9.9.9").status_code == 404
    img = browser.get(f"/api/findings/{_finding_id(browser, ph.study_uid)}/image")  # the page session loads images
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert job_id


def _finding_id(browser, uid):
    return browser.get(f"/api/studies/{uid}").json()["findings"][0]["id"]


def test_admin_forms_change_and_audit(node, browser):
    page_login(browser, ADMIN)
    token = csrf_of(browser.get("/admin/sources").text)
    r = browser.post("/admin/sources", data={"ae_title": "CT_ROOM_2", "host": "", "description": "CT room 2",
                                             "enabled": "1", "csrf_token": token})
    assert "Source CT_ROOM_2 added" in r.text
    with node.sessions() as s:
        assert repo.source_allows(s, "CT_ROOM_2", "10.0.0.1") is None
    r = browser.post("/admin/sources", data={"ae_title": "BAD\\AE", "csrf_token": token})
    assert "backslash" in r.text
    r = browser.post("/admin/sources/CT_ROOM_2/update", data={"ae_title": "CT_ROOM_2", "host": "10.0.0.9",
                                                              "enabled": "1", "csrf_token": token})
    assert "saved" in r.text and "10.0.0.9" in r.text
    r = browser.post("/admin/destinations", data={"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                                  "port": "104", "outputs": ["sr", "seg"], "enabled": "1",
                                                  "csrf_token": token})
    assert "Destination pacs added" in r.text
    r = browser.post("/admin/node", data={"ae_title": "NODE_2", "port": "11112", "unknown_callers": "reject",
                                          "quiet_seconds": "7.5", "min_slices": "16", "max_slice_spacing_mm": "3.0",
                                          "csrf_token": token})
    assert "node.ae_title = NODE_2" in r.text and "completion.quiet_seconds = 7.5" in r.text
    assert node.effective("node.ae_title") == "NODE_2" and node.effective("completion.quiet_seconds") == 7.5
    r = browser.post("/admin/users", data={"username": "dr_who", "role": "radiologist", "password": "tardis-1963",
                                           "csrf_token": token})
    assert "User dr_who added as radiologist" in r.text
    r = browser.post("/admin/users/admin/remove", data={"csrf_token": token})
    assert "last admin" in r.text
    r = browser.post("/admin/sources/CT_ROOM_2/remove", data={"csrf_token": token})
    assert "Source CT_ROOM_2 removed" in r.text
    audit = browser.get("/admin/audit").text
    for action in ("source.add", "source.update", "destination.add", "settings.update", "user.add", "source.remove"):
        assert action in audit, action
    for url in ADMIN_PAGES:
        r = browser.get(url)
        assert r.status_code == 200, url
        assert 'name="csrf_token" value=""' not in r.text, f"a form on {url} has no CSRF token"


def test_first_start_without_users_says_how_to_create_one(tmp_path, caplog):
    from dicom_node.web.app import create_app

    node = build_node(f"sqlite:///{tmp_path / 'empty.sqlite3'}", tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="dicom_node.web.app"):
        with TestClient(create_app(node)) as c:
            assert "No account exists yet" in c.get("/login").text
    assert any("dicom-node user add" in r.getMessage() and "--role admin" in r.getMessage() for r in caplog.records)


def test_queues_page_shows_each_objects_status_and_study_page_completes_now(node, browser):
    from storage.models import Destination, Job, JobState, Series, Transfer, TransferState

    with node.sessions.begin() as s:
        study = add_study_row(s, "1.2.9.7", status=StudyStatus.RECEIVED)
        series = Series(series_instance_uid="1.2.9.7.1", study=study, dirty=True)
        dest = Destination(name="no3d", ae_title="NO3DSR", host="127.0.0.1", port=11112, outputs=["sr", "seg"])
        job = Job(series=series, idempotency_key="k-queues", state=JobState.DONE)
        s.add_all([series, dest, job])
        s.flush()
        s.add(Transfer(job=job, destination=dest, result_object_ids=[], sent_sop_instance_uids=["1.2.9.7.9"],
                       state=TransferState.FAILED, error="1 of 2 object(s) failed",
                       object_status={"1.2.9.7.9": {"kind": "seg", "state": "sent", "reason": None, "sent_as": None},
                                      "1.2.9.7.8": {"kind": "sr", "state": "failed",
                                                    "reason": "NO3DSR accepts no Comprehensive 3D SR", "sent_as": None}}))
    page_login(browser, ADMIN)
    html = browser.get("/admin/queues?transfer_state=failed").text
    assert "1.2.9.7.8" in html and "NO3DSR accepts no Comprehensive 3D SR" in html and "1.2.9.7.9" in html
    page = browser.get("/studies/1.2.9.7").text
    assert "Complete now" in page
    r = browser.post("/studies/1.2.9.7/complete", data={"csrf_token": csrf_of(page)})
    assert "Complete now: 1 series" in r.text
    with node.sessions() as s:
        assert s.scalar(select(Series)).complete_requested is True
