"""The pages in a real browser: Debian's Chromium, headless, driven by Playwright, at 1366x768.

The node's web stage runs in-process under uvicorn on a free loopback port, on SQLite. The
processed study is the real LIDC-IDRI-0001 CT (when ``../shared/data`` is present; else the
synthetic phantom) with the rows the worker leaves behind inserted directly: a done job, the
reference nodule as a finding, an SR and a threshold SEG of the nodule. Screenshots of each
step go to ``docs/screenshots/`` for the README.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from web_phantom import NODULE_DIAMETER_MM, NODULE_MM, add_done_job, add_study_row, lidc_files, nodule_mask, store_files, store_phantom
from dicom_node.worker import side_of
from storage.models import StudyStatus
from webtools import (
    ADMIN,
    CHROMIUM,
    LIDC_NODULE_MM,
    LIDC_SERIES,
    RAD,
    REPO,
    VIEWPORT,
    StoreSCP,
    WebServer,
    build_node,
    create_accounts,
    free_port,
    launch_chromium,
    open_page,
)

#: Screenshots are written only when asked (``DICOM_NODE_SCREENSHOTS=docs/screenshots``), so that a
#: test run does not rewrite the committed pictures; otherwise they go to a temporary folder.
SHOTS = Path(os.environ.get("DICOM_NODE_SCREENSHOTS") or (Path(__import__("tempfile").gettempdir()) / "dicom-node-shots"))

pytestmark = pytest.mark.slow


def _lidc_study(node):
    """Store LIDC-IDRI-0001 and record the reference nodule as the job's finding, with a SEG."""
    from scipy import ndimage

    from dicom_node.volume import load_series

    study_uid, series_uid, _ = store_files(node, lidc_files(LIDC_SERIES))
    with node.sessions() as s:
        from sqlalchemy import select

        from storage.models import Instance, Series
        paths = [node.store.path(p) for (p,) in s.execute(
            select(Instance.path).join(Series).where(Series.series_instance_uid == series_uid))]
    volume = load_series(paths)
    centre = volume.lps_to_voxel(LIDC_NODULE_MM)
    zz, yy, xx = np.ogrid[:volume.array.shape[0], :volume.array.shape[1], :volume.array.shape[2]]
    sz, sy, sx = volume.spacing
    dist = np.sqrt(((zz - centre[0]) * sz) ** 2 + ((yy - centre[1]) * sy) ** 2 + ((xx - centre[2]) * sx) ** 2)
    solid = (dist <= 17.0) & (volume.array > -400)
    labels, _ = ndimage.label(solid)
    c = tuple(int(round(v)) for v in centre)
    mask = labels == labels[c] if labels[c] else solid
    mask = ndimage.binary_opening(mask, iterations=1) | (mask & (dist <= 6))
    volume_mm3 = float(mask.sum() * sz * sy * sx)
    diameter = float(2 * (3 * volume_mm3 / (4 * np.pi)) ** (1 / 3))

    class _Src:  # what write_seg needs: the source datasets in volume order
        datasets = volume.datasets

    with node.sessions.begin() as s:
        from storage.models import Study
        study = s.query(Study).filter_by(study_instance_uid=study_uid).one()
        study.study_description = "CT CHEST (LIDC-IDRI-0001)"
    add_done_job(node, series_uid, [
        {"center_mm": LIDC_NODULE_MM, "diameter_mm": round(diameter, 1), "volume_mm3": round(volume_mm3),
         "malignancy": 0.93, "score": 0.97, "location": side_of(LIDC_NODULE_MM)},  # x > 0: the patient's left
        SECOND_FINDING(LIDC_NODULE_MM),
    ], seg_from=_Src, seg_mask=mask, inference_seconds=41.7)
    return study_uid


def SECOND_FINDING(first_mm):
    """A second, low-suspicion detection without a mask, 25 mm below the first one in the other
    lung (the false positive a reader rejects in the review test)."""
    centre = (-first_mm[0], first_mm[1], first_mm[2] - 25.0)
    return {"center_mm": centre, "diameter_mm": 5.2, "volume_mm3": 74, "malignancy": 0.23, "score": 0.58,
            "location": side_of(centre)}


