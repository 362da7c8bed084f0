"""Evaluation metrics: LUNA16 FROC / CPM, ROC AUC, accuracy, Dice.

The FROC follows the LUNA16 protocol (Setio et al. 2017): a candidate is a hit when its centre
lies within the radius of a reference nodule; each nodule counts once (its best-scoring hit);
further hits on an already-hit nodule are neither true nor false positives; candidates that hit
an *excluded* finding (e.g. marked by fewer than 3 readers, or under 3 mm) are ignored; all
other candidates are false positives. Sensitivity is read at 1/8, 1/4, 1/2, 1, 2, 4 and 8
average false positives per scan, and the CPM is their mean.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class ScanResult:
    """Candidates and references of one scan, all in the same coordinates (mm).

    candidates: (N, 3) centres and (N,) scores; nodules: (M, 3) centres and (M,) radii;
    excluded: (K, 3) centres and (K,) radii of findings that count neither way.
    """

    cand_xyz: np.ndarray
    cand_score: np.ndarray
    nod_xyz: np.ndarray
    nod_radius: np.ndarray
    excl_xyz: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    excl_radius: np.ndarray = field(default_factory=lambda: np.zeros(0))


def match_scan(scan: ScanResult) -> tuple[np.ndarray, np.ndarray]:
    """(best hit score per nodule, -inf if missed), (scores of false positives)."""
    best = np.full(len(scan.nod_xyz), -np.inf)
    fps = []
    for c, s in zip(np.asarray(scan.cand_xyz, float).reshape(-1, 3), np.asarray(scan.cand_score, float)):
        if len(scan.nod_xyz):
            d = np.linalg.norm(np.asarray(scan.nod_xyz, float) - c, axis=1)
            hits = np.flatnonzero(d <= np.asarray(scan.nod_radius, float))
            if hits.size:
                for h in hits:
                    best[h] = max(best[h], s)
                continue
        if len(scan.excl_xyz):
            d = np.linalg.norm(np.asarray(scan.excl_xyz, float) - c, axis=1)
            if np.any(d <= np.asarray(scan.excl_radius, float)):
                continue
        fps.append(s)
    return best, np.asarray(fps, float)


@dataclass
class Froc:
    thresholds: np.ndarray  # descending candidate scores
    sensitivity: np.ndarray
    fp_per_scan: np.ndarray
    at_rates: dict[float, float]
    cpm: float
    n_nodules: int
    n_scans: int

    def to_json(self) -> dict:
        return {
            "cpm": round(self.cpm, 4),
            "sensitivity_at_fp_per_scan": {str(k): round(v, 4) for k, v in self.at_rates.items()},
            "n_nodules": self.n_nodules,
            "n_scans": self.n_scans,
            "max_sensitivity": round(float(self.sensitivity.max()) if self.sensitivity.size else 0.0, 4),
        }


def _matched(scans: list[ScanResult]) -> tuple[np.ndarray, np.ndarray]:
    """(best score of each nodule, score of each false positive) over all ``scans``
    (:func:`match_scan`)."""
    pairs = [match_scan(s) for s in scans]
    best = np.concatenate([b for b, _ in pairs]) if pairs else np.zeros(0)
    fps = np.concatenate([f for _, f in pairs]) if pairs else np.zeros(0)
    return best, fps


def at_threshold(scans: list[ScanResult], threshold: float) -> dict:
    """Sensitivity and false positives per scan with the candidates scoring >= ``threshold``."""
    best, fps = _matched(scans)
    return {"threshold": round(float(threshold), 4), "sensitivity": round(float((best >= threshold).mean()), 4) if best.size else None,
            "fp_per_scan": round(float((fps >= threshold).sum() / max(1, len(scans))), 4), "n_nodules": int(best.size), "n_scans": len(scans)}


def froc(scans: list[ScanResult], rates=FP_RATES) -> Froc:
    """FROC over scans; the sensitivity at rate ``r`` is the highest sensitivity reached with
    at most ``r`` false positives per scan on average (0 if none)."""
    best, fps = _matched(scans)
    n_nod, n_scans = len(best), max(1, len(scans))
    thr = np.unique(np.concatenate([best[np.isfinite(best)], fps]))[::-1]
    sens = np.array([(best >= t).sum() / max(1, n_nod) for t in thr])
    fpr = np.array([(fps >= t).sum() / n_scans for t in thr])
    at = {}
    for r in rates:
        ok = fpr <= r
        at[r] = float(sens[ok].max()) if ok.any() else 0.0
    return Froc(thr, sens, fpr, at, float(np.mean(list(at.values()))), n_nod, len(scans))


def threshold_at_fp_rate(f: Froc, rate: float = 1.0) -> float:
    """Lowest score threshold whose average false positives per scan is at most ``rate``."""
    ok = f.fp_per_scan <= rate
    return float(f.thresholds[ok].min()) if ok.any() else float(f.thresholds.max(initial=1.0))


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count one half); NaN if one class."""
    s = np.asarray(scores, float)
    y = np.asarray(labels, bool)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def accuracy(scores, labels, threshold: float = 0.5) -> float:
    s = np.asarray(scores, float)
    y = np.asarray(labels, bool)
    return float(((s >= threshold) == y).mean()) if y.size else float("nan")


def best_threshold(scores, labels) -> float:
    """Threshold maximising accuracy on (scores, labels) (for fitting a baseline on train)."""
    s = np.asarray(scores, float)
    cands = np.unique(s)
    accs = [accuracy(s, labels, t) for t in cands]
    return float(cands[int(np.argmax(accs))])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool arrays of the same shape (1.0 when both are empty)."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2.0 * (a & b).sum() / s)
