"""The malignancy read-out (model/readout.py): features checked against hand-computed values,
the logistic fit against its optimality condition, cross-validation by group."""
from __future__ import annotations

import numpy as np
import pytest

from model.readout import FEATURES, Readout, cross_validate, fit, nodule_features


def test_features_hand_computed():
    hu = np.full((10, 10, 10), -800.0)
    mask = np.zeros(hu.shape, bool)
    mask[4:6, 4:6, 4:6] = True  # 8 voxels: 2 calcified (+400), 2 ground glass (-700), 4 at 0 HU
    vals = np.array([400, 400, -700, -700, 0, 0, 0, 0], float)
    hu[mask] = vals
    f = nodule_features(hu, mask, diameter_mm=6.0, malignancy_logit=-1.5)
    assert len(f) == len(FEATURES)
    assert f[0] == pytest.approx(np.log(6.0))
    assert f[1] == -1.5
    assert f[2] == pytest.approx(vals.mean() / 100)
    assert f[3] == pytest.approx(vals.std() / 100)
    assert f[4] == pytest.approx(0.25) and f[5] == pytest.approx(0.25)


def test_features_empty_mask_uses_a_ball_and_shapes_are_checked():
    hu = np.zeros((9, 9, 9))
    hu[4, 4, 4] = 1000.0
    f = nodule_features(hu, np.zeros(hu.shape, bool), diameter_mm=1.0, malignancy_logit=0.0)
    assert f[4] > 0  # the centre voxel (calcified) is inside the fallback ball
    with pytest.raises(ValueError, match="shape"):
        nodule_features(hu, np.zeros((3, 3, 3), bool), 5.0, 0.0)


def _data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURES)))
    true = np.array([2.0, 1.0, 0.0, 0.0, -1.5, 0.0])
    y = (rng.random(n) < 1 / (1 + np.exp(-(x @ true)))).astype(float)
    return x, y, true


def test_fit_satisfies_the_penalised_optimality_condition():
    x, y, true = _data()
    r = fit(x, y, l2=1.0)
    z = (x - np.asarray(r.mean)) / np.asarray(r.scale)
    p = r.probability(x)
    grad_w = z.T @ (p - y) + 1.0 * np.asarray(r.coef)
    assert np.abs(grad_w).max() < 1e-6 and abs((p - y).sum()) < 1e-6  # intercept not penalised
    # the informative features get the right signs, the others small weights
    assert r.coef[0] > 0.5 and r.coef[1] > 0.2 and r.coef[4] < -0.5
    assert max(abs(r.coef[2]), abs(r.coef[3]), abs(r.coef[5])) < 0.4


def test_fit_rejects_one_class_and_bad_shapes():
    x, y, _ = _data(20)
    with pytest.raises(ValueError, match="two benign and two malignant"):
        fit(x, np.ones(20))
    with pytest.raises(ValueError, match="one label per row"):
        fit(x[:, :3], y)


def test_json_round_trip_and_feature_check():
    x, y, _ = _data()
    r = fit(x, y)
    again = Readout.from_json(r.to_json())
    assert np.allclose(again.probability(x), r.probability(x))
    bad = {**r.to_json(), "features": ["log_diameter"]}
    with pytest.raises(ValueError, match="do not match"):
        Readout.from_json(bad)


def test_cross_validation_never_predicts_a_group_from_itself():
    # two groups whose label depends on feature 0 in opposite directions: a model fitted on
    # one group predicts the other one wrongly, an in-sample fit would not
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, len(FEATURES)))
    groups = ["a"] * 100 + ["b"] * 100
    y = np.where(np.arange(200) < 100, x[:, 0] > 0, x[:, 0] < 0).astype(float)
    oof = cross_validate(x, y, groups, folds=2, l2=0.1)
    assert not np.isnan(oof).any()
    assert ((oof >= 0.5) == y).mean() < 0.2


def test_out_of_fold_on_other_rows_uses_only_read_outs_that_never_saw_the_series():
    """cross_validate_on (the off-centre copies of training nodules, for calibration): a copy
    of a series' nodule is predicted by the fold read-out fitted without that series."""
    from model.readout import cross_validate_on

    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, len(FEATURES)))
    groups = ["a"] * 100 + ["b"] * 100
    y = np.where(np.arange(200) < 100, x[:, 0] > 0, x[:, 0] < 0).astype(float)
    copies = x + rng.normal(scale=0.01, size=x.shape)
    p = cross_validate_on(x, y, groups, copies, groups, folds=2, l2=0.1)
    assert not np.isnan(p).any()
    assert ((p >= 0.5) == y).mean() < 0.2  # in-sample it would be right nearly always
    same = cross_validate_on(x, y, groups, x, groups, folds=2, l2=0.1)
    assert np.allclose(same, cross_validate(x, y, groups, folds=2, l2=0.1))
