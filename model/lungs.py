"""Classical lung-region mask, used to crop a CT to the lungs before patch-wise inference and to
sample hard negatives (vessels, pleura, airways) for training.

All functions work on a (Z, Y, X) HU array on a 1 mm isotropic grid (see
:func:`model.data.resample_to_iso`).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

# Inputs narrower than this (mm, in y or x) are treated as crops: the whole array is the region.
MIN_CHEST_EXTENT_MM = 120


def _ball(r: int) -> np.ndarray:
    g = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1]
    return (g**2).sum(0) <= r * r


def fill_holes_slicewise(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` of each z slice of a bool (Z, Y, X) mask (4-connected
    background, as its 2-D default), in one labelling of the background: a background
    component of a slice is a hole unless it touches that slice's edge."""
    st = np.zeros((3, 3, 3), bool)
    st[1] = ndi.generate_binary_structure(2, 1)
    lab, n = ndi.label(~mask, structure=st)
    outside = np.zeros(n + 1, bool)
    for edge in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        outside[edge.ravel()] = True
    outside[0] = False  # label 0: the mask itself
    return ~outside[lab]


def lung_region(hu: np.ndarray, margin_mm: int = 6) -> np.ndarray:
    """Bool (Z, Y, X) mask of the lungs, closed so that vessels and juxtapleural nodules are
    inside, dilated by ``margin_mm``. Computed at 2 mm and upsampled.

    For inputs narrower than :data:`MIN_CHEST_EXTENT_MM` (nodule crops) or where no lung air
    is found, the whole array is returned as the region.
    """
    if min(hu.shape[1:]) < MIN_CHEST_EXTENT_MM:
        return np.ones(hu.shape, bool)
    small = hu[::2, ::2, ::2]
    body = small > -500
    # the body: the largest connected non-air component, holes filled slice by slice
    lab, n = ndi.label(body)
    if n == 0:
        return np.ones(hu.shape, bool)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    largest = int(np.argmax(sizes))
    # the rest runs on the body's bounding box plus a margin of non-body voxels wider than
    # the closing (5 voxels) and the margin dilation together, so every morphological step
    # gives what it gives on the whole grid (tests/model/test_lungs.py)
    pad = 7 + max(1, margin_mm // 2)
    box = tuple(slice(max(0, sl.start - pad), min(n_, sl.stop + pad))
                for sl, n_ in zip(ndi.find_objects(lab)[largest], lab.shape))
    body = lab[box] == (1 + largest)
    grid_shape, small = small.shape, small[box]
    body = fill_holes_slicewise(body)
    air = (small < -400) & body
    air = ndi.binary_opening(air, iterations=1)
    lab, n = ndi.label(air)
    if n == 0:
        return np.ones(hu.shape, bool)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    keep = np.flatnonzero(sizes * 8 >= 20_000) + 1  # components of at least 20 ml
    if keep.size == 0:
        return np.ones(hu.shape, bool)
    lungs = np.isin(lab, keep)
    # closing by ~10 mm (5 iterations of the 18-neighbourhood at 2 mm; padded so that the
    # volume's edges do not erode it), holes filled slice by slice, then the margin
    st = ndi.generate_binary_structure(3, 2)
    lungs = np.pad(lungs, 6)
    lungs = ndi.binary_closing(lungs, structure=st, iterations=5)[6:-6, 6:-6, 6:-6]
    lungs = fill_holes_slicewise(lungs)
    if margin_mm > 0:
        lungs = ndi.binary_dilation(lungs, structure=st, iterations=max(1, margin_mm // 2))
    grid = np.zeros(grid_shape, bool)
    grid[box] = lungs
    full = np.repeat(np.repeat(np.repeat(grid, 2, 0), 2, 1), 2, 2)
    return full[: hu.shape[0], : hu.shape[1], : hu.shape[2]]


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tight bounding box of a bool mask as slices, or None when empty."""
    idx = [np.flatnonzero(mask.any(axis=tuple(j for j in range(mask.ndim) if j != i))) for i in range(mask.ndim)]
    if any(len(i) == 0 for i in idx):
        return None
    return tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)


def parenchyma_mask(hu: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Voxels of ``region`` whose 5 mm cube neighbourhood has mean HU < -650 (aerated lung:
    where a pasted nodule is visible, not inside the chest wall or mediastinum). Shared by
    training (where nodules are pasted) and evaluation (where phantom nodules are placed)."""
    return region & (ndi.uniform_filter(hu.astype(np.float32), 5) < -650)
