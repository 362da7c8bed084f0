"""Findings as readers see them, their review, the export, and what a new user tripped over.

Through the real app (TestClient) on SQLite and PostgreSQL (the ``node`` fixture); the
pre-render test runs the real worker (``work_once``) on the phantom series.
"""
from __future__ import annotations

import csv
import io
import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from web_phantom import NODULE_MM, add_done_job, nodule_mask, store_phantom
from storage import repo
from storage.models import AuditEvent, FindingReview, Job, JobState, Transfer, TransferState
from webtools import ADMIN, RAD, csrf_of, page_login

RAW = {"center_mm": (-60.04, -10.06, -62.5), "diameter_mm": 26.8333415985107, "volume_mm3": 7108.01696777344,
       "malignancy": 0.99985151983124, "score": 0.97123, "location": "right lung"}
SECOND = {"center_mm": (55.0, 20.0, -70.0), "diameter_mm": 6.04, "volume_mm3": 115.4, "malignancy": 0.4371,
          "score": 0.6049, "location": "left lung"}


@pytest.fixture
def browser(client):
    with TestClient(client.app) as c:
        yield c


def _two_findings(node, **kw):
    ph = store_phantom(node, **kw)
    job_id = add_done_job(node, ph.series_uid, [RAW, SECOND])
    return ph, job_id


def test_findings_are_rounded_with_a_suspicion_level_and_the_score(node, browser, rad_h, client):
    ph, _ = _two_findings(node)
    page_login(browser, RAD)
    html = browser.get(f"/studies/{ph.study_uid}").text
    assert "100%" not in html and "99.98" not in html and "26.833" not in html
    assert "26.8 mm" in html and "7108 mm³" in html and "115 mm³" in html and "6.0 mm" in html
    assert '<span class="level">High</span> <span class="prob">1.00</span>' in html
    assert '<span class="level">Intermediate</span> <span class="prob">0.44</span>' in html
    assert ">0.97<" in html and ">0.60<" in html  # the detection score beside it
    assert "low below 0.40, intermediate" in html and "high from 0.70" in html  # the bands, stated
    assert "-60.0, -10.1, -62.5" in html
    worklist = browser.get("/worklist").text
    assert '<span class="level">High</span> <span class="prob">1.00</span>' in worklist and "100%" not in worklist
    d = client.get(f"/api/studies/{ph.study_uid}", headers=rad_h).json()
    f1, f2 = d["findings"]
    assert (f1["number"], f1["diameter_mm"], f1["volume_mm3"], f1["malignancy"], f1["score"], f1["suspicion"]) == \
        (1, 26.8, 7108, 1.0, 0.97, "high")
    assert (f2["number"], f2["suspicion"], f2["malignancy"], f2["colour"]) == (2, "intermediate", 0.44, "#56B4E9")
    assert f1["center_mm"] == [-60.0, -10.1, -62.5] and f1["review"] is None


