"""Training of Res-MTNet on the LUNA16 nodule cubes, with hard negatives from real lung.

Each training sample is a 1 mm isotropic crop (``crop`` voxels a side), one of:
  * a *cube positive*: a training cube around its nodule, centre shifted at random;
  * a *pasted positive*: a training nodule pasted (:func:`model.data.paste_nodule`) into the
    training part of LIDC-IDRI-0001's lungs (z >= -180 mm, the reference nodule excluded) or a
    synthetic phantom, at a random lung position;
  * a *negative*: a crop of that background lung, half of them centred on dense tissue
    (vessels, pleura, airway walls: HU > -600), none within 30 mm of a nodule.
All go through the same spatial and intensity augmentation (:mod:`model.transforms`).
Validation series (:func:`model.data.split_by_series`) and the validation part of
LIDC-IDRI-0001 are never sampled.

The run is seeded; a checkpoint (weights, optimiser, step, RNG state) is written every
``checkpoint_every`` steps and picked up by ``resume``; the final weights (``resmtnet.pt``,
float16 state dict) come with ``resmtnet.json``: the resolved config, git revision and package
versions.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model import data as D
# checkpoint I/O lives in model.checkpoint (inference must not import training code); re-exported
# here for callers that imported it from model.train
from model.checkpoint import build_network, load_weights, provenance, save_weights  # noqa: F401
from model.lungs import parenchyma_mask
from model.detector import NoduleTarget, make_targets
from model.losses import DEFAULT_WEIGHTS, joint_loss
from model.network import ResMTNet
from model.transforms import IntensityAugment, SpatialParams, draw_spatial, map_point, normalize_hu, sample_crop

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that defines a training run (written, resolved, beside the weights)."""

    out_dir: str = "runs/default"
    seed: int = 0
    steps: int = 1500
    batch_size: int = 16
    crop: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    widths: tuple[int, int, int] = (16, 32, 64)
    mask_width: int = 8
    mask_blocks: int = 1
    cross_task: bool = True
    loss_weights: dict = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    frac_cube: float = 0.5
    frac_pasted: float = 0.2  # the rest are negatives
    val_fraction: float = 0.2
    phantoms: int = 2  # synthetic phantoms added to the backgrounds (0: none)
    use_lidc_background: bool = True
    threads: int = 2
    workers: int = 1
    device: str = "auto"
    checkpoint_every: int = 100
    fit_readout: bool = True  # fit the malignancy read-out on the training cubes at the end
    limit_cubes: int | None = None  # for smoke tests
    # field augmentation (issue 12; defaults: off, the shipped run's sampling)
    size_balance: float = 0.0  # cube drawn with weight n_band ** -size_balance (0: uniform; 1: every size band equally)
    zoom_range: tuple[float, float] = (0.85, 1.15)  # isotropic zoom of the spatial augmentation
    resolution_jitter: float = 0.0  # probability of re-sampling a crop through a voxel size in voxel_range and back
    voxel_range: tuple[float, float] = (0.8, 1.25)  # mm, log-uniform (the field protocol's voxel sizes)
    off_centre: float = 0.0  # probability of a cube positive displaced to anywhere 2 voxels inside the crop
    init: str | None = None  # fine-tune: start from these weights (their architecture), not from scratch


# ----------------------------------------------------------------------------- backgrounds
@dataclass
class Background:
    """A 1 mm lung volume to paste nodules into and cut negatives from.

    hu: (Z, Y, X) int16; allowed: bool, where crop centres may be drawn (inside the lung
    region, away from known nodules, inside the training part); dense: flat indices of allowed
    voxels with HU > -600 (hard negatives); parenchyma: flat indices of allowed voxels whose
    5 mm neighbourhood is aerated lung (mean HU < -650), where nodules are pasted.
    """

    name: str
    hu: np.ndarray
    allowed: np.ndarray
    dense: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    anywhere: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    parenchyma: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self):
        self.anywhere = np.flatnonzero(self.allowed)
        self.dense = np.flatnonzero(self.allowed & (self.hu > -600))
        self.parenchyma = np.flatnonzero(parenchyma_mask(self.hu, self.allowed))


def lidc_training_background() -> Background:
    """The training part of LIDC-IDRI-0001 (z >= -180 mm), reference nodule excluded (30 mm)."""
    hu, lung, origin = D.lidc_0001_iso()
    nod = D.world_to_voxel(D.LIDC_0001_NODULE_MM, origin, (1.0, 1.0, 1.0))
    cut = int(np.ceil(D.LIDC_0001_Z_CUT_MM - origin[2]))
    allowed = lung & D.far_from(hu.shape, [nod], 30.0)
    allowed[:cut] = False
    return Background("LIDC-IDRI-0001[z>=-180mm]", hu, allowed)