def _phantom_study(node):
    ph = store_phantom(node, patient=("PHANTOM^CHEST", "PH0001"), accession="ACC20410")
    mask = nodule_mask(ph.hu, (-142.5, -142.5, -100.0), (2.5, 3.0, 3.0), NODULE_MM, NODULE_DIAMETER_MM)
    add_done_job(node, ph.series_uid, [{"center_mm": NODULE_MM, "diameter_mm": NODULE_DIAMETER_MM, "volume_mm3": 1436,
                                        "malignancy": 0.93, "location": "right lung"},
                                       SECOND_FINDING(NODULE_MM)], seg_from=ph, seg_mask=mask)
    return ph.study_uid


def _other_studies(node):
    """A realistic mix of worklist rows (synthetic names), all less suspicious than the LIDC study."""
    rows = [
        ("1.2.826.0.1.3680043.10.1.1", dict(malignancy=0.64, diameter=11.2, count=2, patient=("MARTIN^CLAIRE", "P004512"),
                                            accession="ACC20398", study_date="20260112", description="CT THORAX")),
        ("1.2.826.0.1.3680043.10.1.2", dict(malignancy=0.41, diameter=7.8, count=1, patient=("NGUYEN^BAO", "P004588"),
                                            accession="ACC20401", study_date="20260114", description="CT CHEST LOW DOSE")),
        ("1.2.826.0.1.3680043.10.1.3", dict(malignancy=0.18, diameter=5.1, count=3, patient=("SCHMIDT^ANNA", "P004601"),
                                            accession="ACC20405", study_date="20260115", description="CT CHEST")),
        ("1.2.826.0.1.3680043.10.1.4", dict(malignancy=None, diameter=None, count=0, patient=("OKAFOR^JOHN", "P004622"),
                                            accession="ACC20407", study_date="20260115", description="CT CHEST LOW DOSE")),
        ("1.2.826.0.1.3680043.10.1.5", dict(status=StudyStatus.PROCESSING, patient=("ROSSI^MARCO", "P004630"),
                                            accession="ACC20411", study_date="20260116", description="CT THORAX")),
        ("1.2.826.0.1.3680043.10.1.6", dict(status=StudyStatus.WAITING, patient=("SILVA^ANA", "P004633"),
                                            accession="ACC20412", study_date="20260116", description="CT CHEST")),
        ("1.2.826.0.1.3680043.10.1.7", dict(status=StudyStatus.RECEIVED, patient=("KOWALSKI^PIOTR", "P004640"),
                                            accession="ACC20414", study_date="20260116", description="CT CHEST")),
        ("1.2.826.0.1.3680043.10.1.8", dict(status=StudyStatus.NOT_ELIGIBLE, patient=("DUBOIS^LEA", "P004577"),
                                            accession="ACC20399", study_date="20260113", modalities="CR",
                                            description="CHEST PA",
                                            reason="not eligible yet: chest radiographs (CR/DX) are not analysed by this version")),
        ("1.2.826.0.1.3680043.10.1.9", dict(status=StudyStatus.FAILED, patient=("BERG^ERIK", "P004590"),
                                            accession="ACC20402", study_date="20260114", description="CT CHEST",
                                            reason="series has a gap: 2 slices missing between z=-120.0 and z=-115.0 mm")),
    ]
    with node.sessions.begin() as s:
        for uid, kw in rows:
            add_study_row(s, uid, **kw)


