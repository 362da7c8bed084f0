"""The lung region's fast paths give what the plain whole-grid steps give."""
import numpy as np
import pytest
from scipy import ndimage as ndi

from model.lungs import fill_holes_slicewise, lung_region
from model.phantom import make_phantom


def _per_slice(mask):
    return np.stack([ndi.binary_fill_holes(s) for s in mask])


def test_fill_holes_slicewise_equals_scipy_slice_by_slice():
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.7):
        mask = ndi.binary_opening(rng.random((12, 40, 36)) < density)
        np.testing.assert_array_equal(fill_holes_slicewise(mask), _per_slice(mask))
    ring = np.zeros((3, 9, 9), bool)
    ring[1, 2:7, 2:7] = True
    ring[1, 3:6, 3:6] = False  # a hole in one slice only; the other slices stay empty
    out = fill_holes_slicewise(ring)
    assert out[1, 2:7, 2:7].all() and not out[0].any() and not out[2].any()


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(96, 160, 192), n_nodules=3, seed=5, diameter_range=(6.0, 12.0))


def test_lung_region_does_not_depend_on_the_air_around_the_body(phantom):
    """lung_region works on the body's bounding box: more air around the body (an even number
    of 1 mm voxels, so the 2 mm grid is the same) must not change the region."""
    region = lung_region(phantom.hu)
    pad = 24
    padded = np.pad(phantom.hu, pad, constant_values=-1000)
    wide = lung_region(padded)
    np.testing.assert_array_equal(wide[pad:-pad, pad:-pad, pad:-pad], region)
    assert region.any()


def test_coarse_region_reads_as_the_full_mask():
    """The predictor reads the 2 mm region at 1 mm: every voxel and every sub-box's bounding
    box must be those of the upsampled mask (odd extents included)."""
    from model.lungs import Region, bounding_box

    rng = np.random.default_rng(1)
    coarse = ndi.binary_opening(rng.random((9, 12, 10)) < 0.4)
    region = Region(coarse, (17, 23, 20))  # odd extents: the last 2 mm voxel half used
    full = region.full()
    assert full.shape == (17, 23, 20)
    for idx in [(0, 0, 0), (16, 22, 19), (5, 11, 8), (16, 0, 19)]:
        assert region[idx] == full[idx]
    assert region.bounding_box() == bounding_box(full)
    for _ in range(200):
        lo = rng.integers(0, [16, 22, 19])
        hi = lo + 1 + rng.integers(0, np.array([17, 23, 20]) - lo)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        assert region.bounding_box(box) == bounding_box(full[box]), box