def phantom_backgrounds(n: int, seed: int) -> list[Background]:
    from model.phantom import make_phantom, training_phantom_seeds

    out = []
    for i, phantom_seed in enumerate(training_phantom_seeds(seed, n)):
        ph = make_phantom(seed=phantom_seed, n_nodules=0)
        allowed = ph.lungs.copy()
        out.append(Background(f"phantom-{i}", ph.hu, allowed))
    return out


# ----------------------------------------------------------------------------- sampling
SIZE_BANDS_MM = ((0, 6), (6, 10), (10, 20), (20, 30), (30, 1e9))  # those of the field protocol (3-6 includes < 3)


def cube_weights(cubes: list[D.Cube], exponent: float) -> np.ndarray:
    """Sampling probability of each cube: ``n_band ** -exponent`` for the size band (LUNA16
    diameter, :data:`SIZE_BANDS_MM`) it falls in, normalised; 0 gives uniform sampling, 1 every
    populated band the same total probability."""
    band = np.array([next(i for i, (lo, hi) in enumerate(SIZE_BANDS_MM) if lo <= c.diameter_mm < hi) for c in cubes])
    counts = np.bincount(band, minlength=len(SIZE_BANDS_MM)).astype(float)
    w = counts[band] ** -float(exponent)
    return w / w.sum()


def resolution_jitter(img: np.ndarray, voxel_mm: float) -> np.ndarray:
    """``img`` (1 mm grid) re-sampled (linear) onto a grid of ``voxel_mm`` voxels and back, the
    loss of detail a scan of that voxel size has after the predictor's 1 mm resampling (a small
    nodule's contrast drops on a coarse grid). Same shape, float32."""
    from scipy import ndimage as ndi

    n = np.asarray(img.shape)
    m = np.maximum(2, np.round(n / voxel_mm).astype(int))
    coarse = ndi.map_coordinates(img, np.meshgrid(*[np.linspace(0, a - 1, b) for a, b in zip(n, m)], indexing="ij"), order=1, mode="nearest")
    back = ndi.map_coordinates(coarse, np.meshgrid(*[np.linspace(0, b - 1, a) for a, b in zip(n, m)], indexing="ij"), order=1, mode="nearest")
    return back.astype(np.float32)


