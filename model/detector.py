"""Anchor-free detection targets and decoding for Res-MTNet (CenterNet-style).

Conventions: voxel coordinates are continuous (z, y, x) indices into the network input, voxel
``i`` having its centre at ``i``. A nodule with centre ``c`` (voxels) and diameter ``d``
(voxels; 1 voxel = 1 mm for the 1 mm isotropic CT grid) is assigned to the heatmap cell
``floor(c / s)`` (``s`` = :data:`model.network.HEATMAP_STRIDE`), whose offset target is
``c / s - floor(c / s)`` in [0, 1) and size target ``log(d)``. The heatmap target is a Gaussian
around ``c / s`` whose sigma grows with the nodule radius; the assigned cell is exactly 1.
Malignancy is supervised on the stride-4 cells inside the nodule's core (radius ``max(1, r/2)``
cells) and on the 2^dims cells around the centre, and read back there by trilinear interpolation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.network import HEATMAP_STRIDE, MALIGNANCY_STRIDE


@dataclass
class NoduleTarget:
    """One nodule in a training crop.

    center: (z, y, x) continuous voxel index in the crop; may lie outside the crop.
    diameter: voxels (mm on the 1 mm grid).
    malignancy: target probability in [0, 1], or NaN when unlabelled (no malignancy loss).
    """

    center: tuple[float, float, float]
    diameter: float
    malignancy: float = float("nan")


def heatmap_sigma(diameter: float, stride: int = HEATMAP_STRIDE) -> float:
    """Gaussian sigma (cells) of the heatmap target for a nodule of ``diameter`` voxels."""
    return max(0.75, diameter / (2.0 * stride) / 2.0)


def make_targets(shape: tuple[int, ...], nodules: list[NoduleTarget]) -> dict[str, torch.Tensor]:
    """Dense targets for one crop of spatial ``shape`` (D, H, W) voxels.

    Returns tensors without batch axis:
      heatmap (1, D/2, H/2, W/2) in [0, 1]; offset (3, ...) ; size (1, ...) ; reg_mask (1, ...)
      1 at assigned cells; malignancy (1, D/4, H/4, W/4) target; mal_weight (1, ...) 0/1.
    Nodules whose centre lies outside the crop are ignored (they contribute no peak).
    """
    dims = len(shape)
    s = HEATMAP_STRIDE
    g = tuple(n // s for n in shape)
    heat = np.zeros(g, np.float32)
    offset = np.zeros((dims,) + g, np.float32)
    size = np.zeros((1,) + g, np.float32)
    reg = np.zeros((1,) + g, np.float32)
    gm = tuple(n // MALIGNANCY_STRIDE for n in shape)
    mal = np.zeros((1,) + gm, np.float32)
    malw = np.zeros((1,) + gm, np.float32)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in g], indexing="ij")
    grids_m = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in gm], indexing="ij")
    for nod in nodules:
        c = np.asarray(nod.center, np.float32)
        if np.any(c < 0) or np.any(c > np.asarray(shape) - 1):
            continue
        cc = c / s
        cell = np.minimum(np.floor(cc).astype(int), np.asarray(g) - 1)
        sigma = heatmap_sigma(nod.diameter)
        d2 = sum((grids[i] - cc[i]) ** 2 for i in range(dims))
        heat = np.maximum(heat, np.exp(-d2 / (2 * sigma**2)))
        heat[tuple(cell)] = 1.0
        offset[(slice(None),) + tuple(cell)] = cc - cell
        size[(0,) + tuple(cell)] = np.log(max(nod.diameter, 1.0))
        reg[(0,) + tuple(cell)] = 1.0
        if np.isfinite(nod.malignancy):
            cm = c / MALIGNANCY_STRIDE
            rad = max(1.0, nod.diameter / (2.0 * MALIGNANCY_STRIDE) / 2.0)
            inside = sum((grids_m[i] - cm[i]) ** 2 for i in range(dims)) <= rad**2
            # the cells that the trilinear read-out at the centre interpolates between
            base = np.floor(cm).astype(int)
            for corner in range(2**dims):
                cell_m = tuple(int(min(max(base[i] + ((corner >> i) & 1), 0), gm[i] - 1)) for i in range(dims))
                inside[cell_m] = True
            mal[0][inside] = nod.malignancy
            malw[0][inside] = 1.0
    return {
        "heatmap": torch.from_numpy(heat[None]),
        "offset": torch.from_numpy(offset),
        "size": torch.from_numpy(size),
        "reg_mask": torch.from_numpy(reg),
        "malignancy": torch.from_numpy(mal),
        "mal_weight": torch.from_numpy(malw),
    }


@dataclass
class Detection:
    """A decoded detection in input voxel coordinates.

    center: (z, y, x) continuous voxel index; diameter: voxels; score, malignancy in [0, 1].
    """

    center: tuple[float, float, float]
    diameter: float
    score: float
    malignancy: float


def sample_map(m: torch.Tensor, pos: np.ndarray, stride: int) -> float:
    """Trilinear sample of map ``m`` (C=1, *G) at voxel position ``pos`` (cell centre at s*i)."""
    g = np.asarray(m.shape[1:], np.float32)
    cell = np.clip(pos / stride, 0, g - 1)
    lo = np.floor(cell).astype(int)
    hi = np.minimum(lo + 1, g.astype(int) - 1)
    w = cell - lo
    val = 0.0
    dims = len(g)
    for corner in range(2**dims):
        bits = [(corner >> i) & 1 for i in range(dims)]
        idx = tuple(hi[i] if bits[i] else lo[i] for i in range(dims))
        wt = float(np.prod([w[i] if bits[i] else 1 - w[i] for i in range(dims)]))
        val += wt * float(m[(0,) + idx])
    return val


def peak_cells(heatmap: torch.Tensor, threshold: float, max_detections: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch item: (cells (K, dims) int, scores (K,)) of the local maxima of
    ``sigmoid(heatmap)`` (B, 1, *G) over a 3-cell neighbourhood that reach ``threshold``, the
    ``max_detections`` best, highest first."""
    heat = torch.sigmoid(heatmap)
    dims = heat.dim() - 2
    pool = F.max_pool3d if dims == 3 else F.max_pool2d
    peaks = (heat == pool(heat, 3, stride=1, padding=1)) & (heat >= threshold)
    results = []
    for b in range(heat.shape[0]):
        idx = torch.nonzero(peaks[b, 0])
        scores = heat[b, 0][tuple(idx.T)]
        order = torch.argsort(scores, descending=True)[:max_detections]
        results.append((idx[order], scores[order]))
    return results


