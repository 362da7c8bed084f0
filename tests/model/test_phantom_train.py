"""The synthetic chest phantom, the lung region, the blob baseline, and a training smoke test
(seconds) including resume."""
import json

import numpy as np
import pytest

from model.baselines import blob_candidates
from model.lungs import bounding_box, lung_region
from model.phantom import KINDS, make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(96, 160, 192), n_nodules=5, seed=4, diameter_range=(6.0, 12.0))


def test_phantom_contents(phantom):
    hu = phantom.hu
    assert hu.dtype == np.int16
    assert len(phantom.nodules) == 5
    assert sorted(n.kind for n in phantom.nodules) == sorted(KINDS)
    lung_vals = hu[phantom.lungs & (phantom.labels == 0)]
    assert -900 < np.median(lung_vals) < -780  # aerated lung
    assert np.percentile(lung_vals, 99.5) > -300  # with vessels inside
    for i, n in enumerate(phantom.nodules, start=1):
        c = tuple(int(round(v)) for v in n.center)
        assert phantom.labels[c] == i
        vol = (phantom.labels == i).sum()
        assert 0.5 < vol / (np.pi / 6 * n.diameter**3) < 1.6
        core = hu[c]
        expected = {"solid": (-100, 150), "spiculated": (-100, 150), "calcified": (250, 600),
                    "part-solid": (-100, 150), "ground-glass": (-750, -450)}[n.kind]
        assert expected[0] < core < expected[1], (n.kind, core)


def test_lung_region_covers_the_lungs_and_their_nodules(phantom):
    region = lung_region(phantom.hu)
    assert (region & phantom.lungs).sum() / phantom.lungs.sum() > 0.97
    assert region[phantom.labels > 0].all()
    box = bounding_box(region)
    assert box[2].stop - box[2].start < phantom.hu.shape[2]  # the body outside is cropped away


def test_blob_baseline_finds_solid_phantom_nodules(phantom):
    cands = blob_candidates(phantom.hu, lung_region(phantom.hu))
    centres = np.array([c for c, _, _ in cands])
    for n in phantom.nodules:
        if n.kind in ("solid", "calcified"):
            assert np.linalg.norm(centres - np.asarray(n.center), axis=1).min() <= n.diameter / 2


def test_training_smoke_and_resume(tmp_path, luna_cubes):
    from model.train import TrainConfig, load_weights, train

    cfg = TrainConfig(out_dir=str(tmp_path), steps=3, batch_size=2, crop=16, widths=(4, 8, 8), mask_width=2,
                      limit_cubes=6, phantoms=0, use_lidc_background=False, workers=0, checkpoint_every=10,
                      fit_readout=False)
    assert train(cfg, progress=False, stop_after=2) is None  # interrupted after 2 steps
    assert (tmp_path / "config.json").exists() and (tmp_path / "checkpoint.pt").exists()
    hist = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [1, 2]
    path = train(cfg, resume=True, progress=False)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["config"]["steps"] == 3 and meta["git_revision"] and meta["torch"]
    hist = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [1, 2, 3]  # resumed at 2, not restarted
    cfg.steps = 5  # a longer schedule on resume
    train(cfg, resume=True, progress=False)
    hist = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5]
    assert (tmp_path / "config.resume-3.json").exists()
    net, meta = load_weights(path)
    assert not net.training and meta["config"]["widths"] == [4, 8, 8]


def test_readout_fitted_on_training_cubes_and_applied(tmp_path, luna_cubes):
    """The read-out is fitted on training cubes (median-rule labels), stored in the weights'
    JSON and applied by the Predictor: its malignancy is the read-out of the features."""
    from model.inference import Predictor
    from model.readout import FEATURES, Readout
    from model.train import TrainConfig, fit_readout, train

    cfg = TrainConfig(out_dir=str(tmp_path), steps=2, batch_size=2, crop=16, widths=(4, 8, 8), mask_width=2,
                      limit_cubes=6, phantoms=0, use_lidc_background=False, workers=0, fit_readout=False)
    path = train(cfg, progress=False)
    cubes = [c for c in luna_cubes if c.median in (1.0, 2.0, 4.0, 5.0)][:24]
    summary = fit_readout(path, train_cubes=cubes)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert summary["n"] == 24 and meta["readout"]["features"] == list(FEATURES)
    assert 0 <= summary["cv5_by_series"]["auc"] <= 1
    p = Predictor(path)
    assert isinstance(p.readout, Readout)
    det = {}
    f = p.describe(cubes[0].image, cubes[0].center, details=det)
    raw = float(p.readout.probability(det["features"])[0])
    assert det["uncalibrated_malignancy"] == pytest.approx(raw)
    # the read-out's probability through the calibrator fitted beside it (training folds only)
    assert meta["calibration"]["method"] in ("identity", "temperature", "platt", "isotonic")
    assert f.malignancy == pytest.approx(float(p.calibration(raw)))
    assert 0 <= det["branch_malignancy"] <= 1


@pytest.mark.parametrize("stage_width", [2, 3])
def test_mask_stage_trains_only_the_mask_path(tmp_path, luna_cubes, stage_width):
    """The second stage adds a full-resolution block to the mask path (of the same or a new
    width) and trains only that path: detection, size and malignancy outputs stay
    bit-identical to the first stage."""
    import torch

    from model.train import TrainConfig, load_weights, train, train_mask_head

    small = dict(batch_size=2, crop=16, widths=(4, 8, 8), limit_cubes=6, phantoms=0,
                 use_lidc_background=False, workers=0, fit_readout=False)
    first = train(TrainConfig(out_dir=str(tmp_path / "a"), steps=2, mask_blocks=0, mask_width=2, **small), progress=False)
    second = train_mask_head(TrainConfig(out_dir=str(tmp_path / "b"), steps=3, mask_blocks=1, mask_width=stage_width, **small),
                             first, progress=False)
    a, _ = load_weights(first)
    b, meta = load_weights(second)
    assert meta["config"]["mask_blocks"] == 1 and meta["mask_stage"]["init"] == str(first)
    assert meta["config"]["mask_width"] == stage_width == b.mask_out[-1].in_channels
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        oa, ob = a(x), b(x)
    for k in ("heatmap", "offset", "size", "malignancy"):
        assert torch.equal(oa[k], ob[k]), k
    assert not torch.equal(oa["mask"], ob["mask"])