def test_review_from_the_page_and_the_api_is_stored_audited_and_counted(node, browser, client, rad_h, admin_h):
    ph, job_id = _two_findings(node)
    page_login(browser, RAD)
    html = browser.get(f"/studies/{ph.study_uid}").text
    assert html.count('class="review-form"') == 2 and "Pending" in html
    url = f"/studies/{ph.study_uid}/findings/1/review"
    # Without the session's CSRF token nothing is stored.
    assert browser.post(url, data={"decision": "accepted"}).status_code == 403
    r = browser.post(url, data={"decision": "accepted", "comment": "  solid, matches CT report ",
                                "csrf_token": csrf_of(html)})
    assert r.status_code == 200 and "Nodule 1 accepted." in r.text
    assert "Accepted" in r.text and "“solid, matches CT report”" in r.text and f"by {RAD[0]}" in r.text
    # The JSON answer of the same form (what the page's script asks for).
    r = browser.post(f"/studies/{ph.study_uid}/findings/2/review", headers={"Accept": "application/json"},
                     data={"decision": "sideways", "csrf_token": csrf_of(html)})
    assert r.status_code == 422 and "sideways" in r.json()["detail"]
    # The API: bearer token, no CSRF needed; bad input answers clearly and stores nothing.
    api = f"/api/studies/{ph.study_uid}/findings/2/review"
    assert client.post(api, json={"decision": "rejected"}).status_code == 401
    assert client.post(api, json={"decision": "maybe"}, headers=rad_h).status_code == 422
    assert client.post(f"/api/studies/{ph.study_uid}/findings/9/review", json={"decision": "rejected"},
                       headers=rad_h).status_code == 404
    r = client.post(api, json={"decision": "rejected", "comment": "vessel"}, headers=rad_h)
    assert r.status_code == 200, r.text
    assert r.json()["review"]["decision"] == "rejected" and r.json()["review"]["reviewer"] == RAD[0]
    summary = client.get("/api/studies", headers=rad_h).json()["items"][0]
    assert summary["reviews"] == {"findings": 2, "accepted": 1, "rejected": 1, "pending": 0}
    assert "2 findings, 1 accepted, 1 rejected" in browser.get("/worklist").text
    # An admin changes a decision: the latest counts, the audit keeps both.
    r = client.post(api, json={"decision": "accepted"}, headers=admin_h)
    assert r.json()["review"]["reviewer"] == ADMIN[0] and r.json()["review"]["comment"] is None
    with node.sessions() as s:
        assert s.scalar(select(FindingReview).where(FindingReview.decision == "rejected")) is None
        events = [(e.actor, e.target, e.detail["decision"], e.detail["previous"]) for e in s.scalars(
            select(AuditEvent).where(AuditEvent.action == "finding.review").order_by(AuditEvent.id))]
    assert events == [(RAD[0], f"{ph.study_uid}/1", "accepted", None), (RAD[0], f"{ph.study_uid}/2", "rejected", None),
                      (ADMIN[0], f"{ph.study_uid}/2", "accepted", "rejected")]
    assert "2 findings, 2 accepted" in browser.get("/worklist").text
    assert job_id


def test_worklist_shows_pending_reviews(node, browser, client, rad_h):
    ph, _ = _two_findings(node)
    client.post(f"/api/studies/{ph.study_uid}/findings/1/review", json={"decision": "accepted"}, headers=rad_h)
    page_login(browser, RAD)
    assert "2 findings, 1 accepted, 1 pending" in browser.get("/worklist").text


def test_export_csv_and_json(node, client, rad_h, admin_h):
    ph, job_id = _two_findings(node)
    client.post(f"/api/studies/{ph.study_uid}/findings/2/review", json={"decision": "rejected",
                                                                       "comment": "=HYPERLINK(\"x\")"}, headers=rad_h)
    assert client.get("/api/findings/export").status_code == 401
    assert client.get("/api/findings/export?format=xml", headers=rad_h).status_code == 422
    r = client.get("/api/findings/export?format=json", headers=admin_h)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    rows = r.json()
    assert [(x["finding_number"], x["review"], x["reviewer"]) for x in rows] == [(1, "pending", None), (2, "rejected", RAD[0])]
    first = rows[0]
    assert first["study_instance_uid"] == ph.study_uid and first["series_instance_uid"] == ph.series_uid
    assert (first["diameter_mm"], first["volume_mm3"], first["malignancy"], first["score"], first["suspicion"]) == \
        (26.8, 7108, 1.0, 0.97, "high")
    assert (first["center_x_mm"], first["center_y_mm"], first["center_z_mm"]) == (-60.0, -10.1, -62.5)
    assert rows[1]["reviewed_at"] and first["job_id"] == job_id
    r = client.get("/api/findings/export?format=csv", headers=rad_h)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert 'filename="findings.csv"' in r.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert [t["finding_number"] for t in table] == ["1", "2"]
    assert table[1]["review"] == "rejected" and table[1]["reviewer"] == RAD[0]
    assert table[1]["review_comment"] == "'=HYPERLINK(\"x\")"  # a spreadsheet shows it, does not run it
    assert table[0]["diameter_mm"] == "26.8" and table[0]["malignancy"] == "1.0" and table[0]["review"] == "pending"
    openapi = client.get("/openapi.json").json()
    assert "/api/findings/export" in openapi["paths"]
    assert "/api/studies/{study_uid}/findings/{number}/review" in openapi["paths"]


