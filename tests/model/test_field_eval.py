"""The field protocol (model/field_eval.py) on a handful of validation cubes: JSON structure,
figures computed (a predictor that finds nothing scores sensitivity 0; the real one does not)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from model import field_eval as F


def test_off_centre_cube_keeps_the_nodule_inside_and_maps_its_centre():
    from model.data import Cube

    img = np.full((40, 40, 40), -800, np.int16)
    zz, yy, xx = np.ogrid[:40, :40, :40]
    m = (zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 25
    img[m] = 40
    c = Cube("x", "s", img, m, (20.0, 20.0, 20.0), 10.0, [], float("nan"), False)
    hu, mask, s, ref, draw = F.off_centre_cube(c, np.random.default_rng(1))
    assert 0.8 <= s <= 1.25 and np.linalg.norm(draw["shift_mm"]) <= 5.0
    assert mask.any()
    com = np.argwhere(mask).mean(0)
    assert np.linalg.norm((com - ref) * s) < 1.5
    assert np.linalg.norm(np.asarray(ref) - 19.5) * s == pytest.approx(np.linalg.norm(draw["shift_mm"]), abs=0.6)


def test_ece_and_bootstrap():
    e, table = F.ece([0.1, 0.9, 0.9, 0.1], [0, 1, 1, 0])
    assert e == pytest.approx(0.1) and sum(b["n"] for b in table) == 4
    d = F.bootstrap_auc_diff([0.1, 0.2, 0.8, 0.9], [0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 200, 0)
    assert d["auc_difference"] == pytest.approx(2.0 * 1.0 - 1.0) and d["ci95"][0] > 0


class _Blind:
    threshold = 0.3

    def __call__(self, volume, spacing, *a, **k):
        return []


def test_quick_protocol_structure_and_broken_predictor(luna_cubes, predictor):
    few = F.D.split_cubes(luna_cubes)[2][:6]
    train = F.D.split_cubes(luna_cubes)[1]
    blind = F.evaluate_field(_Blind(), cubes=train + few, limit=6, thicknesses=(), n_boot=50, phantoms=0)
    assert blind["off_centre"]["sensitivity"] == 0.0 and blind["off_centre"]["dice_mean"] is None
    assert blind["targets"]["off_centre_sensitivity>=0.90"]["met"] is False
    res = F.evaluate_field(predictor, cubes=train + few, limit=6, thicknesses=(), n_boot=50, phantoms=0)
    json.dumps({k: v for k, v in res.items() if k != "_rows"})
    for key in ("off_centre", "malignancy", "calibration", "sub_solid", "thin_slice", "targets", "validation"):
        assert key in res
    assert set(res["off_centre"]["by_size_band"]) == {"3-6", "6-10", "10-20", "20-30", ">30"}
    assert res["off_centre"]["sensitivity"] > 0
    assert res["validation"]["cubes"] == 6 and len(res["_rows"]) == 6
    assert set(res["calibration"]["suspicion_bands"]) == {"low", "intermediate", "high"}
    same = res["malignancy"]["end_to_end_same_detection"]
    assert same["n"] == res["malignancy"]["end_to_end"]["n"] and same["model_auc"] == res["malignancy"]["end_to_end"]["model_auc"]


def test_ece_spread_floor_of_a_calibrated_model_is_small_but_not_zero():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 100)
    y = (rng.random(100) < p).astype(float)
    sp = F.ece_spread(p, y, n=300)
    assert 0 < sp["perfectly_calibrated_median"] < sp["perfectly_calibrated_p95"] < 0.2
    lo, hi = sp["ci95"]
    assert lo <= F.ece(p, y)[0] <= hi
