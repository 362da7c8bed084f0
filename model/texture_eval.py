"""Ground-glass and part-solid nodules apart: synthetic chest phantoms with sub-solid nodules.

The LUNA16 cubes carry no reader texture rating, and the few real sub-solid cubes (mean HU
inside the reference mask below -300) are an upper bound at best; these phantoms give nodules
whose texture is known. Each phantom (:func:`model.phantom.make_phantom`, 1 mm isotropic,
(Z, Y, X) = ``shape`` voxels = mm) holds ``per_phantom`` nodules cycling through
``ground-glass``, ``part-solid`` and ``solid`` (the control); phantom ``k`` draws its diameters
uniformly within size band ``k mod 4`` of :data:`SIZE_BANDS` (mm), so every band is covered;
the ground-glass attenuation (the halo's, for part-solid) is uniform in ``hu_range`` HU. The whole :class:`~model.inference.Predictor` runs at its operating threshold
on each phantom volume; a nodule is *found* when a finding's centre (``center_voxel``, mm on
this grid) lies within its radius; any other finding is a false finding.

The phantoms are not patients: smooth ellipsoids in synthetic parenchyma, no vessels merging
into them, no partial-volume from thick slices. A miss here is a real miss; a hit says only
that the texture alone does not hide the nodule.
"""
from __future__ import annotations

import time

import numpy as np

from model.phantom import make_phantom

KINDS = ("ground-glass", "part-solid", "solid")
HU_BANDS = ((-700, -550), (-550, -400), (-400, -300))
SIZE_BANDS = ((6, 10), (10, 20), (20, 30), (30, 40))


def _rate(rows: list[dict]) -> float | None:
    return round(float(np.mean([r["found"] for r in rows])), 4) if rows else None


def ground_glass_phantoms(predictor, n_phantoms: int = 8, per_phantom: int = 3, seed: int = 0,
                          shape: tuple[int, int, int] = (160, 224, 288), hu_range=(-700.0, -300.0)) -> dict:
    """Sensitivity on synthetic sub-solid nodules (module docstring): a JSON-able dict."""
    t0 = time.time()
    rows, false_findings = [], []
    for k in range(n_phantoms):
        ph = make_phantom(shape=shape, n_nodules=per_phantom, seed=70_000 + seed * 1000 + k, kinds=KINDS,
                          diameter_range=SIZE_BANDS[k % len(SIZE_BANDS)], ggo_hu_range=hu_range)
        findings = predictor(ph.hu, (1.0, 1.0, 1.0))
        matched = set()
        for nod in ph.nodules:
            c = np.asarray(nod.center)
            hits = [i for i, f in enumerate(findings) if np.linalg.norm(np.asarray(f.center_voxel) - c) <= nod.diameter / 2]
            matched.update(hits)
            best = max((findings[i] for i in hits), key=lambda f: f.score, default=None)
            rows.append({"phantom": k, "kind": nod.kind, "diameter_mm": round(nod.diameter, 2),
                         "ggo_hu": None if nod.ggo_hu is None else round(nod.ggo_hu, 1), "found": best is not None,
                         "score": None if best is None else round(float(best.score), 4),
                         "diameter_found_mm": None if best is None else round(float(best.diameter_mm), 2)})
        false_findings.append(len(findings) - len(matched))
    by_kind = {kind: {"n": len(sel), "sensitivity": _rate(sel)} for kind in KINDS
               for sel in [[r for r in rows if r["kind"] == kind]]}
    sub = [r for r in rows if r["ggo_hu"] is not None]
    by_hu = {f"{lo}..{hi} HU": {"n": len(sel), "sensitivity": _rate(sel)} for lo, hi in HU_BANDS
             for sel in [[r for r in sub if lo <= r["ggo_hu"] < hi]]}
    by_size = {f"{lo}-{hi} mm": {kind: {"n": len(sel), "sensitivity": _rate(sel)} for kind in KINDS
                                 for sel in [[r for r in rows if r["kind"] == kind and lo <= r["diameter_mm"] <= hi]]}
               for lo, hi in SIZE_BANDS}
    return {"phantoms": n_phantoms, "nodules": len(rows), "seed": seed, "hu_range": list(hu_range),
            "size_bands_mm": [list(b) for b in SIZE_BANDS], "threshold": predictor.threshold,
            "by_kind": by_kind, "sub_solid_by_hu": by_hu, "by_size_and_kind": by_size,
            "false_findings_per_phantom": round(float(np.mean(false_findings)), 3) if false_findings else None,
            "seconds": round(time.time() - t0, 1), "_rows": rows}


def summary(res: dict) -> str:
    """Two lines for the terminal."""
    kinds = ", ".join(f"{k} {v['sensitivity']} (n={v['n']})" for k, v in res["by_kind"].items())
    hu = ", ".join(f"{k} {v['sensitivity']} (n={v['n']})" for k, v in res["sub_solid_by_hu"].items())
    return (f"ground-glass phantoms ({res['phantoms']}, {res['nodules']} nodules): {kinds}; "
            f"{res['false_findings_per_phantom']} false findings/phantom\n  sub-solid by attenuation: {hu}")
