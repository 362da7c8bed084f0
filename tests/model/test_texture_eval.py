"""Ground-glass phantoms (model/texture_eval.py): the attenuation asked for is the one painted,
every size band and kind is covered, and a predictor that finds nothing scores 0."""
from __future__ import annotations

import json

import numpy as np

from model.phantom import make_phantom
from model import texture_eval as T


def test_ground_glass_attenuation_is_painted_as_drawn():
    ph = make_phantom(shape=(96, 160, 192), n_nodules=2, seed=5, kinds=("ground-glass", "part-solid"),
                      diameter_range=(14.0, 16.0), ggo_hu_range=(-700.0, -300.0))
    for i, nod in enumerate(ph.nodules):
        assert -700 <= nod.ggo_hu < -300
        c = np.round(nod.center).astype(int)
        shell = (ph.labels == i + 1)
        if nod.kind == "part-solid":  # the halo: voxels of the nodule away from its solid core
            zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in ph.hu.shape)]
            r2 = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2
            shell &= r2 > (nod.diameter * 0.35) ** 2
        got = float(np.median(ph.hu[shell]))  # blur and 15 HU noise around the painted value
        assert abs(got - nod.ggo_hu) < 60, (nod, got)


def test_default_phantoms_unchanged_by_the_option():
    a = make_phantom(shape=(64, 96, 128), n_nodules=2, seed=1)
    b = make_phantom(shape=(64, 96, 128), n_nodules=2, seed=1, ggo_hu_range=None)
    assert np.array_equal(a.hu, b.hu) and all(n.ggo_hu is None for n in a.nodules)


class _Blind:
    threshold = 0.3

    def __call__(self, volume, spacing, *a, **k):
        return []


def test_blind_predictor_finds_nothing_and_every_band_is_covered():
    res = T.ground_glass_phantoms(_Blind(), n_phantoms=4, shape=(128, 192, 224))
    json.dumps(res)
    assert res["nodules"] == 12 and res["false_findings_per_phantom"] == 0
    assert all(v["sensitivity"] == 0.0 for v in res["by_kind"].values())
    sizes = [r["diameter_mm"] for r in res["_rows"]]
    for lo, hi in T.SIZE_BANDS:
        assert any(lo <= d <= hi for d in sizes), (lo, hi, sizes)
    assert "ground-glass" in T.summary(res)


def test_real_predictor_finds_solid_phantom_nodules(predictor):
    res = T.ground_glass_phantoms(predictor, n_phantoms=2)
    assert res["by_kind"]["solid"]["sensitivity"] > 0
