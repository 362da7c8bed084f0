"""Malignancy read-out: the network's outputs for one nodule -> probability of "malignant".

Res-MTNet's malignancy branch alone learns mostly size from 710 training nodules (its AUC is
that of the diameter). The read-out is the last cross-task step: a logistic regression over
what the *other* heads measured on the same nodule, together with the malignancy branch:

============================  ==============================================================
feature                       meaning (all on the 1 mm isotropic grid of the refinement pass)
============================  ==============================================================
``log_diameter``              natural log of the regressed diameter (detection branch), mm
``malignancy_logit``          the malignancy branch's logit at the nodule centre (flip mean)
``mean_hu``                   mean HU inside the predicted mask / 100 (mask head)
``std_hu``                    HU standard deviation inside the mask / 100
``calcified_fraction``        fraction of mask voxels above 200 HU (calcification: benign)
``ground_glass_fraction``     fraction of mask voxels below -600 HU (sub-solid)
============================  ==============================================================

The feature list was fixed before validation, by 5-fold cross-validation grouped by series on
the *training* cubes (model card). Features are standardised with the training mean and
standard deviation; the weights are fitted by Newton's method (iteratively reweighted least
squares) with an L2 penalty ``l2`` on the standardised coefficients (not on the intercept).
Pure numpy: the fitted read-out is a handful of numbers stored in the weights' JSON
(``"readout"``), applied by :class:`model.inference.Predictor`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

FEATURES = ("log_diameter", "malignancy_logit", "mean_hu", "std_hu", "calcified_fraction", "ground_glass_fraction")
CALCIFIED_HU = 200.0
GROUND_GLASS_HU = -600.0


def nodule_features(hu: np.ndarray, mask: np.ndarray, diameter_mm: float, malignancy_logit: float) -> np.ndarray:
    """The :data:`FEATURES` vector of one nodule.

    ``hu``: HU crop (any shape) on the 1 mm grid; ``mask``: bool, same shape (the predicted
    nodule mask; an empty mask falls back to the voxels within ``diameter_mm / 2`` of the crop
    centre); ``diameter_mm``: regressed diameter; ``malignancy_logit``: the branch's logit.
    """
    hu = np.asarray(hu, np.float32)
    mask = np.asarray(mask, bool)
    if hu.shape != mask.shape:
        raise ValueError(f"hu {hu.shape} and mask {mask.shape} differ in shape")
    if not mask.any():
        grids = np.ogrid[tuple(slice(0, n) for n in hu.shape)]
        r2 = sum((g - (n - 1) / 2) ** 2 for g, n in zip(grids, hu.shape))
        mask = r2 <= max(1.0, diameter_mm / 2) ** 2
    v = hu[mask]
    return np.array([
        np.log(max(float(diameter_mm), 0.5)),
        float(malignancy_logit),
        float(v.mean()) / 100.0,
        float(v.std()) / 100.0,
        float((v > CALCIFIED_HU).mean()),
        float((v < GROUND_GLASS_HU).mean()),
    ])


@dataclass
class Readout:
    """A fitted read-out: ``p = sigmoid(intercept + coef . (x - mean) / scale)``."""

    features: tuple[str, ...]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    l2: float
    n_train: int

    def logit(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, float))
        if x.shape[1] != len(self.features):
            raise ValueError(f"expected {len(self.features)} features {self.features}, got {x.shape[1]}")
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return self.intercept + z @ np.asarray(self.coef)

    def probability(self, x: np.ndarray) -> np.ndarray:
        """Malignancy probability of each row of ``x`` (n, len(features)) (or one vector)."""
        return 1.0 / (1.0 + np.exp(-self.logit(x)))

    def to_json(self) -> dict:
        d = asdict(self)
        d["features"] = list(self.features)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Readout":
        r = cls(**{**d, "features": tuple(d["features"])})
        if r.features != FEATURES:
            raise ValueError(f"read-out features {r.features} do not match this code's {FEATURES}")
        return r


def fit(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 50) -> Readout:
    """L2-penalised logistic regression of labels ``y`` (0/1) on rows of ``x`` (Newton/IRLS).

    Raises ValueError when there are fewer than two examples of either class."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[1] != len(FEATURES):
        raise ValueError(f"x must be (n, {len(FEATURES)}) with one label per row, got {x.shape} and {y.shape}")
    if min((y == 1).sum(), (y == 0).sum()) < 2:
        raise ValueError("need at least two benign and two malignant examples to fit the read-out")
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale < 1e-6] = 1.0
    z = np.hstack([np.ones((len(x), 1)), (x - mean) / scale])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], float(l2))
    penalty[0] = 0.0  # the intercept is not shrunk
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return Readout(FEATURES, mean.tolist(), scale.tolist(), w[1:].tolist(), float(w[0]), float(l2), int(len(x)))


def cross_validate(x: np.ndarray, y: np.ndarray, groups: list[str], folds: int = 5, l2: float = 1.0) -> np.ndarray:
    """Out-of-fold probabilities: ``folds`` folds of whole groups (series), each predicted by a
    read-out fitted on the others (used to choose and report the read-out on training data
    only)."""
    return cross_validate_on(x, y, groups, x, groups, folds, l2)


