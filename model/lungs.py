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
    inside, dilated by ``margin_mm``. Computed at 2 mm (:func:`coarse_lung_region`) and
    upsampled.

    For inputs narrower than :data:`MIN_CHEST_EXTENT_MM` (nodule crops) or where no lung air
    is found, the whole array is returned as the region.
    """
    return coarse_lung_region(hu, margin_mm).full()


def coarse_lung_region(hu: np.ndarray, margin_mm: int = 6) -> "Region":
    """:func:`lung_region` on its 2 mm grid, without the upsampled copy (a whole CT's is
    ~40 MB)."""
    whole = Region.whole(hu.shape)
    if min(hu.shape[1:]) < MIN_CHEST_EXTENT_MM:
        return whole
    small = hu[::2, ::2, ::2]
    body = small > -500
    # the body: the largest connected non-air component, holes filled slice by slice
    lab, n = ndi.label(body)
    if n == 0:
        return whole
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
        return whole
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    keep = np.flatnonzero(sizes * 8 >= 20_000) + 1  # components of at least 20 ml
    if keep.size == 0:
        return whole
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
    return Region(grid, hu.shape)


class Region:
    """A mask on a 2 mm grid read as the 1 mm mask it stands for: 1 mm voxel ``i`` (z, y, x)
    is inside when 2 mm voxel ``i // 2`` is (``full()`` gives that mask, cut to ``shape``)."""

    def __init__(self, coarse: np.ndarray, shape: tuple[int, ...]):
        self.coarse = coarse
        self.shape = tuple(int(n) for n in shape)

    @classmethod
    def whole(cls, shape: tuple[int, ...]) -> "Region":
        """Every voxel of a grid of ``shape`` (1 mm voxels)."""
        return cls(np.ones(tuple(-(-int(n) // 2) for n in shape), bool), shape)

    def full(self) -> np.ndarray:
        full = np.repeat(np.repeat(np.repeat(self.coarse, 2, 0), 2, 1), 2, 2)
        return full[tuple(slice(0, n) for n in self.shape)]

    def __getitem__(self, idx: tuple[int, ...]) -> bool:
        """Whether the 1 mm voxel ``idx`` (integers) is inside."""
        return bool(self.coarse[tuple(int(i) // 2 for i in idx)])

    def bounding_box(self, box: tuple[slice, ...] | None = None) -> tuple[slice, ...] | None:
        """:func:`bounding_box` of ``full()[box]`` (``box``: slices with explicit starts and
        stops within ``shape``; None: everything), computed on the 2 mm grid."""
        box = box or tuple(slice(0, n) for n in self.shape)
        lo = [b.start for b in box]
        hi = [b.stop for b in box]
        sub = self.coarse[tuple(slice(a // 2, (b - 1) // 2 + 1) for a, b in zip(lo, hi))]
        out = []
        for axis, (a, b) in enumerate(zip(lo, hi)):
            proj = sub.any(axis=tuple(j for j in range(sub.ndim) if j != axis))
            on = np.flatnonzero(proj[np.arange(a, b) // 2 - a // 2])  # 1 mm indices a..b-1
            if on.size == 0:
                return None
            out.append(slice(int(on[0]), int(on[-1]) + 1))
        return tuple(out)


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