def test_study_header_names_the_patient_as_the_worklist_does(node, browser):
    ph = store_phantom(node, patient=("", "LIDC-IDRI-0001"), accession="ACCNONAME")
    add_done_job(node, ph.series_uid, [RAW])
    page_login(browser, RAD)
    worklist = browser.get("/worklist").text
    assert 'class="rowlink">LIDC-IDRI-0001</a>' in worklist
    html = browser.get(f"/studies/{ph.study_uid}").text
    assert "Anonymous patient" not in html
    assert "<h1>LIDC-IDRI-0001 </h1>" in html
    named = store_phantom(node, patient=("DOE^JANE", "P77"), accession="ACCNAMED")
    html = browser.get(f"/studies/{named.study_uid}").text
    assert "<h1>DOE, JANE <span class=\"muted\">· P77</span></h1>" in html
    assert 'class="rowlink">DOE, JANE</a>' in browser.get("/worklist").text


def test_rerun_and_resend_ask_first_and_are_not_offered_without_results(node, browser):
    ph = store_phantom(node, accession="ACCNOJOB")
    page_login(browser, RAD)
    html = browser.get(f"/studies/{ph.study_uid}").text
    assert "Re-run analysis" not in html and "Re-send results" not in html
    page = browser.get(f"/studies/{ph.study_uid}/resend").text
    assert "There is nothing to re-send" in page and 'name="confirmed"' not in page
    token = csrf_of(html)
    r = browser.post(f"/studies/{ph.study_uid}/resend", data={"csrf_token": token, "confirmed": "yes"})
    assert "no finished job" in r.text

    add_done_job(node, ph.series_uid, [RAW])
    html = browser.get(f"/studies/{ph.study_uid}").text
    assert "Re-run analysis" in html and "Re-send results" not in html  # no destination takes the results yet
    with node.sessions.begin() as s:
        repo.ensure_destination(s, "pacs", "PACS", "127.0.0.1", 104, ["sr", "seg"])
    html = browser.get(f"/studies/{ph.study_uid}").text
    assert f'href="/studies/{ph.study_uid}/resend"' in html and f'href="/studies/{ph.study_uid}/rerun"' in html
    assert f'action="/studies/{ph.study_uid}/resend"' not in html  # one click does not act
    # A post without the confirmation acts on nothing and leads to the confirmation page.
    r = browser.post(f"/studies/{ph.study_uid}/resend", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/studies/{ph.study_uid}/resend"
    page = browser.get(r.headers["location"]).text
    assert "confirm on this page first" in page and "Re-send the results?" in page and "(SR)" in page
    with node.sessions() as s:
        assert s.scalar(select(Transfer)) is None
        assert s.scalar(select(AuditEvent).where(AuditEvent.action.in_(["job.resend", "job.rerun"]))) is None
    r = browser.post(f"/studies/{ph.study_uid}/resend", data={"csrf_token": csrf_of(page), "confirmed": "yes"})
    assert "Re-send queued: 1 transfer(s)." in r.text
    page = browser.get(f"/studies/{ph.study_uid}/rerun").text
    assert "Re-run the analysis?" in page
    r = browser.post(f"/studies/{ph.study_uid}/rerun", data={"csrf_token": csrf_of(page), "confirmed": "yes"})
    assert "Re-run queued" in r.text
    with node.sessions() as s:
        assert [a for (a,) in s.execute(select(AuditEvent.action).where(AuditEvent.action.like("job.%"))
                                        .order_by(AuditEvent.id))] == ["job.resend", "job.rerun"]
    assert browser.get(f"/studies/{ph.study_uid}/explode").status_code == 404


def test_delivery_errors_are_shown_to_admins_only(node, client, rad_h, admin_h):
    ph = store_phantom(node, accession="ACCDELIV")
    job_id = add_done_job(node, ph.series_uid, [RAW])
    error = "could not connect to VIEWER_RR1@10.20.0.40:11112 (12 attempts)"
    with node.sessions.begin() as s:
        d = repo.ensure_destination(s, "reading-room", "VIEWER_RR1", "10.20.0.40", 11112, ["sr"])
        s.flush()
        s.add(Transfer(job_id=job_id, destination_id=d.id, result_object_ids=[], state=TransferState.FAILED,
                       attempts=12, error=error, sent_sop_instance_uids=[]))
        s.get(Job, job_id).error = None
    with TestClient(client.app) as rad, TestClient(client.app) as adm:
        page_login(rad, RAD)
        page_login(adm, ADMIN)
        rad_html = rad.get(f"/studies/{ph.study_uid}").text
        assert error not in rad_html and "VIEWER_RR1" not in rad_html
        assert "Delivery of the results: 0 of 1 sent; the rest are handled by the administrator." in rad_html
        assert error in adm.get(f"/studies/{ph.study_uid}").text
    assert client.get(f"/api/studies/{ph.study_uid}", headers=rad_h).json()["transfers"][0]["error"] is None
    assert client.get(f"/api/studies/{ph.study_uid}", headers=admin_h).json()["transfers"][0]["error"] == error


def test_window_presets_planes_and_orientation_headers(node, client, rad_h):
    ph = store_phantom(node, accession="ACCWIN")
    add_done_job(node, ph.series_uid, [dict(RAW, center_mm=NODULE_MM, diameter_mm=14.0)], seg_from=ph,
                 seg_mask=nodule_mask(ph.hu, (-142.5, -142.5, -100.0), (2.5, 3.0, 3.0), NODULE_MM, 14.0))
    fid = client.get(f"/api/studies/{ph.study_uid}", headers=rad_h).json()["findings"][0]["id"]
    seen = {}
    for window in ("lung", "mediastinum", "bone"):
        r = client.get(f"/api/findings/{fid}/image", params={"window": window}, headers=rad_h)
        assert r.status_code == 200 and r.headers["x-window"] == window
        seen[window] = r.content
    assert len(set(seen.values())) == 3  # the window changes the picture
    assert client.get(f"/api/findings/{fid}/image", params={"window": "brain"}, headers=rad_h).status_code == 422
    orient = {}
    for plane in ("axial", "coronal", "sagittal"):
        r = client.get(f"/api/findings/{fid}/image", params={"plane": plane, "offset": 2}, headers=rad_h)
        assert r.status_code == 200 and r.headers["x-outline"] == "seg"
        assert int(r.headers["x-slice-index"]) == int(r.headers["x-centre-index"]) + 2
        orient[plane] = r.headers["x-orientation"]  # top, bottom, left, right
    assert orient == {"axial": "A,P,R,L", "coronal": "S,I,R,L", "sagittal": "S,I,A,P"}
    # Coronal: 30 slices of 2.5 mm (75 mm) by 96 columns of 3 mm (288 mm): square millimetres.
    from PIL import Image

    r = client.get(f"/api/findings/{fid}/image", params={"plane": "coronal"}, headers=rad_h)
    w, h = Image.open(io.BytesIO(r.content)).size
    assert w == 512 and abs(h - round(512 * 75 / 288)) <= 1


def test_the_worker_prerenders_the_study_page_images(node, client, rad_h, monkeypatch):
    """The images the study page opens with come from the worker, not from loading the series."""
    from model.finding import Finding

    from dicom_node.web import images
    from dicom_node.worker import work_once

    ph = store_phantom(node, accession="ACCPRE")
    with node.sessions.begin() as s:
        from storage.models import Series

        series = s.scalar(select(Series).where(Series.series_instance_uid == ph.series_uid))
        s.add(Job(series_id=series.id, kind="infer", idempotency_key="prerender-test", state=JobState.PENDING))

    mask = nodule_mask(ph.hu, (-142.5, -142.5, -100.0), (2.5, 3.0, 3.0), NODULE_MM, 14.0)

    def predictor(array, spacing, origin, direction):
        import numpy as np

        zz, yy, xx = np.nonzero(mask)
        z0, y0, x0 = int(zz.min()), int(yy.min()), int(xx.min())
        crop = mask[z0:zz.max() + 1, y0:yy.max() + 1, x0:xx.max() + 1]
        return [Finding(center_mm=NODULE_MM, center_voxel=(float(zz.mean()), float(yy.mean()), float(xx.mean())),
                        diameter_mm=14.0, volume_mm3=float(mask.sum() * 2.5 * 3 * 3), malignancy=0.81, score=0.9,
                        mask=crop, mask_offset=(z0, y0, x0))]

    assert work_once(node, "prerender-worker", predictor, "test-v1")
    with node.sessions() as s:
        job = s.scalar(select(Job).where(Job.idempotency_key == "prerender-test"))
        assert job.state is JobState.DONE, job.error
        job_id = job.id
    files = sorted(p.name for p in node.store.path(f"results/{job_id}/render").glob("*.png"))
    assert len(files) == 9 and "nodule-1-axial-lung-z1.png" in files
    info = json.loads(node.store.path(f"results/{job_id}/render/nodule-1-coronal-bone-z1.json").read_text())
    assert info["outline"] == "seg" and info["orientation"]["top"] == "S"

    def no_loading(_paths):
        raise AssertionError("the study page's first images must not load the series")

    monkeypatch.setattr(images, "load_volume", no_loading)
    fid = client.get(f"/api/studies/{ph.study_uid}", headers=rad_h).json()["findings"][0]["id"]
    for plane in ("axial", "coronal", "sagittal"):
        r = client.get(f"/api/findings/{fid}/image", params={"plane": plane}, headers=rad_h)
        assert r.status_code == 200 and r.headers["x-prerendered"] == "1" and r.headers["x-outline"] == "seg"
    monkeypatch.undo()
    r = client.get(f"/api/findings/{fid}/image", params={"plane": "axial", "offset": 1}, headers=rad_h)
    assert r.status_code == 200 and r.headers["x-prerendered"] == "0"
    # Retention deletes the pre-rendered images with the study (they show the patient's CT).
    from dicom_node import retention
    from storage.models import FindingRow, Series

    render_dir = node.store.path(f"results/{job_id}/render")
    with node.sessions.begin() as s:
        study_id = s.scalar(select(FindingRow.study_id).where(FindingRow.job_id == job_id))
        for se in s.scalars(select(Series).where(Series.study_id == study_id)):
            se.dirty = False  # as the scheduler leaves them once evaluated
        paths, why = retention.delete_study(s, study_id, "test")
    assert why is None
    retention.remove_files(node.store.root, paths)
    assert not render_dir.exists()


def test_a_failed_prerender_leaves_the_job_done(node, monkeypatch):
    """The pre-render runs after the commit: its failure is logged, the job stays done."""
    from dicom_node import render
    from dicom_node.worker import work_once
    from storage.models import Series

    ph = store_phantom(node, accession="ACCPREFAIL")
    with node.sessions.begin() as s:
        series = s.scalar(select(Series).where(Series.series_instance_uid == ph.series_uid))
        s.add(Job(series_id=series.id, kind="infer", idempotency_key="prerender-fails", state=JobState.PENDING))

    def broken(*_args, **_kw):
        raise OSError("disk full")

    monkeypatch.setattr(render, "prerender", broken)
    assert work_once(node, "w", lambda *a: [], "test-v1")
    with node.sessions() as s:
        job = s.scalar(select(Job).where(Job.idempotency_key == "prerender-fails"))
        assert job.state is JobState.DONE and job.error is None and job.attempts == 1