def _queue_and_log_rows(node):
    """Transfers in several states and an association log, as the dispatcher and listener leave them."""
    from datetime import timedelta

    from sqlalchemy import select

    from storage import repo
    from storage.models import AssociationResult, Job, ResultObject, Transfer, TransferState, utcnow

    with node.sessions.begin() as s:
        job = s.scalar(select(Job).order_by(Job.id).limit(1))
        ids = [r.id for r in s.scalars(select(ResultObject).where(ResultObject.job_id == job.id))]
        archive = repo.ensure_destination(s, "archive", "ARCHIVE", "10.20.0.15", 104, ["sr", "seg"])
        viewer = repo.ensure_destination(s, "reading-room", "VIEWER_RR1", "10.20.0.40", 11112, ["sr", "seg", "sc"])
        s.flush()
        now = utcnow()
        s.add_all([
            Transfer(job_id=job.id, destination_id=archive.id, result_object_ids=ids, state=TransferState.SENT,
                     attempts=1, sent_sop_instance_uids=["x"] * len(ids), sent_at=now),
            Transfer(job_id=job.id, destination_id=viewer.id, result_object_ids=ids, state=TransferState.FAILED,
                     attempts=12, error="could not connect to VIEWER_RR1@10.20.0.40:11112 (12 attempts)"),
            Transfer(job_id=job.id, destination_id=archive.id, result_object_ids=ids, state=TransferState.PENDING,
                     attempts=2, next_attempt_at=now + timedelta(seconds=40),
                     error="association aborted by ARCHIVE@10.20.0.15:104"),
        ])
        repo.log_association(s, calling_ae="STORESCU", called_ae="WEBTEST", peer_host="10.20.0.7", peer_port=51012,
                             result=AssociationResult.ACCEPTED, instances=133, duration_s=6.8,
                             started_at=now - timedelta(minutes=9), ended_at=now - timedelta(minutes=9))
        repo.log_association(s, calling_ae="CT_ROOM_9", called_ae="WEBTEST", peer_host="10.20.3.9", peer_port=40222,
                             result=AssociationResult.REJECTED, duration_s=0.0,
                             reason="calling AE title 'CT_ROOM_9' is not a configured source",
                             started_at=now - timedelta(minutes=4))
        repo.log_association(s, calling_ae="PACS", called_ae="DICOMNODE", peer_host="10.20.0.15", peer_port=40990,
                             result=AssociationResult.REJECTED, duration_s=0.0,
                             reason="called AE title 'DICOMNODE' is not this node's AE title 'WEBTEST'",
                             started_at=now - timedelta(minutes=2))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    from dicom_node.web.app import create_app

    tmp = tmp_path_factory.mktemp("browser")
    node = build_node(f"sqlite:///{tmp / 'node.sqlite3'}", tmp / "data")
    create_accounts(node)
    study_uid = _lidc_study(node) if LIDC_SERIES.is_dir() else _phantom_study(node)
    _other_studies(node)
    _queue_and_log_rows(node)
    port = free_port()
    scp = StoreSCP(tmp / "storescp", ae_title="PACS_TEST").start()
    with WebServer(create_app(node), port):
        yield {"url": f"http://127.0.0.1:{port}", "study_uid": study_uid, "node": node, "scp": scp}
    scp.stop()


@pytest.fixture(scope="module")
def chromium(site):
    with launch_chromium() as browser:
        yield browser


@pytest.fixture
def page(chromium, site):
    with open_page(chromium, site["url"]) as (pg, offsite, console):
        yield pg
    assert offsite == [], f"the page fetched from outside the node: {offsite}"
    # What the Content-Security-Policy refused: the pages must need nothing it forbids.
    blocked = [m for m in console if "Content Security Policy" in m]
    assert blocked == [], f"the Content-Security-Policy blocked: {blocked}"


def shot(page, name: str, full_page: bool = False) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def wait_until(page, expression: str, timeout: float = 15.0) -> None:
    """Poll a JavaScript expression until it is true. (Playwright's wait_for_function evaluates
    its predicate with eval(), which the pages' Content-Security-Policy rightly refuses.)"""
    import time

    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout} s: {expression}")
        page.wait_for_timeout(100)


def login(page, user):
    page.goto("/login")
    page.fill("#username", user[0])
    page.fill("#password", user[1])
    page.keyboard.press("Enter")  # by keyboard
    page.wait_for_url("**/worklist")


