"""The Rules page in a real browser (Debian's Chromium, headless, Playwright): add a rule in the
text area, see it listed, move it, dry-run pasted attributes and read why a rule did not match."""
from __future__ import annotations

import json
import os

import pytest

from webtools import ADMIN, WebServer, build_node, create_accounts, free_port, launch_chromium, open_page

pytestmark = pytest.mark.slow


@pytest.fixture
def site(tmp_path):
    from dicom_node.web.app import create_app
    from storage import repo
    from storage.models import Source

    node = build_node(f"sqlite:///{tmp_path / 'node.sqlite3'}", tmp_path / "data")
    create_accounts(node)
    with node.sessions.begin() as s:
        repo.ensure_destination(s, "pacs_a", "PACS_A", "127.0.0.1", 10401, ["sr", "seg"])
        s.add(Source(ae_title="CT_A", enabled=True, return_to=["pacs_a"]))
    port = free_port()
    with WebServer(create_app(node), port):
        yield f"http://127.0.0.1:{port}"


def test_rules_page_in_chromium(site, tmp_path):
    with launch_chromium() as browser, open_page(browser, site) as (page, offsite, _console):
        page.goto("/login")
        page.fill("#username", ADMIN[0])
        page.fill("#password", ADMIN[1])
        page.keyboard.press("Enter")
        page.wait_for_url("**/worklist")
        page.click("text=Administration")
        page.click("text=Routing rules")
        page.wait_for_url("**/admin/rules")
        assert "No rule" in page.inner_text("#rules")
        for rule in ({"name": "chest-ct", "match": {"Modality": "CT", "BodyPartExamined": "/CHEST|LUNG/"},
                      "actions": ["analyse"], "destinations": ["sender"]},
                     {"name": "drop-mr", "match": {"Modality": "MR"}, "actions": ["discard"]}):
            page.fill("#new-rule", json.dumps(rule))
            page.click("button:has-text('Add rule')")
            page.wait_for_url("**/admin/rules")
        rows = page.locator("#rules tbody tr")
        assert rows.count() == 2 and "chest-ct" in rows.nth(0).inner_text()
        page.click("button[aria-label='Move drop-mr up']")
        page.wait_for_url("**/admin/rules")
        assert "drop-mr" in page.locator("#rules tbody tr").nth(0).inner_text()
        page.fill("#dry-attrs", json.dumps({"Modality": "CT", "BodyPartExamined": "HEAD", "calling_ae": "CT_A"}))
        page.click("button:has-text('Dry run')")
        result = page.inner_text("#dry-run-result")
        assert "kept, not analysed: no routing rule matched" in result
        assert "BodyPartExamined 'HEAD' does not match '/CHEST|LUNG/'" in result
        page.fill("#dry-attrs", json.dumps({"Modality": "CT", "BodyPartExamined": "CHEST", "calling_ae": "CT_A"}))
        page.click("button:has-text('Dry run')")
        assert "results to pacs_a (sr+seg) [rule chest-ct]" in page.inner_text("#dry-run-result")
        page.screenshot(path=str(os.environ.get("DICOM_NODE_RULES_SHOT") or tmp_path / "rules.png"), full_page=True)
    assert offsite == [], f"the page fetched from outside the node: {offsite}"
