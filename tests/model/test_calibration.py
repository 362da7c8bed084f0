"""Calibration of the malignancy probability (model/calibration.py): monotone maps, fitted on
training out-of-fold probabilities, stored in the weights' JSON and applied by the Predictor."""
import json
import shutil

import numpy as np
import pytest

from model import calibration as C


def _overconfident(n=600, seed=0):
    """Labels drawn from q, reported as a sharpened p (too sure): calibration must soften."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    p = 1 / (1 + np.exp(-2.5 * z + 0.5))
    groups = [f"s{i // 2}" for i in range(n)]
    return p, y, groups


@pytest.mark.parametrize("method", C.METHODS)
def test_every_calibrator_is_monotone_and_in_unit_interval(method):
    p, y, _ = _overconfident()
    cal = C.fit(p, y, method)
    grid = np.linspace(0, 1, 501)
    q = cal(grid)
    assert np.all(np.diff(q) >= -1e-12) and q.min() >= 0 and q.max() <= 1


def test_platt_and_temperature_recover_an_overconfident_map():
    p, y, _ = _overconfident(4000)
    platt = C.fit(p, y, "platt")
    assert platt.a == pytest.approx(1 / 2.5, abs=0.06) and platt.b == pytest.approx(0.2, abs=0.12)
    temp = C.fit(p, y, "temperature")
    assert temp.b == 0 and temp.a < 1  # T > 1: softened
    assert C.ece(platt(p), y) < C.ece(p, y)


def test_isotonic_knots_follow_pool_adjacent_violators():
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    y = np.array([0, 1, 0, 0, 1, 1.0])
    kp, kq = C.isotonic_knots(p, y, prior=0.0)
    # blocks: {0.1}: 0, {0.2, 0.3, 0.4}: 1/3, {0.5, 0.6}: 1
    assert kp == pytest.approx([0.1, 0.3, 0.55]) and kq == pytest.approx([0.0, 1 / 3, 1.0])
    kp1, kq1 = C.isotonic_knots(p, y, prior=1.0)
    assert 0 < kq1[0] and kq1[-1] < 1  # shrunk towards the base rate at the ends


def test_ece_matches_the_field_protocols_definition():
    from model.field_eval import ece as field_ece

    p, y, _ = _overconfident(300, seed=3)
    assert C.ece(p, y) == pytest.approx(field_ece(p, y)[0])


def test_choose_is_cross_validated_by_series_and_beats_identity_when_overconfident():
    p, y, groups = _overconfident(1000, seed=1)
    cal, fit = C.choose(p, y, groups)
    table = fit["cross_validated"]
    assert set(table) == set(C.METHODS)
    assert table[cal.method]["ece"] <= min(v["ece"] for v in table.values()) + 0.001
    assert cal.method != "identity" and table[cal.method]["ece"] < table["identity"]["ece"]


def test_json_round_trip_and_bad_calibrators_rejected():
    p, y, groups = _overconfident()
    for m in C.METHODS:
        cal = C.fit(p, y, m)
        back = C.Calibrator.from_json(json.loads(json.dumps(cal.to_json())))
        assert back.method == m
        assert np.allclose(back(p), cal(p), atol=1e-5)
    with pytest.raises(ValueError):
        C.Calibrator("platt", a=-1.0)
    with pytest.raises(ValueError):
        C.Calibrator("isotonic", knots_p=[0.2, 0.1], knots_q=[0.1, 0.2])
    with pytest.raises(ValueError):
        C.Calibrator("cubic")
    with pytest.raises(ValueError):
        C.fit(p, np.zeros_like(p), "platt")  # one class


def test_predictor_applies_the_stored_calibrator(tmp_path, luna_cubes):
    """The shipped weights with a calibrator written into their JSON: the Predictor's
    malignancy is the calibrator of the read-out's probability, for describe and for a call."""
    from model.inference import DEFAULT_WEIGHTS, Predictor

    if not DEFAULT_WEIGHTS.exists():
        pytest.skip("default weights not shipped")
    w = tmp_path / "resmtnet.pt"
    shutil.copy(DEFAULT_WEIGHTS, w)
    meta = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    meta["calibration"] = C.Calibrator("platt", a=0.5, b=-0.3).to_json()
    w.with_suffix(".json").write_text(json.dumps(meta))
    pred = Predictor(w, runtime="torch")
    assert pred.calibration.method == "platt"
    cube = next(c for c in luna_cubes if c.diameter_mm > 8)
    det = {}
    f = pred.describe(cube.image, cube.center, details=det)
    raw = det["uncalibrated_malignancy"]
    assert raw == pytest.approx(float(pred.readout.probability(det["features"])[0]))
    assert f.malignancy == pytest.approx(float(1 / (1 + np.exp(-(0.5 * np.log(raw / (1 - raw)) - 0.3)))), abs=1e-6)
    meta.pop("calibration")
    w.with_suffix(".json").write_text(json.dumps(meta))
    plain = Predictor(w, runtime="torch")
    assert plain.calibration is None
    assert plain.describe(cube.image, cube.center).malignancy == pytest.approx(raw, abs=1e-6)
