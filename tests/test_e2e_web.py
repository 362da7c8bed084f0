"""The whole node with its web stage: a real LIDC study processed by the real model, then read
through the JSON API and in headless Chromium like a radiologist and an administrator would."""
from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.peers import NodeProcess, StoreSCP, need, need_lidc, wait_for, wait_port

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def http(method: str, url: str, *, token: str | None = None, form: dict | None = None, body: dict | None = None):
    data, headers = None, {}
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if resp.headers.get_content_type() == "application/json" else raw)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """A node (all stages + web) that has processed LIDC-IDRI-0001 and sent the results to storescp."""
    series = need_lidc()
    tmp = tmp_path_factory.mktemp("e2e-web")
    peer = StoreSCP(tmp / "pacs").start()
    node = NodeProcess(tmp / "node", web=True, destinations=[{"name": "pacs", "ae_title": "STORESCP", "port": peer.port}])
    node.cli("user", "add", "admin1", "--role", "admin", "--password-stdin", input="admin-passphrase-1\n")
    node.cli("user", "add", "rad1", "--role", "radiologist", "--password-stdin", input="rad-passphrase-1\n")
    node.start(timeout=120)
    try:
        wait_port(node.web_port, timeout=60)
        r = subprocess.run([need("storescu"), "-aec", "DICOM_NODE", "127.0.0.1", str(node.port), "+sd", str(series)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        base = f"http://127.0.0.1:{node.web_port}"
        yield node, base, peer
    finally:
        node.stop()
        peer.stop()


def token(base: str, user: str, password: str) -> str:
    status, body = http("POST", f"{base}/api/token", form={"username": user, "password": password})
    assert status == 200, body
    return body["access_token"]


def test_api_lists_the_processed_lidc_study_as_done_with_its_findings(processed):
    node, base, _ = processed
    rad = token(base, "rad1", "rad-passphrase-1")

    def done():
        status, page = http("GET", f"{base}/api/studies", token=rad)
        assert status == 200
        return page if page["items"] and page["items"][0]["status"] == "done" else None

    page = wait_for(done, timeout=400, interval=1, what="the LIDC study to be done")
    top = page["items"][0]
    assert top["findings_count"] >= 1 and top["max_malignancy"] > 0.5 and top["max_diameter_mm"] > 10
    status, detail = http("GET", f"{base}/api/studies/{top['study_instance_uid']}", token=rad)
    assert status == 200 and len(detail["findings"]) == top["findings_count"]
    assert http("GET", f"{base}/api/studies")[0] == 401
    assert http("GET", f"{base}/api/users", token=rad)[0] == 403
    admin = token(base, "admin1", "admin-passphrase-1")
    assert http("GET", f"{base}/api/users", token=admin)[0] == 200
    status, metrics = http("GET", f"{base}/metrics")
    text = metrics.decode() if isinstance(metrics, bytes) else str(metrics)
    assert status == 200 and "dicom_node_instances_received" in text


def test_browser_radiologist_and_admin(processed, tmp_path):
    node, base, peer = processed
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (make test installs it)")
    playwright = pytest.importorskip("playwright.sync_api")
    rad = token(base, "rad1", "rad-passphrase-1")
    wait_for(lambda: (lambda p: p["items"] and p["items"][0]["status"] == "done")(http("GET", f"{base}/api/studies", token=rad)[1]),
             timeout=400, interval=1, what="the LIDC study to be done")
    shots = os.environ.get("DICOM_NODE_SCREENSHOTS")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.goto(f"{base}/login")
        page.fill("#username", "rad1")
        page.fill("#password", "rad-passphrase-1")
        page.keyboard.press("Enter")  # by keyboard
        page.wait_for_url("**/worklist**")
        first_row = page.locator("table tbody tr").first
        assert "LIDC-IDRI-0001" in first_row.inner_text()
        assert "Done" in first_row.inner_text()
        if shots:
            page.screenshot(path=f"{shots}/e2e-worklist.png")
        first_row.locator("a").first.click()
        page.wait_for_url("**/studies/**")
        img = page.locator("img").first
        img.wait_for()
        page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        if shots:
            page.screenshot(path=f"{shots}/e2e-study.png", full_page=True)
        response = page.goto(f"{base}/admin/sources")
        assert response.status == 403
        browser.close()