def fold_numbers(groups: list[str], folds: int = 5, all_groups=None) -> np.ndarray:
    """The fold of each item: group ``i`` in the sorted order of ``all_groups`` (default: the
    groups given) falls in fold ``i mod folds``."""
    fold_of = {g: i % folds for i, g in enumerate(sorted(set(groups if all_groups is None else all_groups)))}
    return np.array([fold_of[g] for g in groups], int)


def group_folds(groups: list[str], folds: int = 5):
    """The test masks (bool, one per item) of ``folds`` folds of whole groups (series): group
    ``i`` in sorted order falls in fold ``i mod folds``; a fold with no test or no training item
    is left out."""
    f = fold_numbers(groups, folds)
    for k in range(folds):
        test = f == k
        if test.any() and (~test).any():
            yield test


def training_features(predictor, cubes, off_centre_seed: int | None = None, progress: bool = False) -> dict:
    """Read-out features of the labelled ``cubes`` (median rule: median reader rating > 3
    malignant, < 3 benign; 3 and unrated left out) from ``predictor``'s refinement pass at each
    cube's reference centre: ``{"x": (n, 6), "y": (n,), "groups": series, "branch": (n,)}``.

    ``off_centre_seed``: instead, each cube is first cut off-centre and rescaled as the field
    protocol cuts validation cubes (:func:`model.field_eval.off_centre_cube`, drawn from this
    seed and the cube's name) -- training cubes as a user's crop shows them."""
    import hashlib

    from tqdm import tqdm

    rows = []
    for c in tqdm(cubes, desc="read-out features", disable=not progress):
        if not np.isfinite(c.median_label):
            continue
        det: dict = {}
        if off_centre_seed is None:
            predictor.describe(c.image, c.center, details=det)
        else:
            from model.field_eval import off_centre_cube

            rng = np.random.default_rng(int(hashlib.sha256(f"train{off_centre_seed}:{c.name}".encode()).hexdigest()[:8], 16))
            hu, _, scale, ref, _ = off_centre_cube(c, rng)
            predictor.describe(hu, ref, spacing=(scale,) * 3, details=det)
        rows.append((det["features"], c.median_label, c.seriesuid, det["branch_malignancy"]))
    return {"x": np.array([r[0] for r in rows]).reshape(-1, len(FEATURES)), "y": np.array([r[1] for r in rows], float),
            "groups": [r[2] for r in rows], "branch": np.array([r[3] for r in rows], float)}


def cross_validate_on(x_fit, y_fit, groups_fit, x_apply, groups_apply, folds: int = 5, l2: float = 1.0) -> np.ndarray:
    """Out-of-fold probabilities of rows ``x_apply``: each by the read-out fitted on the
    ``x_fit`` rows of the *other* folds (the fold rule of :func:`cross_validate` over the
    union of groups), so no series is predicted by a read-out that saw it."""
    x_fit, y_fit, x_apply = np.asarray(x_fit, float), np.asarray(y_fit, float), np.asarray(x_apply, float)
    union = set(groups_fit) | set(groups_apply)
    f_fit, f_app = fold_numbers(groups_fit, folds, union), fold_numbers(groups_apply, folds, union)
    out = np.full(len(x_apply), np.nan)
    for k in range(folds):
        test = f_app == k
        if test.any() and (f_fit != k).any():
            out[test] = fit(x_fit[f_fit != k], y_fit[f_fit != k], l2).probability(x_apply[test])
    return out


def fit_on_cubes(predictor, cubes, l2: float = 1.0, progress: bool = False, data: dict | None = None) -> tuple[Readout, dict]:
    """Fit the read-out on nodule cubes (:class:`model.data.Cube`, training series only) with
    ``predictor`` (a :class:`model.inference.Predictor`): the refinement pass at each cube's
    reference centre gives the features (:func:`training_features`; ``data``: features already
    computed); labels follow the median rule.

    Returns the read-out and a summary (n, series-grouped 5-fold cross-validated AUC and
    accuracy of the read-out and of the branch alone, on these cubes; ``summary["_oof"]``: the
    out-of-fold probabilities, for calibration, to be popped before storing)."""
    from model.metrics import accuracy, roc_auc

    d = data if data is not None else training_features(predictor, cubes, progress=progress)
    x, y, groups, branch = d["x"], d["y"], d["groups"], d["branch"]
    readout = fit(x, y, l2)
    oof = cross_validate(x, y, groups, l2=l2)
    summary = {
        "n": len(y), "label": "median rule (median > 3 malignant, < 3 benign)",
        "cv5_by_series": {"auc": round(roc_auc(oof, y), 4), "accuracy": round(accuracy(oof, y, 0.5), 4)},
        "branch_alone_in_sample": {"auc": round(roc_auc(branch, y), 4), "accuracy": round(accuracy(branch, y, 0.5), 4)},
        "diameter_alone_cv_free": {"auc": round(roc_auc(x[:, 0], y), 4)},
        "_oof": oof,
    }
    return readout, summary
