"""OHIF served by the node, in Debian's Chromium (headless, Playwright), offline.

The real LIDC-IDRI-0001 CT is stored and processed by the real worker (a stand-in predictor that
reports the reference nodule with a spherical mask, so the worker writes its real SR and SEG and
indexes them for DICOMweb); a radiologist signs in, clicks "Open in viewer" in the worklist and
OHIF, served under /viewer/ from the node, reads the study from the node's /dicom-web. Checked:
the CT is drawn (pixels of the viewport, not a blank canvas), the SEG's segment is listed and
drawn (its colour in the viewport), the SR's measurement is listed; nothing is fetched from
outside the node. Screenshots: ``DICOM_NODE_SCREENSHOTS=docs/screenshots`` writes
viewer-ct.png, viewer-seg.png, viewer-sr.png there (else a temporary folder).
"""
from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from web_phantom import lidc_files, store_files
from webtools import (
    LIDC_NODULE_MM,
    LIDC_SERIES,
    RAD,
    WebServer,
    build_node,
    create_accounts,
    free_port,
    launch_chromium,
    open_page,
)

pytestmark = pytest.mark.slow
SHOTS = Path(os.environ.get("DICOM_NODE_SCREENSHOTS") or (Path(__import__("tempfile").gettempdir()) / "dicom-node-shots"))


def _installed():
    from dicom_node.web import viewer_install

    if viewer_install.installed() is None:
        pytest.skip(viewer_install.missing_message())


def _predictor(array, spacing, origin, direction):  # noqa: ANN001
    """The reference nodule of LIDC-IDRI-0001 as a 14 mm sphere (the worker's real SR/SEG path)."""
    from dicom_node.volume import Volume
    from model.finding import Finding

    vol = Volume(array=array, spacing=spacing, origin=origin, direction=np.asarray(direction), datasets=[])
    zyx = vol.lps_to_voxel(LIDC_NODULE_MM)
    radius_mm = 7.0
    half = [int(np.ceil(radius_mm / s)) for s in spacing]
    lo = [int(round(c)) - h for c, h in zip(zyx, half)]
    grid = np.indices([2 * h + 1 for h in half]).astype(np.float64)
    mask = sum(((g + lo_i - c) * s) ** 2 for g, lo_i, c, s in zip(grid, lo, zyx, spacing)) <= radius_mm ** 2
    return [Finding(center_mm=tuple(LIDC_NODULE_MM), center_voxel=tuple(float(v) for v in zyx), diameter_mm=14.0,
                    volume_mm3=float(mask.sum() * np.prod(spacing)), malignancy=0.8, score=0.9, mask=mask,
                    mask_offset=tuple(lo))]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    _installed()
    if not LIDC_SERIES.is_dir():
        pytest.skip(f"LIDC-IDRI-0001 not found at {LIDC_SERIES} (shared data absent)")
    from dicom_node.scheduler import schedule_once
    from dicom_node.web.app import create_app
    from dicom_node.worker import work_once
    from storage import repo

    tmp = tmp_path_factory.mktemp("viewer-browser")
    node = build_node(f"sqlite:///{tmp / 'node.sqlite3'}", tmp / "data")
    create_accounts(node)
    with node.sessions.begin() as s:
        repo.set_setting(s, "completion.quiet_seconds", 0.1)
    study_uid, series_uid, _ = store_files(node, lidc_files(LIDC_SERIES))
    time.sleep(0.3)
    assert schedule_once(node, "test-model") == 1
    assert work_once(node, "test-worker", _predictor, "test-model")
    with WebServer(create_app(node), free_port()) as server:
        yield {"url": f"http://127.0.0.1:{server.port}", "study": study_uid, "node": node}


@pytest.fixture(scope="module")
def chromium(site):
    with launch_chromium() as browser:
        yield browser


@pytest.fixture
def page(chromium, site):
    with open_page(chromium, site["url"], timeout_ms=60000) as (pg, offsite, console):
        pg.console_log = console
        yield pg
    assert offsite == [], f"OHIF fetched from outside the node: {offsite}"
    blocked = [m for m in console if "Content Security Policy" in m]
    assert blocked == [], f"the Content-Security-Policy blocked: {blocked[:5]}"


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def pixels(page, selector: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.locator(selector).first.screenshot())).convert("RGB")).astype(int)


def open_from_worklist(page, site) -> None:
    page.goto("/login")
    page.fill("#username", RAD[0])
    page.fill("#password", RAD[1])
    page.keyboard.press("Enter")
    page.wait_for_url("**/worklist")
    link = page.locator(f'a.viewer-link[href*="{site["study"]}"]')
    assert link.count() == 1
    link.click()
    page.wait_for_url("**/viewer/viewer?StudyInstanceUIDs=*")


