"""Validation of Res-MTNet on the held-out series (never seen in training).

Three parts, all on the validation series of :func:`model.data.split_by_series`:

1. **Characterisation on the validation cubes** (nodule location given): the refinement pass
   (:meth:`model.inference.Predictor.describe`) at the reference centre of each cube gives the
   malignancy (accuracy at 0.5 and ROC AUC, by the median rule — median > 3 malignant, < 3
   benign, 3 and unrated left out — and by ``is_malignant``) of the final read-out
   (:mod:`model.readout`) and of the malignancy branch alone, the diameter (absolute error vs
   the LUNA16 diameter, mm) and the mask (Dice vs the cube's mask).
2. **Whole-scan detection** (LUNA16 FROC / CPM, :mod:`model.metrics`): validation nodules are
   pasted (:func:`model.data.paste_nodule`) at random aerated-lung positions into (a) the
   validation part of LIDC-IDRI-0001 (z < -180 mm; training only ever saw z >= -180 mm) and
   (b) synthetic chest phantoms (:mod:`model.phantom`, seeds disjoint from training); each
   nodule is used once. The full :class:`~model.inference.Predictor` runs on each scan with a
   low threshold, so the whole FROC curve is available; sensitivity and false positives per
   scan are read at the operating threshold, which is *not* chosen here.
   **The operating threshold** (:func:`choose_threshold`) comes from training data only: the
   same rule (the lowest threshold with at most 1 false positive per scan on the real-lung
   scans; all scans when there are none) on :func:`threshold_scans`, whole scans built the
   same way from *training* cubes pasted into the *training* part of LIDC-IDRI-0001
   (z >= -180 mm, the background training already saw; its reference nodule and reader marks
   count neither way), or into the training phantoms (:func:`model.phantom.training_phantom_seeds`,
   as :func:`model.train.phantom_backgrounds`) when LIDC-IDRI-0001 is absent. Nothing reported
   on validation is chosen on it; the
   threshold the rule would pick on the validation scans is reported beside, for comparison
   only (``validation_threshold_1fp_not_used``).
3. **Baselines on the same data**: malignancy from the diameter alone (AUC of the diameter; a
   diameter cut fitted for accuracy on the training cubes) and a classical LoG blob detector
   (:func:`model.baselines.blob_candidates`) on the same whole-scan volumes.

Plus the end-to-end check on the real LIDC-IDRI-0001 at the operating threshold.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np

from model import data as D
from model.baselines import blob_candidates
from model.metrics import ScanResult, accuracy, at_threshold, best_threshold, dice, froc, roc_auc, threshold_at_fp_rate
from model.phantom import training_phantom_seeds

log = logging.getLogger(__name__)


@dataclass
class ValScan:
    """A whole-scan validation volume on the 1 mm grid (voxel index = mm).

    nodules: list of (centre (z, y, x), diameter mm); region: the lung region; excluded:
    (centre (z, y, x), radius mm) of reader marks that count neither way."""

    name: str
    hu: np.ndarray
    region: np.ndarray
    nodules: list[tuple[tuple[float, float, float], float]]
    excluded: list[tuple[tuple[float, float, float], float]] = dataclasses.field(default_factory=list)


def _place(rng, pool: np.ndarray, shape, taken: list[np.ndarray], diameter: float) -> np.ndarray | None:
    for _ in range(200):
        c = np.asarray(np.unravel_index(pool[rng.integers(pool.size)], shape), float)
        if np.any(c < diameter / 2 + 3) or np.any(c > np.asarray(shape) - diameter / 2 - 4):
            continue
        if all(np.linalg.norm(c - t) > 30 for t in taken):
            return c
    return None


def _paste_all(name, hu, region, rng, cubes) -> ValScan:
    from model.lungs import parenchyma_mask

    pool = np.flatnonzero(parenchyma_mask(hu, region))
    nodules, taken = [], []
    for cube in cubes:
        c = _place(rng, pool, hu.shape, taken, cube.diameter_mm)
        if c is None:
            continue
        at = np.round(c).astype(int) - np.round(np.asarray(cube.center) - np.asarray(cube.image.shape) // 2).astype(int)
        D.paste_nodule(hu, cube.image, cube.mask, tuple(at))
        taken.append(c)
        nodules.append((tuple(np.round(c).astype(float)), cube.diameter_mm))
    return ValScan(name, hu, region, nodules)


def validation_scans(val_cubes: list[D.Cube], seed: int = 0, per_lidc: int = 6, per_phantom: int = 4, max_lidc: int = 16):
    """Yield :class:`ValScan` volumes, using each matched validation cube at most once:
    LIDC-IDRI-0001 validation part first (up to ``max_lidc`` scans), phantoms for the rest."""
    rng = np.random.default_rng(seed)
    cubes = [c for c in val_cubes if c.matched]
    order = rng.permutation(len(cubes))
    queue = [cubes[i] for i in order]
    try:
        hu, lung, origin = D.lidc_0001_iso()
        cut = int(np.floor(D.LIDC_0001_Z_CUT_MM - origin[2]))
        base_hu, base_region = hu[:cut].copy(), lung[:cut].copy()
        excluded = _lidc_0001_marks(origin)
    except FileNotFoundError:
        base_hu = None
    k = 0
    while queue and base_hu is not None and k < max_lidc:
        take, queue = queue[:per_lidc], queue[per_lidc:]
        vs = _paste_all(f"LIDC-IDRI-0001[z<-180mm]#{k}", base_hu.copy(), base_region, rng, take)
        vs.excluded = excluded
        yield vs
        k += 1
    from model.phantom import make_phantom

    k = 0
    while queue:
        take, queue = queue[:per_phantom], queue[per_phantom:]
        ph = make_phantom(seed=90_000 + seed * 1000 + k, n_nodules=0)
        yield _paste_all(f"phantom#{k}", ph.hu.copy(), ph.lungs, rng, take)
        k += 1


LIDC_0001_REFERENCE_RADIUS_MM = 33.0 / 2  # the match radius of lidc_end_to_end


def _lidc_0001_marks(origin) -> list[tuple[tuple[float, float, float], float]]:
    """The reader marks of LIDC-IDRI-0001 that count neither way (:func:`model.data.
    read_lidc_excluded`) as (centre (z, y, x) voxel of the 1 mm grid at ``origin``, radius mm);
    none without the XML."""
    if not D.LIDC_0001_XML.exists():
        return []
    img = D.read_image(D.LIDC_0001)
    return [(tuple(D.world_to_voxel(c_mm, origin, (1.0, 1.0, 1.0))), r)
            for c_mm, r in D.read_lidc_excluded(D.LIDC_0001_XML, img.GetOrigin(), img.GetSpacing()[::-1], img.GetDirection())]


def threshold_scans(train_cubes: list[D.Cube], seed: int = 0, per_lidc: int = 6, max_lidc: int = 16,
                    per_phantom: int = 4, phantom_scans: int | None = None, train_seed: int = 0, train_phantoms: int = 2,
                    val_fraction: float = 0.2):
    """Yield :class:`ValScan` volumes for choosing the operating threshold, from TRAINING data
    only: matched training cubes (each at most once, shuffled with ``seed``) pasted ``per_lidc``
    a scan into the training part of LIDC-IDRI-0001 (z >= -180 mm, 30 mm away from its
    reference nodule; up to ``max_lidc`` scans), then ``phantom_scans`` scans (default: none
    when LIDC-IDRI-0001 is there, else ``max_lidc``) on the training phantoms (the seeds of
    :func:`training_phantom_seeds`, used in turn). The reference nodule (radius 33/2 mm) and
    the reader marks count neither way. Raises ValueError when a cube of a validation series
    (:func:`model.data.split_by_series` at ``val_fraction``) is passed."""
    leaked = D.split_by_series([c.seriesuid for c in train_cubes], val_fraction)
    if leaked:
        raise ValueError(f"threshold_scans got cubes of {len(leaked)} validation series; pass training cubes only")
    rng = np.random.default_rng(seed)
    cubes = [c for c in train_cubes if c.matched]
    queue = [cubes[i] for i in rng.permutation(len(cubes))]
    try:
        hu, lung, origin = D.lidc_0001_iso()
    except FileNotFoundError:
        hu = None
    k = 0
    if hu is not None:
        cut = int(np.ceil(D.LIDC_0001_Z_CUT_MM - origin[2]))  # as model.train.lidc_training_background
        shift = np.array([cut, 0.0, 0.0])
        base_hu, region = hu[cut:].copy(), lung[cut:].copy()
        ref = D.world_to_voxel(D.LIDC_0001_NODULE_MM, origin, (1.0, 1.0, 1.0)) - shift
        place = region & D.far_from(region.shape, [ref], 30.0)
        excluded = [(tuple(ref), LIDC_0001_REFERENCE_RADIUS_MM)]
        for c, r in _lidc_0001_marks(origin):
            v = np.asarray(c) - shift
            if v[0] >= -r:
                excluded.append((tuple(v), r))
        while queue and k < max_lidc:
            take, queue = queue[:per_lidc], queue[per_lidc:]
            vs = _paste_all(f"LIDC-IDRI-0001[z>=-180mm]#{k}", base_hu.copy(), place, rng, take)
            vs.region, vs.excluded = region, excluded
            yield vs
            k += 1
    n_ph = (0 if hu is not None else max_lidc) if phantom_scans is None else phantom_scans
    if n_ph:
        from model.phantom import make_phantom

        seeds = training_phantom_seeds(train_seed, max(1, train_phantoms))  # 0: the seed training would use first
        phs = [make_phantom(seed=s, n_nodules=0) for s in seeds]
        for k in range(n_ph):
            if not queue:
                break
            take, queue = queue[:per_phantom], queue[per_phantom:]
            ph = phs[k % len(phs)]
            yield _paste_all(f"training-phantom-{seeds[k % len(seeds)]}#{k}", ph.hu.copy(), ph.lungs, rng, take)


def _scan_result(vs: ValScan, centres, scores) -> ScanResult:
    nod = np.array([n[0] for n in vs.nodules]).reshape(-1, 3)
    rad = np.array([n[1] / 2 for n in vs.nodules])
    ex = np.array([e[0] for e in vs.excluded]).reshape(-1, 3)
    ex_r = np.array([e[1] for e in vs.excluded])
    return ScanResult(np.asarray(centres, float).reshape(-1, 3), np.asarray(scores, float), nod, rad, ex, ex_r)


def _network_results(predictor, scans, progress: bool = False, desc: str = "scans", blobs: bool = False):
    """(network ScanResults, blob-baseline ScanResults or None, scan names, seconds per scan):
    the whole predictor at threshold 0.05 (30 findings at most), so the whole FROC curve is
    available (the score is the refinement pass's flip-averaged heatmap: the predictor runs
    exactly as in use)."""
    from tqdm import tqdm

    saved_thr, saved_max = predictor.threshold, predictor.max_findings
    predictor.threshold, predictor.max_findings = 0.05, 30
    net, blob, names, seconds = [], [] if blobs else None, [], []
    try:
        for vs in tqdm(scans, desc=desc, disable=not progress):
            t = time.time()
            fs = predictor(vs.hu, (1.0, 1.0, 1.0))
            seconds.append(time.time() - t)
            net.append(_scan_result(vs, [f.center_voxel for f in fs], [f.score for f in fs]))
            if blobs:
                bs = blob_candidates(vs.hu, vs.region)
                blob.append(_scan_result(vs, [b[0] for b in bs], [b[1] for b in bs]))
            names.append(vs.name)
    finally:
        predictor.threshold, predictor.max_findings = saved_thr, saved_max
    return net, blob, names, seconds


def _one_fp_threshold(net: list[ScanResult], names: list[str]) -> tuple[float, str, list[int]]:
    """The rule: lowest threshold with <= 1 FP per scan on the real-lung (LIDC-IDRI-0001-based)
    scans, on all scans when there are none; (threshold, which scans, their indices)."""
    lidc = [i for i, n in enumerate(names) if n.startswith("LIDC")]
    use = lidc or list(range(len(names)))
    return threshold_at_fp_rate(froc([net[i] for i in use]), 1.0), ("lidc_background" if lidc else "all"), use


def choose_threshold(predictor, cubes: list[D.Cube], seed: int = 0, val_fraction: float = 0.2, max_lidc: int = 16,
                     train_seed: int = 0, train_phantoms: int = 2, progress: bool = False) -> dict:
    """The operating threshold from TRAINING data only (module docstring): ``cubes`` is split by
    :func:`model.data.split_cubes` and only the training cubes go to :func:`threshold_scans`;
    the lowest threshold with <= 1 false positive per real-lung scan on those scans. Returns a
    JSON-able dict: ``threshold`` and what it was chosen on."""
    t0 = time.time()
    val_series, train, _ = D.split_cubes(cubes, val_fraction)
    scans = threshold_scans(train, seed=seed, max_lidc=max_lidc, train_seed=train_seed, train_phantoms=train_phantoms,
                            val_fraction=val_fraction)
    net, _, names, seconds = _network_results(predictor, scans, progress, desc="threshold scans (training)")
    if not net:
        raise ValueError("no training scans to choose the threshold on")
    thr, which, use = _one_fp_threshold(net, names)
    used = [net[i] for i in use]
    lidc = sum(n.startswith("LIDC") for n in names)
    return {
        "threshold": round(thr, 4),
        "rule": "lowest score with <= 1 false positive per scan on the "
                + ("real-lung (LIDC-IDRI-0001-based) scans" if which == "lidc_background" else "scans"),
        "data": "training cubes only (model.data.split_cubes; validation series never used), pasted into the training part of "
                "LIDC-IDRI-0001 (z >= -180 mm)" + ("" if lidc else " / training phantoms (seeds "
                                                   + ", ".join(map(str, training_phantom_seeds(train_seed, train_phantoms))) + ")"),
        "scans": len(names), "lidc_scans": lidc, "phantom_scans": len(names) - lidc, "scans_used": which,
        "nodules": int(sum(len(s.nod_xyz) for s in used)), "training_series": len({c.seriesuid for c in train}),
        "validation_series_excluded": len(val_series), "seed": seed,
        "at_threshold": at_threshold(used, thr), "froc": froc(used).to_json(),
        "seconds_per_scan_mean": round(float(np.mean(seconds)), 2), "seconds": round(time.time() - t0, 1),
    }


def characterise(predictor, cubes: list[D.Cube]) -> list[dict]:
    """Per cube: malignancy, diameter and Dice at the reference centre (location given)."""
    rows = []
    for c in cubes:
        det: dict = {}
        f = predictor.describe(c.image, c.center, details=det)
        pred_mask = np.zeros(c.mask.shape, bool)
        if f.mask is not None:
            o = f.mask_offset
            sl = tuple(slice(a, min(a + n, s)) for a, n, s in zip(o, f.mask.shape, c.mask.shape))
            pred_mask[sl] = f.mask[tuple(slice(0, s.stop - s.start) for s in sl)]
        rows.append({
            "name": c.name, "matched": c.matched, "diameter_ref": c.diameter_mm, "diameter_pred": f.diameter_mm,
            "malignancy": f.malignancy, "branch_malignancy": det["branch_malignancy"], "median": c.median, "median_label": c.median_label,
            "is_malignant": c.is_malignant, "rated": bool(c.ratings), "dice": dice(pred_mask, c.mask),
        })
    return rows


def malignancy_metrics(rows: list[dict], score_key: str, cut: float = 0.5) -> dict:
    med = [r for r in rows if np.isfinite(r["median_label"])]
    rated = [r for r in rows if r["rated"]]
    return {
        "median_rule": {"n": len(med), "accuracy": accuracy([r[score_key] for r in med], [r["median_label"] for r in med], cut),
                        "auc": roc_auc([r[score_key] for r in med], [r["median_label"] for r in med])},
        "is_malignant": {"n": len(rated), "accuracy": accuracy([r[score_key] for r in rated], [r["is_malignant"] for r in rated], cut),
                         "auc": roc_auc([r[score_key] for r in rated], [r["is_malignant"] for r in rated])},
    }


def evaluate(predictor, seed: int = 0, val_fraction: float = 0.2, cubes: list[D.Cube] | None = None,
             max_lidc: int = 16, progress: bool = False, threshold: float | None = None) -> dict:
    """Run the whole validation (see the module docstring) and read the detection at the
    operating ``threshold`` (default: the predictor's, i.e. the weights'; never chosen here);
    returns a JSON-able dict with the FROC curves under ``"_curves"``."""
    from tqdm import tqdm

    t0 = time.time()
    cubes = cubes if cubes is not None else D.load_cubes()
    val_series, train, val = D.split_cubes(cubes, val_fraction)
    # 1. characterisation
    rows = characterise(predictor, tqdm(val, desc="cubes", disable=not progress))
    matched = [r for r in rows if r["matched"]]
    err = np.abs(np.array([r["diameter_pred"] - r["diameter_ref"] for r in matched]))
    net_mal = malignancy_metrics(rows, "malignancy")
    branch_mal = malignancy_metrics(rows, "branch_malignancy")
    # diameter-only baseline: cut fitted on the training cubes
    tr_med = [c for c in train if np.isfinite(c.median_label)]
    cut_med = best_threshold([c.diameter_mm for c in tr_med], [c.median_label for c in tr_med])
    tr_rated = [c for c in train if c.ratings]
    cut_mal = best_threshold([c.diameter_mm for c in tr_rated], [c.is_malignant for c in tr_rated])
    const_d = float(np.median([c.diameter_mm for c in train if c.matched]))  # constant-diameter baseline
    base_med = malignancy_metrics(rows, "diameter_ref", cut_med)["median_rule"]
    base_ism = malignancy_metrics(rows, "diameter_ref", cut_mal)["is_malignant"]
    # 2./3. whole-scan detection, network and blob baseline
    op = float(predictor.threshold if threshold is None else threshold)
    net_scans, blob_scans, scan_names, seconds = _network_results(
        predictor, validation_scans(val, seed=seed, max_lidc=max_lidc), progress, blobs=True)
    f_net, f_blob = froc(net_scans), froc(blob_scans)
    lidc = [i for i, n in enumerate(scan_names) if n.startswith("LIDC")]
    phan = [i for i, n in enumerate(scan_names) if n.startswith("phantom")]
    f_lidc = froc([net_scans[i] for i in lidc]) if lidc else None
    # for comparison only, never used: the threshold the 1-FP rule would pick on these scans
    val_op, val_op_scans, _ = _one_fp_threshold(net_scans, scan_names)
    result = {
        "validation": {"series": len(val_series), "cubes": len(val), "cubes_matched": len(matched),
                       "whole_scans": len(scan_names), "lidc_scans": len(lidc), "phantom_scans": len(phan)},
        "detection": {
            "network": f_net.to_json(),
            "network_lidc_background": f_lidc.to_json() if lidc else None,
            "network_phantom_background": froc([net_scans[i] for i in phan]).to_json() if phan else None,
            "blob_baseline": f_blob.to_json(),
            "operating_threshold": round(op, 4),
            "at_operating_threshold": {"lidc_background": at_threshold([net_scans[i] for i in lidc], op) if lidc else None,
                                       "all": at_threshold(net_scans, op)},
            "validation_threshold_1fp_not_used": {"threshold": round(val_op, 4), "scans": val_op_scans,
                                                  "all_scans": round(threshold_at_fp_rate(f_net, 1.0), 4)},
            "seconds_per_scan_mean": round(float(np.mean(seconds)), 2) if seconds else None,
        },
        "malignancy": {"network": net_mal, "read_out": predictor.readout is not None, "branch_alone": branch_mal,
                       "diameter_baseline": {"median_rule": base_med, "is_malignant": base_ism,
                                                                "cut_mm_median_rule": cut_med, "cut_mm_is_malignant": cut_mal}},
        "segmentation": {"dice_mean": float(np.mean([r["dice"] for r in rows])), "dice_median": float(np.median([r["dice"] for r in rows])), "n": len(rows)},
        "diameter": {"abs_error_mm_mean": float(err.mean()), "abs_error_mm_median": float(np.median(err)), "n": len(matched),
                     "constant_baseline_abs_error_mm_mean": float(np.mean(np.abs(np.array([r["diameter_ref"] for r in matched]) - const_d))),
                     "constant_baseline_mm": const_d},
        "seconds": round(time.time() - t0, 1),
        "_curves": {"network": (f_net.fp_per_scan.tolist(), f_net.sensitivity.tolist()),
                    "blob_baseline": (f_blob.fp_per_scan.tolist(), f_blob.sensitivity.tolist())},
    }
    return result


def lidc_end_to_end(predictor, figure_path=None) -> dict:
    """The real LIDC-IDRI-0001 at the predictor's threshold: is the reference nodule found?
    With ``figure_path``, also draws the axial slice through each finding with its mask."""
    import resource

    img = D.read_image(D.LIDC_0001)
    t = time.time()
    fs = predictor.predict_image(img)
    secs = time.time() - t
    ref = np.asarray(D.LIDC_0001_NODULE_MM)
    hits = [f for f in fs if np.linalg.norm(np.asarray(f.center_mm) - ref) <= 33.0 / 2]
    best = max(hits, key=lambda f: f.score) if hits else None
    if figure_path is not None and fs:
        _plot_findings(img, fs, ref, figure_path)
    return {
        "seconds": round(secs, 2), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "n_findings": len(fs), "reference_found": best is not None,
        "reference": None if best is None else {**best.to_json(), "distance_mm": round(float(np.linalg.norm(np.asarray(best.center_mm) - ref)), 2)},
        "false_positives": len(fs) - len(hits),
    }


def plot_froc(result: dict, path) -> None:
    """FROC curves (network and blob baseline) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (fp, sens) in result["_curves"].items():
        cpm = result["detection"]["network" if name == "network" else "blob_baseline"]["cpm"]
        order = np.argsort(fp)
        ax.step(np.asarray(fp)[order], np.asarray(sens)[order], where="post", label=f"{name} (CPM {cpm:.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xlim(1 / 8, 8)
    ax.set_ylim(0, 1)
    ax.set_xlabel("average false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title("FROC, whole-scan validation (LUNA16 protocol)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_findings(img, findings, ref_mm, path, max_panels: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)
    shown = findings[:max_panels]
    fig, axes = plt.subplots(1, len(shown), figsize=(max(6.0, 4.0 * len(shown)), 4.6), squeeze=False)
    for ax, f in zip(axes[0], shown):
        z = int(round(f.center_voxel[0]))
        ax.imshow(arr[z], cmap="gray", vmin=-1000, vmax=400)
        if f.mask is not None:
            m = np.zeros(arr.shape[1:], bool)
            k = z - f.mask_offset[0]
            if 0 <= k < f.mask.shape[0]:
                o = f.mask_offset
                m[o[1]:o[1] + f.mask.shape[1], o[2]:o[2] + f.mask.shape[2]] = f.mask[k]
                ax.contour(m, [0.5], colors="r", linewidths=1)
        is_ref = np.linalg.norm(np.asarray(f.center_mm) - ref_mm) <= 33.0 / 2
        ax.set_title(f"{'reference nodule' if is_ref else 'other finding'}: score {f.score:.2f}\n"
                     f"d {f.diameter_mm:.1f} mm, malignancy {f.malignancy:.2f}", fontsize=9)
        ax.axis("off")
    fig.suptitle("LIDC-IDRI-0001: Res-MTNet findings at the operating point (mask in red)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=100)
    plt.close(fig)
