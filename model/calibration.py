"""Calibration of the malignancy probability: what the read-out says -> what it means.

The read-out (:mod:`model.readout`) is a logistic regression; on data it was not fitted on its
probabilities can be too sure or not sure enough. A calibrator is a monotone map ``p -> q`` in
[0, 1], fitted on *training-only out-of-fold* read-out probabilities (each training nodule's
probability from a read-out fitted on the other series' nodules) and chosen among:

===============  ===========================================================================
method           map
===============  ===========================================================================
``identity``     ``q = p``
``temperature``  ``q = sigmoid(logit(p) / T)`` (one number; ``a = 1 / T``, ``b = 0``)
``platt``        ``q = sigmoid(a * logit(p) + b)`` (slope and intercept)
``isotonic``     pool-adjacent-violators fit of the labels on ``p``, read back by linear
                 interpolation between the pooled blocks' (mean p, shrunk malignant
                 fraction) knots; flat beyond the first and last knot
===============  ===========================================================================

All are non-decreasing in ``p`` (``a`` is kept > 0), so the order of nodules -- every AUC --
is unchanged by temperature and Platt, and can only gain ties with isotonic. The choice is by
expected calibration error of the calibrated out-of-fold probabilities, themselves
cross-validated (:func:`choose`: the calibrator of each fold fitted on the other folds'
nodules, folds of whole series). Pure numpy; the fitted calibrator is a few numbers stored in
the weights' JSON (``"calibration"``, beside ``"readout"``) and applied by
:class:`model.inference.Predictor`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from model.readout import group_folds

METHODS = ("identity", "temperature", "platt", "isotonic")
EPS = 1e-6


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, float), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def _sigmoid(z) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, float)))


@dataclass
class Calibrator:
    """A fitted monotone map of malignancy probabilities (module docstring).

    ``a``, ``b``: slope and intercept on the logit scale (temperature, Platt; identity 1, 0);
    ``knots_p``, ``knots_q``: the isotonic map's knots (increasing ``p``, non-decreasing ``q``);
    ``n_train``: nodules it was fitted on; ``fit``: how it was chosen (figures, data)."""

    method: str = "identity"
    a: float = 1.0
    b: float = 0.0
    knots_p: list[float] = field(default_factory=list)
    knots_q: list[float] = field(default_factory=list)
    n_train: int = 0
    fit: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {METHODS}, got {self.method!r}")
        if self.method in ("temperature", "platt") and not self.a > 0:
            raise ValueError(f"calibration slope must be > 0 (monotone), got {self.a}")
        if self.method == "isotonic":
            kp, kq = np.asarray(self.knots_p, float), np.asarray(self.knots_q, float)
            if kp.size < 1 or kp.shape != kq.shape or np.any(np.diff(kp) <= 0) or np.any(np.diff(kq) < 0):
                raise ValueError("isotonic knots must be increasing in p and non-decreasing in q, of equal length")

    def __call__(self, p) -> np.ndarray:
        """Calibrated probabilities of ``p`` (scalar or array, in [0, 1]); same shape."""
        p = np.asarray(p, float)
        if self.method == "identity":
            q = p
        elif self.method == "isotonic":
            q = np.interp(p, self.knots_p, self.knots_q)
        else:
            q = _sigmoid(self.a * _logit(p) + self.b)
        return np.clip(q, 0.0, 1.0)

    def to_json(self) -> dict:
        d = asdict(self)
        d["knots_p"] = [round(float(v), 6) for v in self.knots_p]
        d["knots_q"] = [round(float(v), 6) for v in self.knots_q]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Calibrator":
        return cls(**{k: d[k] for k in ("method", "a", "b", "knots_p", "knots_q", "n_train", "fit") if k in d})


def logistic_1d(z: np.ndarray, y: np.ndarray, intercept: bool, l2: float = 1e-3, iterations: int = 100) -> tuple[float, float]:
    """(a, b) of ``P(y) = sigmoid(a z + b)`` by damped Newton steps from ``a = b = 0`` (``b =
    0`` without intercept); a tiny L2 penalty keeps separable data finite."""
    X = np.stack([z, np.ones_like(z)], 1) if intercept else z[:, None]
    w = np.zeros(X.shape[1])

    def loss(w):
        t = X @ w
        return float(np.sum(np.logaddexp(0, t) - y * t) + 0.5 * l2 * w @ w)

    f = loss(w)
    for _ in range(iterations):
        p = _sigmoid(X @ w)
        g = X.T @ (p - y) + l2 * w
        H = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(X.shape[1])
        step = np.linalg.solve(H, g)
        t = 1.0
        while t > 1e-6 and loss(w - t * step) > f + 1e-12:
            t /= 2
        w = w - t * step
        f_new = loss(w)
        if abs(f - f_new) < 1e-12 or np.max(np.abs(t * step)) < 1e-10:
            break
        f = f_new
    return float(w[0]), (float(w[1]) if intercept else 0.0)


def isotonic_knots(p: np.ndarray, y: np.ndarray, prior: float = 1.0) -> tuple[list[float], list[float]]:
    """Pool-adjacent-violators fit of ``y`` on ``p``: knots (mean p of each pooled block, its
    malignant fraction shrunk towards the overall one by ``prior`` pseudo-nodules, so a small
    block at either end does not say 0 or 1 outright)."""
    order = np.argsort(p, kind="stable")
    p, y = np.asarray(p, float)[order], np.asarray(y, float)[order]
    base = float(y.mean())
    blocks: list[list[float]] = []  # [sum y, n, sum p]
    for pi, yi in zip(p, y):
        blocks.append([yi, 1.0, pi])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            s, n, sp = blocks.pop()
            blocks[-1][0] += s; blocks[-1][1] += n; blocks[-1][2] += sp
    kp = [b[2] / b[1] for b in blocks]
    kq = [(b[0] + prior * base) / (b[1] + prior) for b in blocks]
    kq = list(np.maximum.accumulate(kq))  # shrinkage can break the order by a hair
    # equal mean p in two blocks is impossible after pooling ties only if p are distinct
    kp_u, idx = np.unique(np.round(kp, 12), return_index=True)
    return [float(v) for v in kp_u], [float(kq[i]) for i in idx]


def fit(p, y, method: str) -> Calibrator:
    """A calibrator of ``method`` fitted on probabilities ``p`` and 0/1 labels ``y``."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"p and y must be 1-D of one length, got {p.shape} and {y.shape}")
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    if method != "identity" and min((y == 1).sum(), (y == 0).sum()) < 2:
        raise ValueError("need at least two benign and two malignant examples to fit a calibrator")
    if method == "identity":
        return Calibrator("identity", n_train=len(p))
    if method == "isotonic":
        kp, kq = isotonic_knots(p, y)
        return Calibrator("isotonic", knots_p=kp, knots_q=kq, n_train=len(p))
    a, b = logistic_1d(_logit(p), y, intercept=method == "platt")
    return Calibrator(method, a=max(a, 1e-3), b=b, n_train=len(p))


