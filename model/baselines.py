"""Trivial baselines the network must beat (reported beside it in the model card).

* :func:`blob_candidates`: a classical detector, multi-scale scale-normalised Laplacian of
  Gaussian (LoG) blob detection inside the lung region, on the 1 mm grid.
* Malignancy from the diameter alone: the LUNA16 diameter used as the score (AUC) and a
  diameter cut fitted on the training cubes (accuracy); see :mod:`model.evaluate`.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

SIGMAS_MM = (1.5, 2.5, 4.0, 6.0)


def blob_candidates(hu: np.ndarray, region: np.ndarray, max_candidates: int = 200, sigmas=SIGMAS_MM) -> list[tuple[tuple[float, float, float], float, float]]:
    """LoG blob candidates in a (Z, Y, X) 1 mm HU array.

    Response ``-sigma^2 * LoG_sigma(I)`` (bright blobs positive) is computed on the image
    clipped to [-1000, 200] HU at 2 mm, maximised over ``sigmas``; local maxima (5 x 5 x 5
    voxels at 2 mm) inside ``region`` with centre HU > -500 become candidates.
    Returns up to ``max_candidates`` of ((z, y, x) voxel centre, score, diameter mm), score
    descending; score = response / 1000 squashed to [0, 1) by ``1 - exp(-r)``.
    """
    small = np.clip(hu[::2, ::2, ::2].astype(np.float32), -1000, 200)
    reg = region[::2, ::2, ::2]
    best = np.full(small.shape, -np.inf, np.float32)
    best_s = np.zeros(small.shape, np.float32)
    for s in sigmas:
        r = -(s / 2) ** 2 * ndi.gaussian_laplace(small, s / 2)
        better = r > best
        best[better] = r[better]
        best_s[better] = s
    peaks = (best == ndi.maximum_filter(best, size=5)) & reg & (small > -500) & (best > 0)
    idx = np.argwhere(peaks)
    scores = best[peaks]
    order = np.argsort(-scores)[:max_candidates]
    out = []
    for k in order:
        c = tuple(float(v) * 2 for v in idx[k])
        out.append((c, float(1 - np.exp(-scores[k] / 1000.0)), float(2 * np.sqrt(3) * best_s[tuple(idx[k])])))
    return out
