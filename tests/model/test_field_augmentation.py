"""Field augmentation of training (issue 12): size-balanced cube sampling, resolution jitter,
wider zoom, off-centre positives, fine-tuning from weights."""
import json

import numpy as np

from model import data as D
from model.train import SIZE_BANDS_MM, Sampler, TrainConfig, cube_weights, resolution_jitter


def _cube(d):
    img = np.full((40, 40, 40), -800, np.int16)
    return D.Cube(name=f"c{d}", seriesuid=f"s{d}", image=img, mask=np.zeros_like(img, bool), center=(19.5, 19.5, 19.5),
                  diameter_mm=float(d), ratings=[], median=float("nan"), is_malignant=False)


def test_size_balanced_weights_give_each_band_the_same_share():
    cubes = [_cube(d) for d in [4] * 30 + [8] * 10 + [25] * 2]
    w = cube_weights(cubes, 1.0)
    shares = [w[[lo <= c.diameter_mm < hi for c in cubes]].sum() for lo, hi in SIZE_BANDS_MM]
    populated = [s for s in shares if s > 0]
    assert np.allclose(populated, 1 / 3)
    assert np.allclose(cube_weights(cubes, 0.0), 1 / len(cubes))


def test_resolution_jitter_blurs_a_small_nodule_and_keeps_the_shape():
    img = np.full((32, 32, 32), -800.0, np.float32)
    zz, yy, xx = np.ogrid[:32, :32, :32]
    img[(zz - 16) ** 2 + (yy - 16) ** 2 + (xx - 16) ** 2 <= 2 ** 2] = 50.0
    out = resolution_jitter(img, 1.25)
    assert out.shape == img.shape and out.dtype == np.float32
    assert out[16, 16, 16] < 50.0 and out[16, 16, 16] > -800.0  # contrast lost, nodule still there
    assert np.allclose(resolution_jitter(img, 1.0), img, atol=1e-3)


def test_sampler_with_field_augmentation_draws_valid_samples():
    cubes = [_cube(d) for d in (4, 5, 8, 12, 25)]
    cfg = TrainConfig(crop=32, size_balance=1.0, zoom_range=(0.8, 1.25), resolution_jitter=1.0, off_centre=1.0)
    s = Sampler(cubes, [], cfg, seed=0)
    for _ in range(4):
        t = s.sample()
        assert t["image"].shape == (1, 32, 32, 32) and np.isfinite(t["image"].numpy()).all()


def test_fine_tune_starts_from_init_weights(tmp_path, luna_cubes):
    import torch

    from model.train import load_weights, train

    base = TrainConfig(out_dir=str(tmp_path / "a"), steps=1, batch_size=2, crop=16, widths=(4, 8, 8), mask_width=2,
                       limit_cubes=6, phantoms=0, use_lidc_background=False, workers=0, fit_readout=False, lr=1e-9)
    first = train(base, progress=False)
    tuned = TrainConfig(out_dir=str(tmp_path / "b"), steps=1, batch_size=2, crop=16, limit_cubes=6, phantoms=0,
                        use_lidc_background=False, workers=0, fit_readout=False, lr=1e-9, init=str(first),
                        size_balance=1.0, resolution_jitter=0.5, off_centre=0.5)
    second = train(tuned, progress=False)
    a, _ = load_weights(first)
    b, meta = load_weights(second)
    assert meta["config"]["widths"] == [4, 8, 8]  # the init's architecture, not the default one
    assert meta["init"]["weights"] == str(first)
    conv = "stem.0.weight" if "stem.0.weight" in a.state_dict() else next(k for k in a.state_dict() if k.endswith("weight"))
    assert torch.allclose(a.state_dict()[conv], b.state_dict()[conv], atol=1e-3)  # lr ~0: still the init
    assert json.loads(second.with_suffix(".json").read_text())["config"]["size_balance"] == 1.0
