"""Where does the :class:`~model.inference.Predictor` lose a nodule it misses? (issue 12)

:func:`explain` re-runs the predictor's stages on one input whose reference nodule centre is
known (z, y, x voxel of the input) and names the first stage that loses it:

* ``no_peak``: no detection-pass heatmap peak (any value) within the nodule radius;
* ``below_candidate_threshold``: the best peak there scores below ``candidate_threshold``
  (``refined``: the refinement pass's score had it been a candidate);
* ``outside_region``: a peak above it, but the lung region (:func:`model.lungs.lung_region`) or
  a tile core drops it (a crop narrower than 120 mm is its own region, so not for cubes);
* ``suppressed``: kept peaks exist but a stronger one nearby removed it (distance NMS);
* ``beyond_max_candidates``: the candidate ranks past ``max_candidates``;
* ``refined_away``: the refinement pass moved the centre out of the nodule radius;
* ``below_threshold``: the refinement pass's flip-averaged score is below the operating
  threshold (the score is given: how far below);
* ``final_suppression``: refined above threshold, but a stronger finding suppressed it;
* ``found``: none of these (the predictor finds it).

All distances in mm on the predictor's 1 mm isotropic grid; centres (z, y, x).
:func:`explain_field` runs it over the field protocol's off-centre validation cubes
(:func:`model.field_eval.off_centre_cube`, same draws) and tabulates the stages by size band.
"""
from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np

from model.data import resample_to_iso
from model.lungs import Region, coarse_lung_region

STAGES = ("no_peak", "below_candidate_threshold", "outside_region", "suppressed", "beyond_max_candidates", "refined_away",
          "below_threshold", "final_suppression", "found")


def _near(dets, ref_iso, radius, centre=lambda d: d.center):
    near = [(float(np.linalg.norm(np.asarray(centre(d)) - ref_iso)), d) for d in dets]
    near = [(dist, d) for dist, d in near if dist <= radius]
    return max(near, key=lambda t: t[1].score) if near else None


def explain(predictor, volume: np.ndarray, spacing, ref_voxel, diameter_mm: float) -> dict:
    """The stage (:data:`STAGES`) where the nodule of ``diameter_mm`` centred at ``ref_voxel``
    (z, y, x voxel of ``volume``, spacing (sz, sy, sx) mm) is lost, with the scores on the way:
    ``peak`` (best detection-pass heatmap peak within the radius, any value), ``refined``
    (its refinement-pass score, unskipped), ``edge_mm`` (nodule centre to the nearest face)."""
    import torch

    sp = np.asarray(spacing, float)
    iso = resample_to_iso(np.asarray(volume), tuple(sp))
    ref_iso = np.asarray(ref_voxel, float) * sp
    radius = diameter_mm / 2
    region = coarse_lung_region(iso)
    out = {"diameter_mm": round(float(diameter_mm), 2),
           "edge_mm": round(float(min(ref_iso.min(), (np.asarray(iso.shape) - 1 - ref_iso).min())), 2),
           "peak": None, "refined": None, "threshold": predictor.threshold}
    saved = predictor.candidate_threshold
    with torch.inference_mode():
        try:
            predictor.candidate_threshold = 0.0
            every = predictor._detect(iso, Region.whole(iso.shape))  # all peaks, no region filter
        finally:
            predictor.candidate_threshold = saved
        best = _near(every, ref_iso, radius)
        if best is None:
            if every:  # the nearest peak outside the radius: a localisation miss or nothing there
                dist, d = min(((float(np.linalg.norm(np.asarray(d.center) - ref_iso)), d) for d in every), key=lambda t: t[0])
                out.update(nearest_peak_mm=round(dist, 2), nearest_peak=round(d.score, 4))
            return {**out, "stage": "no_peak"}
        out["peak"] = round(best[1].score, 4)
        if best[1].score < saved:  # what the refinement pass would have made of it
            f = predictor._refine(iso, best[1], np.asarray(volume).shape, tuple(sp), (0.0, 0.0, 0.0), np.eye(3), may_skip=False)
            if f is not None and np.linalg.norm(np.asarray(f.center_voxel) * sp - ref_iso) <= radius:
                out["refined"] = round(f.score, 4)
            return {**out, "stage": "below_candidate_threshold"}
        dets = predictor._detect(iso, region)
        mine = _near(dets, ref_iso, radius)
        if mine is None:
            idx = tuple(np.clip(np.round(ref_iso).astype(int), 0, np.asarray(iso.shape) - 1))
            return {**out, "stage": "suppressed" if region[idx] else "outside_region"}
        rank = [d is mine[1] for d in dets].index(True)
        out["rank"] = rank
        f = predictor._refine(iso, mine[1], np.asarray(volume).shape, tuple(sp), (0.0, 0.0, 0.0), np.eye(3), may_skip=False)
        if f is None or np.linalg.norm(np.asarray(f.center_voxel) * sp - ref_iso) > radius:
            return {**out, "stage": "refined_away" if rank < predictor.max_candidates else "beyond_max_candidates",
                    "refined": None if f is None else round(f.score, 4)}
        out["refined"] = round(f.score, 4)
        if rank >= predictor.max_candidates:
            return {**out, "stage": "beyond_max_candidates"}
        if f.score < predictor.threshold:
            return {**out, "stage": "below_threshold"}
    fs = predictor(np.asarray(volume), tuple(sp))
    hit = _near(fs, ref_iso, radius, centre=lambda g: np.asarray(g.center_voxel) * sp)
    return {**out, "stage": "found" if hit else "final_suppression"}


def explain_field(predictor, cubes, seed: int = 0, only_missed: bool = True, progress: bool = False) -> dict:
    """:func:`explain` on the field protocol's off-centre validation cubes (same draws as
    :func:`model.field_eval.off_centre`); ``only_missed``: only cubes the predictor misses are
    explained (the others counted as ``found``). Returns {"rows", "by_stage", "by_band"}."""
    from tqdm import tqdm

    from model import field_eval as F

    rows = []
    for c in tqdm(cubes, desc="explain misses", disable=not progress):
        rng = np.random.default_rng(int(hashlib.sha256(f"{seed}:{c.name}".encode()).hexdigest()[:8], 16))
        hu, mask, s, ref, draw = F.off_centre_cube(c, rng)
        if only_missed:
            fs = predictor(hu, (s, s, s))
            if any(np.linalg.norm((np.asarray(f.center_voxel) - ref) * s) <= c.diameter_mm / 2 for f in fs):
                rows.append({"name": c.name, "diameter_mm": c.diameter_mm, "stage": "found", **draw})
                continue
        rows.append({"name": c.name, **draw, **explain(predictor, hu, (s, s, s), ref, c.diameter_mm)})
    by_band = {}
    for lo, hi in F.SIZE_BANDS:
        sel = [r for r in rows if lo <= r["diameter_mm"] < hi]
        by_band[F.band_name(lo, hi)] = dict(Counter(r["stage"] for r in sel))
    return {"rows": rows, "by_stage": dict(Counter(r["stage"] for r in rows)), "by_band": by_band}