def detections(cells: torch.Tensor, scores: torch.Tensor, offset: torch.Tensor, size: torch.Tensor) -> list[Detection]:
    """Detections from peak ``cells`` (K, dims) with their ``scores`` (K,), the offset head
    (K, dims) and size head (K,) there: centre ``(cell + offset) * stride`` voxels, diameter
    ``exp(size)``, malignancy NaN (:func:`decode` samples the malignancy map)."""
    centres = (cells.float() + offset.float()) * HEATMAP_STRIDE
    diams = torch.exp(size.float())
    return [Detection(tuple(float(v) for v in centres[k]), float(diams[k]), float(scores[k]), float("nan"))
            for k in range(cells.shape[0])]


def decode(out: dict[str, torch.Tensor], threshold: float = 0.05, max_detections: int = 100) -> list[list[Detection]]:
    """Turn head outputs (with batch axis) into detections per batch item.

    Peaks are local maxima of ``sigmoid(heatmap)`` over a 3-cell neighbourhood above
    ``threshold`` (:func:`peak_cells`); each gives centre ``(cell + offset) * stride``, diameter
    ``exp(size)`` and malignancy ``sigmoid`` of the malignancy map sampled at the centre. Sorted
    by score.
    """
    mal = torch.sigmoid(out["malignancy"])
    results = []
    for b, (cells, scores) in enumerate(peak_cells(out["heatmap"], threshold, max_detections)):
        offset = out["offset"][b][(slice(None),) + tuple(cells.T)].T  # (K, dims)
        size = out["size"][b, 0][tuple(cells.T)]
        dets = detections(cells, scores, offset, size)
        results.append([Detection(d.center, d.diameter, d.score, sample_map(mal[b], np.asarray(d.center), MALIGNANCY_STRIDE))
                        for d in dets])
    return results


def suppress(dets: list, factor: float = 0.5, centre=lambda d: d.center, diameter=lambda d: d.diameter) -> list:
    """Greedy non-maximum suppression by distance: drop a detection whose centre lies within
    ``factor`` x the larger diameter (at least 3 units) of a higher-scoring kept one.

    ``dets``: :class:`Detection` (voxels), or any objects with a ``score`` whose centre and
    diameter (same unit, e.g. mm) the ``centre`` and ``diameter`` functions return."""
    kept: list = []
    for d in sorted(dets, key=lambda d: -d.score):
        c = np.asarray(centre(d))
        if all(np.linalg.norm(c - np.asarray(centre(k))) > max(3.0, factor * max(diameter(d), diameter(k))) for k in kept):
            kept.append(d)
    return kept