def ece(p, y, bins: int = 10) -> float:
    """Expected calibration error: sum over ``bins`` equal-width bins of [0, 1] of
    n_bin / n * |mean p - observed fraction| (the field protocol's definition)."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    if not len(p):
        return float("nan")
    k = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = k == b
        if sel.any():
            total += sel.sum() / len(p) * abs(p[sel].mean() - y[sel].mean())
    return float(total)


def brier(p, y) -> float:
    return float(np.mean((np.asarray(p, float) - np.asarray(y, float)) ** 2))


def log_loss(p, y) -> float:
    p, y = np.clip(np.asarray(p, float), EPS, 1 - EPS), np.asarray(y, float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def cross_validated(p, y, groups: list[str], method: str, folds: int = 5) -> np.ndarray:
    """Calibrated probabilities of each nodule by a calibrator fitted on the other folds (whole
    groups: series), the same fold rule as :func:`model.readout.cross_validate`."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    out = np.full(len(p), np.nan)
    for test in group_folds(groups, folds):
        out[test] = fit(p[~test], y[~test], method)(p[test])
    return out


def choose(p, y, groups: list[str], methods=METHODS, folds: int = 5) -> tuple[Calibrator, dict]:
    """The calibrator of lowest cross-validated ECE on (``p``, ``y``) -- training-only
    out-of-fold read-out probabilities, ``groups`` their series -- refitted on all of them;
    and the comparison (ECE, Brier score, log loss of each method, cross-validated). Ties
    (ECE within 0.001) go to the simpler method (order of :data:`METHODS`)."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    table = {}
    usable = []
    for m in methods:
        try:
            q = cross_validated(p, y, groups, m, folds)
        except ValueError:  # a fold without two of each class (tiny data sets)
            continue
        usable.append(m)
        table[m] = {"ece": round(ece(q, y), 4), "brier": round(brier(q, y), 4), "log_loss": round(log_loss(q, y), 4)}
    if not usable:
        raise ValueError("no calibration method could be cross-validated on these data")
    best = min(usable, key=lambda m: (round(table[m]["ece"], 3), METHODS.index(m)))
    cal = fit(p, y, best)
    cal.fit = {"chosen_by": f"lowest {folds}-fold (by series) cross-validated ECE on the training out-of-fold read-out probabilities",
               "n": int(len(p)), "cross_validated": table, "in_sample_ece_after": round(ece(cal(p), y), 4)}
    return cal, cal.fit