def wait_for_ct(page) -> np.ndarray:
    """Wait until the first viewport shows an image: many grey levels, not a blank canvas."""
    deadline = time.monotonic() + 120
    while True:
        page.wait_for_timeout(1000)
        canvas = page.locator(".cornerstone-canvas, canvas")
        if canvas.count():
            img = pixels(page, "[data-cy='viewport-pane'], .viewport-wrapper, canvas")
            grey = img.mean(axis=2)
            if np.unique(grey.round()).size > 50 and grey.std() > 20:
                return img
        if time.monotonic() > deadline:
            shot(page, "viewer-fail")
            raise AssertionError("the CT was not drawn within 120 s; console: " + " | ".join(page.console_log[-15:]))


def test_worklist_link_opens_the_study_in_ohif_and_the_ct_renders(page, site):
    open_from_worklist(page, site)
    img = wait_for_ct(page)
    skip_tour(page)
    page.wait_for_timeout(1000)
    shot(page, "viewer-ct")
    assert img.shape[0] > 300 and img.shape[1] > 300


def skip_tour(page) -> None:
    skip = page.get_by_text("Skip all")
    if skip.count():
        skip.first.click()


def open_series(page, modality: str) -> None:
    """Double-click the study browser's entry of the SR or SEG series (OHIF loads it into the
    active viewport)."""
    entry = page.locator("[data-cy='study-browser-thumbnail-no-image'], [data-cy='study-browser-thumbnail']").filter(
        has_text=modality)
    assert entry.count() >= 1, f"no {modality} series in OHIF's study browser"
    entry.first.dblclick()


def coloured(img: np.ndarray, hex_colour: str, tol: int = 60) -> int:
    """How many pixels are near ``hex_colour`` (the SEG's recommended display colour, blended)."""
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img - rgb).sum(axis=2) < tol).sum())


def test_seg_segment_is_listed_and_drawn(page, site):
    from dicom_node.results.common import segment_colour

    colour = segment_colour(1)[1]
    open_from_worklist(page, site)
    wait_for_ct(page)
    skip_tour(page)
    open_series(page, "SEG")
    page.get_by_role("button", name="Yes").first.click()  # "Do you want to open this Segmentation?"
    page.wait_for_timeout(3000)
    page.mouse.click(1348, 100)  # the right side panel: segmentation
    page.get_by_text("Nodule 1").first.wait_for()  # the segment in OHIF's segmentation panel
    page.wait_for_timeout(2000)
    img = pixels(page, "[data-cy='viewport-pane'], .viewport-wrapper, canvas")
    shot(page, "viewer-seg")
    assert coloured(img, colour) > 30, f"the segment ({colour}) is not drawn on the viewport"


def test_sr_measurement_is_listed(page, site):
    """Opening the SR series, OHIF hydrates it: its measurements panel lists the nodule (label
    "Nodule 1, 14.0 mm, high suspicion" from the key-slice group's Comment, area and maximum
    that OHIF computes from the ellipse) and the viewport draws that ellipse on the key slice.
    What OHIF needs for this (tracking identifier "Cornerstone3DTools@^0.1.0:EllipticalROI:...",
    the SCOORD under the group's first NUM): docs/viewing/viewer.md."""
    open_from_worklist(page, site)
    wait_for_ct(page)
    skip_tour(page)
    open_series(page, "SR")
    rows = page.locator("[data-cy^='measurement-table-row-']")
    deadline = time.monotonic() + 90
    opened = 0.0
    while not rows.count():
        yes = page.get_by_role("button", name="Yes")  # "track / open this report?" if OHIF asks
        if yes.count():
            yes.first.click()
        hydrated = any("Measurement added" in m for m in page.console_log)
        if hydrated and time.monotonic() - opened > 15:
            page.mouse.click(1348, 133)  # the collapsed right panel's measurements tab
            opened = time.monotonic()
        if time.monotonic() > deadline:
            shot(page, "viewer-fail")
            text = page.locator("body").inner_text()
            raise AssertionError("no measurement listed; panel: " + text[-600:]
                                 + " | console: " + " | ".join(page.console_log[-15:]))
        page.wait_for_timeout(1000)
    assert "No tracked measurements" not in page.locator("body").inner_text()
    assert rows.count() == 1, [rows.nth(i).inner_text() for i in range(rows.count())]
    page.wait_for_timeout(3000)  # OHIF fills in the area and maximum once the ellipse is drawn
    row = rows.first.inner_text()
    assert re.search(r"Nodule 1, 14\.0 mm, high suspicion", row), row
    assert re.search(r"\d+(\.\d+)? mm²", row), row  # the area OHIF computed
    img = pixels(page, "[data-cy='viewport-pane'], .viewport-wrapper, canvas")
    drawn = coloured(img, "#00FF00", tol=120) + coloured(img, "#FFFF00", tol=120)
    assert drawn > 30, "the hydrated ellipse is not drawn"
    assert not [m for m in page.console_log if "NOT YET SUPPORTED" in m]
    shot(page, "viewer-sr")
