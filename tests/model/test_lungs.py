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
