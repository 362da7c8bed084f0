"""model.miss_diagnosis: the stage named agrees with what the predictor does."""
from __future__ import annotations

import numpy as np

from model import field_eval as F
from model import miss_diagnosis as M


def test_stages_agree_with_the_predictor(luna_cubes, predictor):
    val = [c for c in F.D.split_cubes(luna_cubes)[2] if c.mask.any()][:4]
    why = M.explain_field(predictor, val, only_missed=False)
    assert len(why["rows"]) == 4 and sum(why["by_stage"].values()) == 4
    ref = F.off_centre(predictor, val, seed=0, subsolid_hu=-300.0)
    for row, r in zip(why["rows"], ref):
        assert row["stage"] in M.STAGES
        assert (row["stage"] == "found") == r["found"], (row, r["found"])
    # the same nodule at an unreachable threshold: lost at the threshold, with its score
    found = [(c, row) for c, row in zip(val, why["rows"]) if row["stage"] == "found"]
    assert found
    saved = predictor.threshold
    try:
        predictor.threshold = 1.01
        rng = np.random.default_rng(int(__import__("hashlib").sha256(f"0:{found[0][0].name}".encode()).hexdigest()[:8], 16))
        hu, _, s, ref_v, _ = F.off_centre_cube(found[0][0], rng)
        r = M.explain(predictor, hu, (s, s, s), ref_v, found[0][0].diameter_mm)
    finally:
        predictor.threshold = saved
    assert r["stage"] == "below_threshold" and 0 < r["refined"] < 1.01 and r["peak"] >= predictor.candidate_threshold


def test_nothing_there_is_no_peak_or_below_candidates(predictor):
    air = np.full((40, 40, 40), -1000, np.int16)
    r = M.explain(predictor, air, (1.0, 1.0, 1.0), (20, 20, 20), 6.0)
    assert r["stage"] in ("no_peak", "below_candidate_threshold")