class Sampler:
    """Draws augmented training samples (see the module docstring)."""

    def __init__(self, cubes: list[D.Cube], backgrounds: list[Background], cfg: TrainConfig, seed: int):
        self.cubes = cubes
        self.backgrounds = [b for b in backgrounds if b.anywhere.size]
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.intensity = IntensityAugment(seed)
        self.p_cube = cube_weights(cubes, cfg.size_balance) if cfg.size_balance and cubes else None

    def _cube(self) -> D.Cube:
        return self.cubes[self.rng.choice(len(self.cubes), p=self.p_cube) if self.p_cube is not None else self.rng.integers(len(self.cubes))]

    def _spatial(self) -> SpatialParams:
        return draw_spatial(self.rng, self.cfg.crop, zoom_range=tuple(self.cfg.zoom_range))

    def _finish(self, img_hu: np.ndarray, mask: np.ndarray, nodules: list[NoduleTarget]) -> dict[str, torch.Tensor]:
        if self.cfg.resolution_jitter and self.rng.random() < self.cfg.resolution_jitter:
            lo, hi = self.cfg.voxel_range
            img_hu = resolution_jitter(np.asarray(img_hu, np.float32), float(np.exp(self.rng.uniform(np.log(lo), np.log(hi)))))
        x = self.intensity(normalize_hu(img_hu)[None])
        tgt = make_targets(img_hu.shape, nodules)
        tgt["image"] = torch.from_numpy(np.ascontiguousarray(x))
        tgt["mask"] = torch.from_numpy(mask[None].astype(np.float32))
        return tgt

    def _shifted_centre(self, centre: np.ndarray, diameter: float) -> np.ndarray:
        s = self.cfg.crop
        room = max(1.0, s / 2 - max(diameter / 2, 3.0) - 1)
        if self.cfg.off_centre and self.rng.random() < self.cfg.off_centre:
            room = max(room, s / 2 - 2.0)  # the nodule anywhere in the crop, partly cut by its edge
        return centre + self.rng.uniform(-room, room, 3)

    def cube_positive(self) -> dict[str, torch.Tensor]:
        cube = self._cube()
        s = self.cfg.crop
        p = self._spatial()
        centre = np.asarray(cube.center)
        c_src = self._shifted_centre(centre, cube.diameter_mm)
        img, msk = sample_crop(cube.image, cube.mask, c_src, s, p, cval=np.nan)
        if np.isnan(img).any():  # outside the 40 mm cube: mirror the cube instead of air
            img2, _ = _sample_mirror(cube.image, c_src, s, p)
            img = np.where(np.isnan(img), img2, img)
        ctr = map_point(centre, c_src, s, p)
        return self._finish(img, msk, [NoduleTarget(tuple(ctr), cube.diameter_mm * p.zoom, cube.soft_target)])

    def _background_point(self, bg: Background, dense: bool, paste: bool = False) -> np.ndarray:
        pool = bg.dense if dense and bg.dense.size else bg.anywhere
        if paste and bg.parenchyma.size:
            pool = bg.parenchyma
        return np.asarray(np.unravel_index(pool[self.rng.integers(pool.size)], bg.hu.shape), float)

    def _region(self, bg: Background, centre: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.round(centre).astype(int) - half
        region = np.full((2 * half,) * 3, -1000, np.int16)
        src_lo = np.maximum(lo, 0)
        src_hi = np.minimum(lo + 2 * half, bg.hu.shape)
        region[tuple(slice(a - l, b - l) for a, b, l in zip(src_lo, src_hi, lo))] = bg.hu[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
        return region, lo

    def pasted_positive(self) -> dict[str, torch.Tensor]:
        bg = self.backgrounds[self.rng.integers(len(self.backgrounds))]
        cube = self._cube()
        at = self._background_point(bg, dense=False, paste=True)
        half = self.cfg.crop
        region, lo = self._region(bg, at, half)
        region = region.copy()
        centre_r = at - lo
        D.paste_nodule(region, cube.image, cube.mask, tuple(np.round(centre_r).astype(int)))
        mask = np.zeros(region.shape, bool)
        cs = np.asarray(cube.mask.shape)
        start = np.round(centre_r).astype(int) - cs // 2
        a = np.maximum(start, 0)
        b = np.minimum(start + cs, region.shape)
        mask[tuple(slice(x, y) for x, y in zip(a, b))] = cube.mask[tuple(slice(x - s, y - s) for x, y, s in zip(a, b, start))]
        nod_centre = start + np.asarray(cube.center)
        s = self.cfg.crop
        p = self._spatial()
        c_src = self._shifted_centre(nod_centre, cube.diameter_mm)
        img, msk = sample_crop(region, mask, c_src, s, p)
        ctr = map_point(nod_centre, c_src, s, p)
        return self._finish(img, msk, [NoduleTarget(tuple(ctr), cube.diameter_mm * p.zoom, cube.soft_target)])

    def negative(self) -> dict[str, torch.Tensor]:
        bg = self.backgrounds[self.rng.integers(len(self.backgrounds))]
        at = self._background_point(bg, dense=self.rng.random() < 0.5)
        s = self.cfg.crop
        region, lo = self._region(bg, at, s)
        p = self._spatial()
        img, _ = sample_crop(region, None, at - lo, s, p)
        return self._finish(img, np.zeros(img.shape, bool), [])

    def sample(self) -> dict[str, torch.Tensor]:
        u = self.rng.random()
        if not self.backgrounds or u < self.cfg.frac_cube:
            return self.cube_positive()
        if u < self.cfg.frac_cube + self.cfg.frac_pasted:
            return self.pasted_positive()
        return self.negative()


def _sample_mirror(volume: np.ndarray, c_src, size: int, params: SpatialParams):
    from scipy import ndimage as ndi

    c_out = (size - 1) / 2.0
    g = np.indices((size,) * 3, dtype=np.float32).reshape(3, -1) - c_out
    src = params.matrix @ g + np.asarray(c_src, np.float32)[:, None]
    if params.elastic is not None:
        src = src + params.elastic.reshape(3, -1)
    img = ndi.map_coordinates(volume.astype(np.float32), src.reshape((3,) + (size,) * 3), order=1, mode="mirror")
    return img, None


class SampleStream(torch.utils.data.IterableDataset):
    """Endless stream of samples; each worker gets its own seed (``seed * 1000 + worker``).

    ``start`` offsets the seed so a resumed run draws fresh samples."""

    def __init__(self, cubes, cfg: TrainConfig, start: int = 0):
        self.cubes, self.cfg, self.start = cubes, cfg, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = 0 if info is None else info.id
        torch.set_num_threads(1)
        backgrounds: list[Background] = []
        if self.cfg.use_lidc_background:
            try:
                backgrounds.append(lidc_training_background())
            except FileNotFoundError as e:
                log.warning("no LIDC background: %s", e)
        if self.cfg.phantoms:
            backgrounds += phantom_backgrounds(self.cfg.phantoms, self.cfg.seed)
        sampler = Sampler(self.cubes, backgrounds, self.cfg, seed=self.cfg.seed * 1000 + wid + 7919 * self.start)
        while True:
            yield sampler.sample()


# ----------------------------------------------------------------------------- loop
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _prepare_run(cfg: TrainConfig) -> tuple[Path, torch.device]:
    """Output folder created, seeds and torch threads set; (output folder, device)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    return out, _device(cfg.device)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> Path | None:
    """Run (or resume) training; returns the path of the final weights, or None when stopped
    early by ``stop_after`` (a number of steps in this session; the checkpoint allows resuming
    with the same config)."""
    init_net = init_meta = None
    if cfg.init:
        init_net, init_meta = load_weights(cfg.init, device="cpu")
        ic = init_meta["config"]
        cfg = dataclasses.replace(cfg, widths=tuple(ic["widths"]), mask_width=ic["mask_width"], cross_task=ic["cross_task"],
                                  mask_blocks=ic.get("mask_blocks", 0))
    out, device = _prepare_run(cfg)
    cubes = D.load_cubes(limit=cfg.limit_cubes)
    val, train_cubes, _ = D.split_cubes(cubes, cfg.val_fraction)
    log.info("cubes: %d train, %d validation (%d series)", len(train_cubes), len(cubes) - len(train_cubes), len(val))
    ckpt = out / "checkpoint.pt"
    resumed_at = torch.load(ckpt, map_location="cpu", weights_only=False)["step"] if resume and ckpt.exists() else 0
    name = "config.json" if not resumed_at else f"config.resume-{resumed_at}.json"
    (out / name).write_text(json.dumps({"config": dataclasses.asdict(cfg), **provenance(), "resumed_at_step": resumed_at,
                                        "train_cubes": len(train_cubes), "val_series": sorted(val)}, indent=2) + "\n")
    net = build_network(dataclasses.asdict(cfg))
    if init_net is not None and not (resume and ckpt.exists()):
        net.load_state_dict(init_net.state_dict())
    del init_net
    net = net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    step = 0
    if resume and ckpt.exists():
        st = torch.load(ckpt, map_location=device, weights_only=False)
        net.load_state_dict(st["net"]); opt.load_state_dict(st["opt"])
        step = st["step"]
        if st["sched"].get("total_steps") == cfg.steps:
            sched.load_state_dict(st["sched"])
        else:  # resumed with a different --steps: the same one-cycle shape over the new total
            log.info("schedule changed from %s to %d steps at step %d", st["sched"].get("total_steps"), cfg.steps, step)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1, last_epoch=step - 1)
        torch.set_rng_state(st["torch_rng"])
        log.info("resumed at step %d", step)
    stream = SampleStream(train_cubes, cfg, start=step)
    loader = torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                         persistent_workers=cfg.workers > 0)
    history = []
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train", file=sys.stderr)
    net.train()
    t0 = time.time()
    it = iter(loader)
    session_steps = 0
    while step < cfg.steps:
        if stop_after is not None and session_steps >= stop_after:
            bar.close()
            return None
        session_steps += 1
        batch = {k: v.to(device) for k, v in next(it).items()}
        outp = net(batch["image"])
        terms = joint_loss(outp, batch, cfg.loss_weights)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step(); sched.step()
        step += 1
        rec = {k: round(float(v.detach()), 4) for k, v in terms.items()}
        history.append({"step": step, **rec})
        bar.set_postfix(loss=rec["total"], heat=rec["heat"], mal=rec["mal"])
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or (stop_after is not None and session_steps >= stop_after):
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step, "torch_rng": torch.get_rng_state()}, ckpt)
            with open(out / "history.jsonl", "a") as f:
                for h in history:
                    f.write(json.dumps(h) + "\n")
            history = []
    bar.close()
    net.eval()
    sessions = sorted(p.name for p in out.glob("config*.json"))
    meta = {"config": dataclasses.asdict(cfg), **provenance(), "train_seconds_this_session": round(time.time() - t0, 1),
            "sessions": sessions,
            "train_cubes": len(train_cubes), "threshold": None,
            "note": "threshold is set by `dicom-node evaluate --protocol centred --write-threshold` on training scans (training cubes only)"}
    if init_meta is not None:
        meta["init"] = {"weights": str(cfg.init), "git_revision": init_meta.get("git_revision"),
                        "config": init_meta.get("config"), "mask_stage": init_meta.get("mask_stage"),
                        "threshold": init_meta.get("threshold")}
        meta["threshold"] = init_meta.get("threshold")
        meta["note"] = "threshold carried over from the init weights; re-set it with `dicom-node evaluate --protocol centred --write-threshold` (chosen on training scans)"
    return _finish_run(net, out, meta, train_cubes, cfg.fit_readout, progress)


def _finish_run(net: ResMTNet, out: Path, meta: dict, train_cubes: list[D.Cube], readout: bool, progress: bool) -> Path:
    """Write ``out/resmtnet.pt`` + ``.json`` and, with ``readout``, fit the malignancy
    read-out on ``train_cubes`` (skipped with a warning when they cannot support it, e.g. a
    smoke run on a handful of cubes without both classes). Returns the weights' path."""
    path = out / "resmtnet.pt"
    save_weights(net, path, meta)
    if readout:
        try:
            fit_readout(path, train_cubes, progress=progress)
        except ValueError as exc:
            log.warning("malignancy read-out not fitted: %s", exc)
    return path


def fit_readout(weights: str | Path, train_cubes: list[D.Cube] | None = None, l2: float = 1.0, progress: bool = False,
                calibration_data: str = "centred+off-centre", features: dict | None = None) -> dict:
    """Fit the malignancy read-out (:mod:`model.readout`) of ``weights`` on the training cubes
    (the refinement pass of those weights at each cube's centre) and its calibrator
    (:mod:`model.calibration`) on the read-out's out-of-fold probabilities of those cubes, and
    store both, with their training-only cross-validated figures, in the weights' ``.json``
    (``"readout"``, ``"readout_fit"``, ``"calibration"``). Returns the ``"readout_fit"`` entry.

    ``train_cubes``: default, the training split of the cubes named by the weights' config.
    ``calibration_data``: ``"centred"`` (the read-out's own out-of-fold probabilities) or
    ``"centred+off-centre"`` (also each training cube cut off-centre and rescaled as the field
    protocol cuts validation cubes, predicted by the fold read-outs that did not see its series).
    ``features``: a dict of precomputed :func:`model.readout.training_features` (keys
    ``"centred"``, ``"off-centre"``); missing ones are computed and added to it."""
    from model import calibration as C
    from model.inference import Predictor
    from model.readout import cross_validate_on, fit_on_cubes, training_features

    if calibration_data not in ("centred", "centred+off-centre"):
        raise ValueError(f"calibration_data must be 'centred' or 'centred+off-centre', got {calibration_data!r}")
    weights = Path(weights)
    meta = json.loads(weights.with_suffix(".json").read_text())
    if train_cubes is None:
        _, train_cubes, _ = D.split_cubes(D.load_cubes(limit=meta["config"].get("limit_cubes")), meta["config"].get("val_fraction", 0.2))
    predictor = Predictor(weights, threshold=1.0)
    predictor.readout = None  # features come from the network alone
    predictor.calibration = None
    t0 = time.time()
    features = {} if features is None else features  # filled in place: a caller may keep it
    if "centred" not in features:
        features["centred"] = training_features(predictor, train_cubes, progress=progress)
    readout, summary = fit_on_cubes(predictor, train_cubes, l2=l2, data=features["centred"])
    oof = summary.pop("_oof")
    fc = features["centred"]
    p, y, groups = list(oof), list(fc["y"]), list(fc["groups"])
    if calibration_data == "centred+off-centre":
        if "off-centre" not in features:
            features["off-centre"] = training_features(predictor, train_cubes, off_centre_seed=0, progress=progress)
        fo = features["off-centre"]
        p += list(cross_validate_on(fc["x"], fc["y"], fc["groups"], fo["x"], fo["groups"], l2=l2))
        y += list(fo["y"])
        groups += list(fo["groups"])
    calibrator, _ = C.choose(np.array(p), np.array(y), groups)
    calibrator.fit["data"] = (f"training cubes only: {calibration_data} (validation series never used); "
                              "read-out out-of-fold probabilities, 5 folds by series")
    calibrator.fit["ece_before"] = round(C.ece(p, y), 4)
    calibrator.fit["git_revision"] = provenance()["git_revision"]
    meta["readout"] = readout.to_json()
    meta["readout_fit"] = {**summary, "seconds": round(time.time() - t0, 1),
                           "data": "training cubes only (validation series never used)"}
    meta["calibration"] = calibrator.to_json()
    weights.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    log.info("read-out fitted on %d training nodules: cross-validated AUC %s; calibration %s (cross-validated ECE %s)",
             summary["n"], summary["cv5_by_series"]["auc"], calibrator.method,
             calibrator.fit["cross_validated"][calibrator.method]["ece"])
    return {**meta["readout_fit"], "calibration": calibrator.method,
            "calibration_cv_ece": calibrator.fit["cross_validated"][calibrator.method]["ece"]}


def train_mask_head(cfg: TrainConfig, init: str | Path, progress: bool = True) -> Path:
    """Second stage: refine the mask path of trained weights ``init`` with everything else
    frozen, so detection, diameter and the malignancy branch stay exactly those of ``init``.

    Builds the network of ``init`` with ``cfg.mask_blocks`` full-resolution residual blocks in
    the mask path, copies every weight ``init`` has, and trains only the ``mask_*`` modules
    (their BatchNorm statistics included; every other BatchNorm stays in eval mode) on the mask
    term of the joint loss, with the same samples and augmentation as :func:`train`, for
    ``cfg.steps`` steps (AdamW, one-cycle). Writes ``cfg.out_dir/resmtnet.pt`` + ``.json`` (the
    config of ``init`` with the new mask path, and a ``"mask_stage"`` record) and fits the
    read-out when ``cfg.fit_readout``. Seeded, not resumable (minutes on a CPU).
    """
    from model.losses import mask_loss

    out, device = _prepare_run(cfg)
    init = Path(init)
    base, init_meta = load_weights(init, device="cpu")
    net_cfg = {**init_meta["config"], "mask_blocks": cfg.mask_blocks, "mask_width": cfg.mask_width}
    net = build_network(net_cfg)
    own = net.state_dict()
    # mask_* weights of another width start afresh; every other weight must fit exactly
    state = {k: v for k, v in base.state_dict().items() if not (k.startswith("mask_") and k in own and own[k].shape != v.shape)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("mask_") for k in missing):
        raise ValueError(f"{init} does not fit this network: missing {missing}, unexpected {unexpected}")
    net.to(device)
    for n, p in net.named_parameters():
        p.requires_grad_(n.startswith("mask_"))
    trainable = [p for p in net.parameters() if p.requires_grad]
    _, train_cubes, _ = D.split_cubes(D.load_cubes(limit=cfg.limit_cubes), cfg.val_fraction)
    (out / "config.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "stage": "mask", "init": str(init),
                                                 **provenance(), "train_cubes": len(train_cubes)}, indent=2) + "\n")
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    loader = torch.utils.data.DataLoader(SampleStream(train_cubes, cfg), batch_size=cfg.batch_size, num_workers=cfg.workers,
                                         persistent_workers=cfg.workers > 0)
    from tqdm import tqdm

    net.eval()
    for name, m in net.named_children():
        if name.startswith("mask_"):
            m.train()
    it = iter(loader)
    t0 = time.time()
    with open(out / "history.jsonl", "w", buffering=1) as f:
        for step in tqdm(range(1, cfg.steps + 1), disable=not progress, desc="mask stage", file=sys.stderr):
            batch = {k: v.to(device) for k, v in next(it).items()}
            loss = mask_loss(net(batch["image"])["mask"], batch["mask"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 5.0)
            opt.step(); sched.step()
            f.write(json.dumps({"step": step, "mask": round(float(loss.detach()), 4)}) + "\n")
    net.eval()
    meta = {**{k: v for k, v in init_meta.items() if k not in ("readout", "readout_fit", "validation")},
            "config": net_cfg, **provenance(),
            "mask_stage": {"init": str(init), "init_git_revision": init_meta.get("git_revision"), "steps": cfg.steps,
                           "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed, "mask_blocks": cfg.mask_blocks,
                           "mask_width": cfg.mask_width, "seconds": round(time.time() - t0, 1), "trained": "mask_* modules only; all else frozen"},
            "threshold": init_meta.get("threshold"),
            "note": "threshold is set by `dicom-node evaluate --protocol centred --write-threshold` on training scans (training cubes only)"}
    return _finish_run(net, out, meta, train_cubes, cfg.fit_readout, progress)