def test_login_worklist_and_study_with_nodule_image(page, site):
    page.goto("/worklist")
    page.wait_for_url("**/login?next=*")
    page.fill("#username", RAD[0])
    page.fill("#password", RAD[1])
    shot(page, "01-login")
    page.keyboard.press("Enter")
    page.wait_for_url("**/worklist")
    first = page.locator("table.worklist tbody tr").first
    assert "Done" in first.inner_text()
    assert first.locator(".risk .level").inner_text() == "High" and first.locator(".risk .prob").inner_text() == "0.93"
    assert "%" not in first.inner_text()
    href = first.locator("a.rowlink").get_attribute("href")
    assert href == f"/studies/{site['study_uid']}"
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"], "worklist scrolls sideways at 1366 px"

    # Auto-refresh: a study that arrives meanwhile shows without reloading the page.
    with site["node"].sessions.begin() as s:
        add_study_row(s, "1.2.826.0.1.3680043.10.1.99", status=StudyStatus.RECEIVED, patient=("NEW^ARRIVAL", "P009999"),
                      accession="ACC20499", study_date="20260117")
    assert page.locator("text=ACC20499").count() == 0
    page.evaluate("window.dicomNodeRefreshWorklist()")
    page.wait_for_selector("text=ACC20499")
    assert "Received" in page.locator("tr", has_text="ACC20499").inner_text()
    first = page.locator("table.worklist tbody tr").first

    # Open the study by keyboard: focus the top row's link and press Enter.
    first.locator("a.rowlink").focus()
    page.keyboard.press("Enter")
    page.wait_for_url(f"**{href}")
    img = page.locator("#axial-image")
    img.wait_for()
    wait_until(page, "document.getElementById('axial-image').complete && "
                     "document.getElementById('axial-image').naturalWidth > 0")
    assert page.evaluate("document.getElementById('axial-image').naturalWidth") == 512
    wait_until(page, "Array.from(document.querySelectorAll('.views img')).every(i => i.complete && i.naturalWidth > 0)")
    nodule_side = side_of(LIDC_NODULE_MM if LIDC_SERIES.is_dir() else NODULE_MM)
    assert nodule_side in page.locator("table.findings tbody tr").first.inner_text()
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]
    shot(page, "03-study-full", full_page=True)

    # Scroll two slices with the keyboard on the focused image.
    img.focus()
    page.keyboard.press("ArrowDown")
    wait_until(page, "document.getElementById('axial-label').textContent.includes('+1')")
    page.keyboard.press("ArrowDown")
    wait_until(page, "document.getElementById('axial-label').textContent.includes('+2 slices')")
    assert page.evaluate("document.getElementById('axial-image').src").startswith("blob:")
    # Zoom by keyboard: Z magnifies all three planes around the nodule.
    page.keyboard.press("z")
    wait_until(page, "document.querySelector('a.zoom[data-zoom=\"2\"]').getAttribute('aria-pressed') === 'true'")
    wait_until(page, "Array.from(document.querySelectorAll('figure.view')).every("
                     "f => (f.getAttribute('data-shown') || '').endsWith(':2'))")
    shot(page, "03-study-zoom")


def _shown(plane: str) -> str:
    return f"document.querySelector('figure.view-{plane}').getAttribute('data-shown') || ''"


def test_choosing_a_nodule_moves_the_views_and_reviews_show_in_the_worklist(page, site):
    """A radiologist picks nodule 2, scrolls, changes the window, accepts 1 and rejects 2: no page
    load in between (a marker set on the page survives), the decisions are in the database and
    in the worklist."""
    from sqlalchemy import select

    from storage.models import AuditEvent, FindingReview, FindingRow

    login(page, RAD)
    page.goto(f"/studies/{site['study_uid']}")
    wait_until(page, "Array.from(document.querySelectorAll('.views img')).every(i => i.complete && i.naturalWidth > 0)")
    page.evaluate("window.__samePage = 'yes'")
    rows = page.locator("table.findings tbody tr")
    assert rows.count() == 2
    first_id, second_id = (rows.nth(i).get_attribute("data-finding-id") for i in (0, 1))
    assert "nodule 1" in page.locator("#viewer-nodule").inner_text()

    # Choose nodule 2: all three views jump to it, the row is marked, the address says so.
    rows.nth(1).locator("a.nodule-link").click()
    for plane in ("axial", "coronal", "sagittal"):
        wait_until(page, f"({_shown(plane)}).startsWith('{second_id}:0:lung:')")
    assert page.evaluate("window.__samePage") == "yes", "choosing a nodule reloaded the page"
    assert "nodule 2" in page.locator("#viewer-nodule").inner_text()
    assert "selected" in rows.nth(1).get_attribute("class") and "selected" not in (rows.nth(0).get_attribute("class") or "")
    assert f"finding={second_id}" in page.url
    centre_2 = page.locator("#axial-label").inner_text()
    # Scroll the coronal view by keyboard and the sagittal one with the wheel; change the window.
    page.locator("#coronal-image").focus()
    page.keyboard.press("ArrowDown")
    wait_until(page, f"({_shown('coronal')}).startsWith('{second_id}:1:')")
    page.locator("#sagittal-image").hover()
    page.mouse.wheel(0, -120)
    wait_until(page, f"({_shown('sagittal')}).startsWith('{second_id}:-1:')")
    page.click("a.window[data-window=mediastinum]")
    for plane in ("axial", "coronal", "sagittal"):
        wait_until(page, f"({_shown(plane)}).includes(':mediastinum:')")
    assert page.locator("a.window[data-window=mediastinum]").get_attribute("aria-pressed") == "true"

    # Review: accept nodule 1 with a comment, reject nodule 2.
    rows.nth(0).locator("input[name=comment]").fill("solid, agrees with the CT report")
    rows.nth(0).locator("button.accept").click()
    wait_until(page, "document.getElementById('review-1').textContent.includes('Accepted')")
    rows.nth(1).locator("button.reject").click()
    wait_until(page, "document.getElementById('review-2').textContent.includes('Rejected')")
    wait_until(page, "document.getElementById('review-summary').textContent.includes('1 accepted, 1 rejected')")
    assert page.evaluate("window.__samePage") == "yes", "a review reloaded the page"
    with site["node"].sessions() as s:
        got = {(f.number, r.decision, r.comment, r.reviewer) for r, f in s.execute(
            select(FindingReview, FindingRow).join(FindingRow, FindingRow.id == FindingReview.finding_id))}
        audited = s.scalars(select(AuditEvent.target).where(AuditEvent.action == "finding.review")).all()
    assert got == {(1, "accepted", "solid, agrees with the CT report", RAD[0]), (2, "rejected", None, RAD[0])}
    assert sorted(audited) == [f"{site['study_uid']}/1", f"{site['study_uid']}/2"]

    # Back to nodule 1 in the lung window for the picture of the page.
    rows.nth(0).locator("a.nodule-link").click()
    page.click("a.window[data-window=lung]")
    for plane in ("axial", "coronal", "sagittal"):
        wait_until(page, f"({_shown(plane)}).startsWith('{first_id}:0:lung:')")
    assert page.locator("#axial-label").inner_text() != centre_2
    page.evaluate("window.scrollTo(0, 0)")
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]
    shot(page, "03-study")

    # The worklist says what was reviewed (and survives a reload: it is stored).
    page.goto("/worklist")
    row = page.locator("table.worklist tbody tr", has_text="2 findings")
    assert "2 findings, 1 accepted, 1 rejected" in row.inner_text()
    shot(page, "02-worklist")


