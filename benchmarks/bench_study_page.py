#!/usr/bin/env python
"""The first (cold) study page of a processed LIDC-IDRI-0001, with and without pre-rendered images.

LIDC-IDRI-0001 (133 CT instances; Armato et al., TCIA, doi:10.7937/K9/TCIA.2015.LO9QL9SX) is
stored into a node on SQLite and processed by the real worker (``work_once``: volume loading,
SR + SEG, then ``dicom_node.render.prerender``), with a predictor that returns the reference
nodule (its mask thresholded from the CT) so that the model's own time is left out. Then, each
time in a fresh web app (cold: no series in memory), the study page's HTML and its three centre
images are fetched one after the other, as a radiologist opening the study would:

* baseline: the pre-rendered files removed (what the page cost before: the web loads the
  series and reads the SEG on the first image),
* pre-rendered: as the worker left them.

Usage: python benchmarks/bench_study_page.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "web"))

from webtools import ADMIN, LIDC_NODULE_MM, LIDC_SERIES, RAD, build_node, create_accounts, page_login  # noqa: E402


def _predictor():
    import numpy as np

    from model.finding import Finding

    def predict(array, spacing, origin, direction):
        from dicom_node.volume import Volume  # noqa: F401 - geometry as the worker passes it

        sz, sy, sx = spacing
        d = np.asarray(direction, dtype=float)
        rel = np.asarray(LIDC_NODULE_MM) - np.asarray(origin)
        idx_xyz = (rel @ np.linalg.inv(d).T) / np.array([sx, sy, sz])
        cz, cy, cx = idx_xyz[2], idx_xyz[1], idx_xyz[0]
        zz, yy, xx = np.ogrid[:array.shape[0], :array.shape[1], :array.shape[2]]
        dist = np.sqrt(((zz - cz) * sz) ** 2 + ((yy - cy) * sy) ** 2 + ((xx - cx) * sx) ** 2)
        mask = (dist <= 14.0) & (array > -400)
        nz = np.nonzero(mask)
        lo = [int(v.min()) for v in nz]
        crop = mask[lo[0]:nz[0].max() + 1, lo[1]:nz[1].max() + 1, lo[2]:nz[2].max() + 1]
        volume = float(mask.sum() * sz * sy * sx)
        return [Finding(center_mm=LIDC_NODULE_MM, center_voxel=(cz, cy, cx), diameter_mm=2 * (3 * volume / (4 * np.pi)) ** (1 / 3),
                        volume_mm3=volume, malignancy=0.93, score=0.97, mask=crop, mask_offset=tuple(lo))]

    return predict


def _first_page(node, study_uid: str) -> float:
    from fastapi.testclient import TestClient

    from dicom_node.web.app import create_app

    with TestClient(create_app(node)) as c:
        page_login(c, RAD)
        t0 = time.perf_counter()
        html = c.get(f"/studies/{study_uid}")
        assert html.status_code == 200
        fid = c.get(f"/api/studies/{study_uid}").json()["findings"][0]["id"]
        for plane in ("axial", "coronal", "sagittal"):
            r = c.get(f"/api/findings/{fid}/image", params={"plane": plane})
            assert r.status_code == 200, r.text
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not LIDC_SERIES.is_dir():
        sys.exit(f"LIDC-IDRI-0001 not found at {LIDC_SERIES}")
    from sqlalchemy import select

    from dicom_node.worker import work_once
    from storage.models import Job, JobState, Series
    from web_phantom import lidc_files, store_files

    tmp = Path(tempfile.mkdtemp(prefix="bench-study-page-"))
    try:
        node = build_node(f"sqlite:///{tmp / 'node.sqlite3'}", tmp / "data")
        create_accounts(node)
        study_uid, series_uid, _ = store_files(node, lidc_files(LIDC_SERIES))
        with node.sessions.begin() as s:
            series = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
            s.add(Job(series_id=series.id, kind="infer", idempotency_key="bench", state=JobState.PENDING))
        t0 = time.perf_counter()
        assert work_once(node, "bench", _predictor(), "bench")
        worker_s = time.perf_counter() - t0
        with node.sessions() as s:
            job = s.scalar(select(Job))
            assert job.state is JobState.DONE, job.error
            render_dir = node.store.path(f"results/{job.id}/render")
        saved = tmp / "render-saved"
        shutil.copytree(render_dir, saved)
        t0 = time.perf_counter()
        from dicom_node import render
        from dicom_node.volume import load_series
        from storage.models import Instance, ResultObject

        with node.sessions() as s:
            paths = [node.store.path(p) for (p,) in s.execute(select(Instance.path).where(Instance.series_id == series.id))]
            seg = node.store.path(s.scalar(select(ResultObject.path).where(ResultObject.kind == "seg")))
        volume = load_series(paths)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_images = render.prerender(node.store, 999999, volume, seg, [render.Nodule(1, 1, LIDC_NODULE_MM, 22.0)])
        t_pre = time.perf_counter() - t0
        shutil.rmtree(node.store.path("results/999999"), ignore_errors=True)

        baseline, prerendered = [], []
        for _ in range(args.repeat):
            shutil.rmtree(render_dir)
            baseline.append(_first_page(node, study_uid))
            shutil.copytree(saved, render_dir)
            prerendered.append(_first_page(node, study_uid))
        print(f"worker job (stub predictor, SR+SEG, pre-render): {worker_s:.1f} s")
        print(f"pre-render alone: {n_images} images in {t_pre:.2f} s (series load {t_load:.2f} s, already in memory in the worker)")
        print(f"first study page, cold, HTML + 3 centre images, median of {args.repeat}:")
        print(f"  baseline (no pre-rendered files): {statistics.median(baseline):.2f} s  {['%.2f' % x for x in baseline]}")
        print(f"  pre-rendered by the worker:       {statistics.median(prerendered):.2f} s  {['%.2f' % x for x in prerendered]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
