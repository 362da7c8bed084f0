"""Augmentation keeps image, mask and nodule centre aligned; intensity ops keep shapes."""
import numpy as np
import pytest

from model.transforms import IntensityAugment, SpatialParams, draw_spatial, map_point, normalize_hu, sample_crop


def _ball_volume(centre, radius, shape=(48, 48, 48)):
    zz, yy, xx = np.indices(shape)
    ball = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2
    hu = np.where(ball, 40.0, -850.0).astype(np.float32)
    return hu, ball


@pytest.mark.parametrize("seed", range(6))
def test_spatial_augmentation_keeps_mask_and_centre_aligned(seed):
    rng = np.random.default_rng(seed)
    centre = np.array([20.0, 27.0, 22.0])
    hu, ball = _ball_volume(centre, 5)
    params = draw_spatial(rng, 32)
    c_src = centre + rng.uniform(-4, 4, 3)
    img, msk = sample_crop(hu, ball, c_src, 32, params)
    where = map_point(centre, c_src, 32, params)
    # the mask moved with the image: the crop's bright voxels are the mask voxels
    assert ((img > -400) == msk).mean() > 0.99
    # and the mapped centre is the mask's centroid (the elastic field shifts it < 1.5 voxels)
    np.testing.assert_allclose(np.argwhere(msk).mean(0), where, atol=1.6 if params.elastic is not None else 0.35)
    # the volume scales with the zoom (radius 5 -> 5 * zoom)
    expected = 4 / 3 * np.pi * (5 * params.zoom) ** 3
    assert abs(msk.sum() - expected) / expected < 0.25


def test_identity_crop_is_a_plain_crop():
    hu, ball = _ball_volume((24.0, 24.0, 24.0), 4)
    img, msk = sample_crop(hu, ball, np.array([24.5, 24.5, 24.5]), 16, SpatialParams.identity())
    np.testing.assert_array_equal(img, hu[17:33, 17:33, 17:33])
    np.testing.assert_array_equal(msk, ball[17:33, 17:33, 17:33])


def test_intensity_augmentation_shape_and_effect():
    x = normalize_hu(np.full((1, 16, 16, 16), -500.0))
    aug = IntensityAugment(seed=3)
    outs = [aug(x.copy()) for _ in range(10)]
    assert all(o.shape == x.shape and o.dtype == np.float32 for o in outs)
    assert any(not np.allclose(o, x) for o in outs)


def test_normalize_hu_window():
    v = normalize_hu(np.array([-3000, -1000, -300, 600, 3000]))
    np.testing.assert_allclose(v, [(-1000 + 300) / 600, (-1000 + 300) / 600, 0.0, 1.5, 1.5], rtol=1e-6)