def test_admin_adds_source_and_runs_c_echo(page, site):
    from storage import repo

    login(page, ADMIN)
    page.click("text=Administration")
    page.wait_for_url("**/admin/node")
    shot(page, "04-admin-node")
    page.click("nav.subnav >> text=Sources")
    page.fill("#new-ae", "CT_SCANNER_3")
    page.fill("#new-host", "127.0.0.1")
    page.fill("#new-desc", "CT scanner, room 3")
    page.click("text=Add source")
    page.wait_for_selector(".flash-ok")
    assert "Source CT_SCANNER_3 added" in page.inner_text(".flash-ok")
    with site["node"].sessions() as s:
        assert repo.source_allows(s, "CT_SCANNER_3", "127.0.0.1") is None
    shot(page, "05-admin-sources")

    page.click("nav.subnav >> text=Destinations")
    page.fill("#new-name", "pacs")
    page.fill("#new-ae", site["scp"].ae_title)
    page.fill("#new-host", "127.0.0.1")
    page.fill("#new-port", str(site["scp"].port))
    page.click("text=Add destination")
    page.wait_for_selector(".flash-ok")
    page.click("button[aria-label='Test pacs with C-ECHO']")
    page.wait_for_selector("#echo-result")
    text = page.inner_text("#echo-result")
    assert "success" in text and "PACS_TEST" in text, text
    shot(page, "06-admin-destinations-echo")

    page.click("nav.subnav >> text=Audit trail")
    audit = page.inner_text("table.grid")
    assert "source.add" in audit and "destination.add" in audit and "destination.echo" in audit
    shot(page, "07-admin-audit")

    page.click("nav.subnav >> text=Queues")
    queues = page.inner_text("main")
    assert "could not connect to VIEWER_RR1" in queues and "Retry now" in queues
    shot(page, "10-admin-queues")
    page.click("nav.subnav >> text=Association log")
    assert "is not a configured source" in page.inner_text("table.grid")
    shot(page, "11-admin-associations")


def test_radiologist_refused_admin_pages(page, site):
    login(page, RAD)
    assert page.locator("text=Administration").count() == 0
    for url in ("/admin/sources", "/admin/destinations", "/admin/users"):
        response = page.goto(url)
        assert response.status == 403
        assert "This page is for administrators" in page.inner_text("main")
    shot(page, "08-radiologist-refused")


def test_docs_page_works_offline(page, site):
    login(page, ADMIN)
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto("/docs")
    page.wait_for_selector("text=Worklist: studies with AI status and findings, most suspicious first", timeout=20000)
    assert page.locator(".opblock").count() >= 25
    assert errors == []
    shot(page, "09-api-docs")
