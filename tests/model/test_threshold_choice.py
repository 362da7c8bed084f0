"""The operating threshold is chosen on training data only (issue 12, "never fitted on
validation"): :func:`model.evaluate.choose_threshold` / :func:`model.evaluate.threshold_scans`
never see a validation cube, and ``dicom-node evaluate --protocol centred --write-threshold``
writes that threshold, not the one the validation scans would give. Synthetic cubes, a
synthetic stand-in for LIDC-IDRI-0001 and a fake predictor: no shared data, a few seconds."""
from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage as ndi

from model import data as D
from model import evaluate as E


def _uids(n_train: int, n_val: int) -> tuple[list[str], list[str]]:
    train, val, i = [], [], 0
    while len(train) < n_train or len(val) < n_val:
        uid = f"1.2.826.0.1.3680043.99.{i}"
        (val if D.split_by_series([uid]) else train).append(uid)
        i += 1
    return train[:n_train], val[:n_val]


def _cube(uid: str, k: int) -> D.Cube:
    img = np.full((40, 40, 40), -850, np.int16)
    zz, yy, xx = np.ogrid[:40, :40, :40]
    m = (zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 16
    img[m] = 40
    return D.Cube(f"{uid}-{k}.nii.gz", uid, img, m, (20.0, 20.0, 20.0), 8.0, [2], 2.0, False)


@pytest.fixture
def cubes():
    tr, va = _uids(8, 4)
    return [_cube(u, k) for u in tr for k in range(2)] + [_cube(u, k) for u in va for k in range(2)]


@pytest.fixture
def fake_lidc(monkeypatch, tmp_path):
    """LIDC-IDRI-0001 replaced by a 120 x 96 x 96 aerated block, origin z -220 mm: the first
    40 slices are the 'validation part' (z < -180 mm), the rest the training part."""
    hu = np.full((120, 96, 96), -850, np.int16)
    region = np.zeros(hu.shape, bool)
    region[2:-2, 4:-4, 4:-4] = True
    monkeypatch.setattr(D, "lidc_0001_iso", lambda: (hu.copy(), region.copy(), (0.0, 0.0, -220.0)))
    monkeypatch.setattr(D, "LIDC_0001_XML", tmp_path / "absent.xml")
    monkeypatch.setattr(D, "LIDC_0001_NODULE_MM", (48.0, 48.0, -130.0))  # z index 90: in the training part
    return hu


class FakePredictor:
    """Finds every bright blob (score 0.8) and adds false positives at fixed places with
    scores 0.6, 0.4, 0.2: the 1-FP-per-scan rule gives 0.6 on any scan set."""

    threshold, max_findings, readout = 0.5, 10, None

    def __init__(self, *a, **k):
        self.volumes = []

    def __call__(self, hu, spacing):
        self.volumes.append(hu.shape)
        lab, n = ndi.label(hu > -300)
        out = [SimpleNamespace(center_voxel=tuple(c), score=0.8) for c in ndi.center_of_mass(hu > -300, lab, range(1, n + 1))]
        return out + [SimpleNamespace(center_voxel=(1.0, 1.0 + 3 * i, 1.0), score=s) for i, s in enumerate((0.6, 0.4, 0.2))]


def test_threshold_scans_refuse_validation_cubes(cubes):
    val_series = D.split_cubes(cubes)[0]
    with pytest.raises(ValueError, match="validation series"):
        next(E.threshold_scans([c for c in cubes if c.seriesuid in val_series][:1]))
    with pytest.raises(ValueError, match="validation series"):
        next(E.threshold_scans(cubes))


def test_choose_threshold_sees_training_cubes_in_the_training_part_only(cubes, fake_lidc, monkeypatch):
    val_series = D.split_cubes(cubes)[0]
    assert val_series, "the synthetic set needs validation series"
    pasted, bases = [], []
    real_paste = E._paste_all

    def spy(name, hu, region, rng, take):
        pasted.extend(c.seriesuid for c in take)
        bases.append(hu.shape)
        return real_paste(name, hu, region, rng, take)

    monkeypatch.setattr(E, "_paste_all", spy)
    pred = FakePredictor()
    res = E.choose_threshold(pred, cubes, max_lidc=2)
    assert pasted and not set(pasted) & val_series
    assert set(pasted) <= {c.seriesuid for c in cubes} - val_series
    # the training part only: z >= -180 mm is slice 40 on, 80 of the 120 slices
    assert bases == [(80, 96, 96)] * 2 and pred.volumes == bases
    assert res["threshold"] == 0.6 and res["lidc_scans"] == 2 and res["scans_used"] == "lidc_background"
    assert "training cubes only" in res["data"] and res["nodules"] == len(pasted)
    assert res["at_threshold"]["fp_per_scan"] <= 1.0
    assert (pred.threshold, pred.max_findings) == (0.5, 10)  # restored


def test_choose_threshold_falls_back_to_the_training_phantoms(cubes, monkeypatch):
    def absent():
        raise FileNotFoundError("no LIDC-IDRI-0001")

    monkeypatch.setattr(D, "lidc_0001_iso", absent)
    made = []
    import model.phantom as P

    def phantom(seed, n_nodules=0):
        made.append(seed)
        hu = np.full((64, 64, 64), -850, np.int16)
        lungs = np.zeros(hu.shape, bool)
        lungs[4:-4, 4:-4, 4:-4] = True
        return SimpleNamespace(hu=hu, lungs=lungs)

    monkeypatch.setattr(P, "make_phantom", phantom)
    res = E.choose_threshold(FakePredictor(), cubes, max_lidc=3, train_seed=0, train_phantoms=2)
    assert made == E.training_phantom_seeds(0, 2) and res["phantom_scans"] == 3 and res["scans_used"] == "all"


def test_training_phantom_seeds_are_trainings_and_not_validations(monkeypatch):
    import model.phantom as P
    from model import train as T

    made = []

    def phantom(seed, n_nodules=0):
        made.append(seed)
        return SimpleNamespace(hu=np.full((16, 16, 16), -850, np.int16), lungs=np.ones((16, 16, 16), bool))

    monkeypatch.setattr(P, "make_phantom", phantom)
    for seed, n in ((0, 2), (3, 5)):
        made.clear()
        T.phantom_backgrounds(n, seed)
        assert made == E.training_phantom_seeds(seed, n)
        validation = {90_000 + seed * 1000 + k for k in range(200)}  # model.evaluate.validation_scans
        assert not set(made) & validation


def test_write_threshold_stores_the_training_choice_not_the_validation_one(cubes, monkeypatch, tmp_path):
    """The old CLI stored the threshold the validation scans gave (here 0.9); it must store
    choose_threshold's, with what it was chosen on, and read the validation at it."""
    import model.inference as I
    from dicom_node.commands import evaluate as cmd

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    weights.with_suffix(".json").write_text(json.dumps({"config": {"seed": 0, "phantoms": 2}, "threshold": 0.9}))
    monkeypatch.setattr(I, "Predictor", FakePredictor)
    monkeypatch.setattr(D, "load_cubes", lambda *a, **k: cubes)
    seen = {}

    def choose(predictor, cs, **kw):
        seen["choose_cubes"] = cs
        return {"threshold": 0.345, "data": "training cubes only (test)", "scans": 2, "seed": kw.get("seed"), "froc": {}}

    def evaluate(predictor, **kw):
        seen["evaluate_threshold"] = predictor.threshold
        return {"detection": {"operating_threshold": predictor.threshold, "operating_threshold_1fp": 0.9,
                              "operating_point_scans": "lidc_background"},
                "malignancy": {}, "segmentation": {}, "diameter": {}, "_curves": {}}

    monkeypatch.setattr(E, "choose_threshold", choose)
    monkeypatch.setattr(E, "evaluate", evaluate)
    monkeypatch.setattr(E, "lidc_end_to_end", lambda p, figure_path=None: {"threshold": p.threshold})
    monkeypatch.setattr(E, "plot_froc", lambda r, p: None)
    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    args = parser.parse_args(["evaluate", "--protocol", "centred", "--write-threshold", "--weights", str(weights),
                              "--out", str(tmp_path / "out"), "--threads", "1"])
    assert args.func(args) == 0
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert meta["threshold"] == 0.345 and seen["evaluate_threshold"] == 0.345
    assert "training cubes" in meta["threshold_source"]["data"] and meta["threshold_source"]["scans"] == 2
    assert "validation" not in meta["note"] or "training" in meta["note"]
    out = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert out["threshold_choice"]["threshold"] == 0.345 and out["lidc_idri_0001_end_to_end"]["threshold"] == 0.345
