"""Inference: :class:`Predictor` turns a CT volume into a list of :class:`~model.finding.Finding`.

Pipeline (one call):
  1. resample the (Z, Y, X) HU array to 1 mm isotropic (linear; same voxel-[0,0,0] and axes);
  2. find the lung region (:func:`model.lungs.lung_region`; a small crop is its own region);
  3. *detection pass* (candidates): the network (without its mask head) on z slabs (at most
     160 mm) each covering the region's (y, x) bounding box within the slab, plus 16 mm of
     context; heatmap peaks of at least ``candidate_threshold`` whose centre lies in a slab core
     and in the region are kept, suppressed by distance (:func:`model.detector.suppress`), and
     the best ``max_candidates`` go on;
  4. *refinement pass* (re-scoring): for each candidate, a crop centred on it (32-64 mm), with
     its y/x flips, gives the refined centre, the score (the flip-averaged heatmap at that
     centre), the diameter, the malignancy and the full-resolution nodule mask (the connected
     component of ``sigmoid(mask) >= 0.5`` nearest the centre); findings scoring at least the
     threshold are suppressed by distance once more (two candidates refined onto one nodule);
  5. mapping back to the input grid: centre (z, y, x) voxel and LPS mm; the mask is resampled
     onto the input voxels around the nodule (``mask_offset`` + bool crop).

``diameter_mm`` is the network's regressed diameter (trained on the LUNA16 reference
diameters); ``volume_mm3`` is the mask volume on the input grid; ``malignancy`` the
probability that readers rate the nodule malignant (median rating > 3): the malignancy read-out
(:mod:`model.readout`: the malignancy branch's logit, the regressed diameter and HU statistics
inside the predicted mask) when the weights carry one, through its calibrator when they carry
one (:mod:`model.calibration`, fitted on training-only out-of-fold probabilities), else the
branch's own sigmoid; ``score``
the detection confidence: the refinement pass's flip-averaged heatmap at the refined centre. It
replaced the detection pass's peak value, which moves with the nodule's position inside the
large tile (measured in the model card: CPM on whole-scan validation).

Speed (``optimise=True``, the default; ``optimise=False`` is the reference path: four separate
torch forwards per candidate, every candidate flip-averaged):
  * the four flips of a refinement crop go through the network as one batch of 4;
  * a candidate whose *unflipped* score (the heatmap of a mask-less forward of the same crop at
    the same refined centre: the centre does not depend on the flips) is below
    ``threshold - skip_margin`` (0.15) is dropped without flip averaging. Measured
    (``benchmarks/bench_predict.py --skip-margin-study``: 298 candidates of LIDC-IDRI-0001 as is
    and mirrored, 3 phantoms and 55 validation cubes): flip averaging raised a score by at most
    0.117 (99th percentile of the change 0.093), so such a candidate cannot reach the
    threshold; the findings of all 60 inputs were the same with and without the skip (at a
    0.1 margin already). ``describe`` and a candidate that needs a larger crop are never
    skipped;
  * the network runs on ONNX Runtime when it is installed and its outputs match torch's
    (:mod:`model.onnx_backend`; ``runtime="torch"`` forces torch), else on torch, under
    ``torch.inference_mode``;
  * ``threads`` (``"auto"``: the cores this process may use, :mod:`model.threads`).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from model import DEFAULT_WEIGHTS
from model.data import resample_to_iso, voxel_to_world
from model.detector import Detection, decode, detections, peak_cells, sample_map, suppress
from model.finding import Finding
from model.lungs import Region, coarse_lung_region
from model.network import HEATMAP_STRIDE, INPUT_MULTIPLE, MALIGNANCY_STRIDE, fold_batchnorm, fuse_upsampling
from model.calibration import Calibrator
from model.readout import Readout, nodule_features
from model.threads import apply_torch_threads, resolve_threads
from model.checkpoint import load_weights
from model.transforms import normalize_hu

log = logging.getLogger(__name__)

FALLBACK_THRESHOLD = 0.5  # used only when the weights' metadata has no validated threshold


def _ceil_to(n: int, m: int) -> int:
    return int(-(-n // m) * m)


def _pad_crop(vol: np.ndarray, lo: np.ndarray, size: np.ndarray) -> np.ndarray:
    """vol[lo:lo+size] where voxels outside the volume mirror the volume (symmetric
    reflection about its faces, any distance): anatomy continues at the ends of a scan and
    around a small crop instead of meeting an artificial wall of air."""
    idx = []
    for a, n, s in zip(lo, vol.shape, size):
        i = np.arange(int(a), int(a) + int(s)) % (2 * n)
        idx.append(np.where(i >= n, 2 * n - 1 - i, i))
    if all(np.array_equal(i, np.arange(i[0], i[0] + len(i))) for i in idx):
        return vol[tuple(slice(int(i[0]), int(i[0]) + len(i)) for i in idx)].copy()
    return vol[np.ix_(*idx)]


class Predictor:
    """Res-MTNet nodule detector + malignancy classifier + segmenter. Loads the weights once.

    Args:
      weights: a ``.pt`` written by ``dicom-node train`` (with its ``.json`` beside it);
        ``None``: the default weights shipped in ``model/weights/``.
      threshold: minimum score (refinement-pass heatmap) of the returned findings; ``None``:
        the operating point chosen on validation (1 false positive per real-lung validation
        scan), stored in the weights' metadata.
      device: torch device ("cpu", "cuda").
      threads: CPU threads for the network (``"auto"``: :func:`model.threads.available_cpus`;
        1 when several workers share a host); sets torch's process-wide thread count.
      runtime: ``"auto"`` (ONNX Runtime when installed, on CPU, and matching torch; else torch),
        ``"torch"`` or ``"onnx"`` (raises RuntimeError when it cannot be used).
      optimise: False gives the reference path (see the module docstring), for comparison.
      detect_bf16: the detection pass (candidates only) in bfloat16 on torch, channels-last;
        ``None``: when optimising on a CPU with native bfloat16 (AVX512-BF16 or AMX), where it
        is about 2.8x faster than float32; the refinement pass stays float32.
    """

    slab = 160  # largest z extent (voxels = mm) of one detection-pass tile (bounds memory)
    margin = 16  # context (voxels) around each tile's core
    max_findings = 50
    # candidates: detection-pass peaks of at least ``candidate_threshold``, the best
    # ``max_candidates`` of them, are re-scored by the refinement pass; fixed, whatever the
    # threshold, so that a FROC curve computed at a low threshold is that of the same candidates
    candidate_threshold = 0.2
    max_candidates = 30
    max_tile_peaks = 100  # heatmap peaks decoded per detection-pass tile
    tta = True  # flip averaging in the refinement pass (score, malignancy, size, mask)
    # no flip averaging for a candidate whose unflipped score is below threshold - skip_margin
    # (flip averaging raised a candidate's score by at most 0.117 in 298 measured; None: never skip)
    skip_margin = 0.15

    def __init__(self, weights: str | Path | None = None, *, threshold: float | None = None, device: str = "cpu",
                 threads: int | str | None = "auto", runtime: str = "auto", optimise: bool = True,
                 detect_bf16: bool | None = None):
        path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
        if not path.exists():
            raise FileNotFoundError(f"weights {str(path)!r} not found")
        self.weights_path = path
        self.device = torch.device(device)
        net, self.meta = load_weights(path, device=device)
        self.net = fold_batchnorm(net)
        if optimise:  # one transposed convolution per decoder up-projection (same outputs)
            self.net = fuse_upsampling(self.net)
        self.readout = Readout.from_json(self.meta["readout"]) if self.meta.get("readout") else None
        # the read-out's probability through its calibrator (fitted on training-only out-of-fold
        # probabilities, :mod:`model.calibration`); None: the read-out's probability as is
        self.calibration = (Calibrator.from_json(self.meta["calibration"])
                            if self.meta.get("calibration") and self.readout is not None else None)
        stored = self.meta.get("threshold")
        self.threshold = float(threshold if threshold is not None else (stored if stored is not None else FALLBACK_THRESHOLD))
        self.last_timing: dict[str, float] = {}
        self.last_counts: dict[str, int] = {}
        self.last_cpu: dict[str, float] = {}
        self._counts = {"candidates": 0, "flip_averaged": 0, "skipped": 0}
        # when a list: (unflipped score, flip-averaged score) of every flip-averaged candidate
        # at its refined centre is appended (the skip margin's measurement)
        self.record_scores: list[tuple[float, float]] | None = None
        if runtime not in ("auto", "torch", "onnx"):
            raise ValueError(f"runtime must be 'auto', 'torch' or 'onnx', got {runtime!r}")
        self.threads = resolve_threads(threads)
        apply_torch_threads(self.threads)
        self.optimise = bool(optimise)
        self.onnx = None
        if self.optimise and runtime != "torch" and self.device.type == "cpu":
            from model import onnx_backend

            self.onnx = onnx_backend.open_runtime(self.net, path, self.threads)
        if runtime == "onnx" and self.onnx is None:
            raise RuntimeError("runtime 'onnx' requested but ONNX Runtime is not usable here (see the log)")
        self.runtime = "onnx" if self.onnx is not None else "torch"
        # channels-last 3-D: oneDNN kernels for every torch convolution (measured faster on
        # CPU; without it batch-1 3-D convolutions fall back to im2col), bfloat16 needs it
        self.channels_last = self.optimise and self.device.type == "cpu"
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last_3d)
        self.detect_bf16 = bool(detect_bf16) if detect_bf16 is not None else (self.channels_last and fast_bf16())

    # ------------------------------------------------------------------ public API
    def __call__(
        self,
        volume: np.ndarray,
        spacing: tuple[float, float, float],
        origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
        direction: np.ndarray | None = None,
    ) -> list[Finding]:
        """Findings in ``volume`` (Z, Y, X) HU with ``spacing`` (sz, sy, sx) mm, ``origin`` LPS
        mm (x, y, z) of voxel [0, 0, 0] and ``direction`` (3x3, SimpleITK convention), sorted
        by score (highest first)."""
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise ValueError(f"volume must be 3-D (Z, Y, X), got shape {volume.shape}")
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers (sz, sy, sx) in mm, got {spacing}")
        direction = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
        t0, c0 = time.perf_counter(), time.process_time()
        iso = resample_to_iso(volume, spacing)
        t1, c1 = time.perf_counter(), time.process_time()
        region = coarse_lung_region(iso)  # 2 mm grid, read at 1 mm (no 1 mm copy: memory)
        t2, c2 = time.perf_counter(), time.process_time()
        self._counts = {"candidates": 0, "flip_averaged": 0, "skipped": 0}
        with torch.inference_mode():
            dets = self._detect(iso, region)
            del region  # bool volume: not needed any more (peak memory)
            t3, c3 = time.perf_counter(), time.process_time()
            findings = []
            for det in dets[: self.max_candidates]:
                self._counts["candidates"] += 1
                f = self._refine(iso, det, volume.shape, spacing, origin, direction, may_skip=self.optimise)
                if f is not None and f.score >= self.threshold:
                    findings.append(f)
            findings = _suppress_findings(findings)[: self.max_findings]
        t4, c4 = time.perf_counter(), time.process_time()
        self.last_counts = dict(self._counts)
        self.last_timing = {"resample": t1 - t0, "lungs": t2 - t1, "detect": t3 - t2, "refine": t4 - t3, "total": t4 - t0}
        # CPU seconds (all threads of this process) per stage: steadier than wall seconds on a
        # loaded machine
        self.last_cpu = {"resample": c1 - c0, "lungs": c2 - c1, "detect": c3 - c2, "refine": c4 - c3, "total": c4 - c0}
        log.debug("timing %s", self.last_timing)
        return sorted(findings, key=lambda f: -f.score)

    def predict_image(self, image) -> list[Finding]:
        """Convenience wrapper for a ``SimpleITK.Image`` (any pixel type, HU values)."""
        import SimpleITK as sitk

        arr = sitk.GetArrayViewFromImage(image)  # no copy (peak memory); valid while ``image`` lives
        return self(arr, tuple(image.GetSpacing()[::-1]), tuple(image.GetOrigin()), np.array(image.GetDirection()).reshape(3, 3))

    def describe(self, volume: np.ndarray, center_voxel, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                 direction: np.ndarray | None = None, details: dict | None = None) -> Finding:
        """The refinement pass alone at a given nodule centre (z, y, x) voxel of ``volume``:
        malignancy, diameter and mask of a nodule whose location is known (used to evaluate
        characterisation separately from detection, and to fit the read-out). ``score`` is the
        heatmap there. A ``details`` dict receives ``"features"`` (the read-out's input,
        :data:`model.readout.FEATURES`) and ``"branch_malignancy"`` (the branch's own sigmoid)."""
        spacing = tuple(float(s) for s in spacing)
        direction = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
        iso = resample_to_iso(np.asarray(volume), spacing)
        c_iso = np.asarray(center_voxel, float) * np.asarray(spacing)
        with torch.inference_mode():
            return self._refine(iso, Detection(tuple(c_iso), 10.0, float("nan"), float("nan")), np.asarray(volume).shape,
                                spacing, origin, direction, details=details)

    # ------------------------------------------------------------------ passes
    def _run(self, hu_crop: np.ndarray, with_mask: bool, bf16: bool = False, detect_only: bool = False) -> dict[str, torch.Tensor]:
        """Network outputs (float32, CPU, with batch axis) for a (Z, Y, X) HU crop or a batch
        (B, Z, Y, X) of equal crops; ``bf16``: torch in bfloat16 (autocast); ``detect_only``:
        heatmap and features only (:meth:`model.network.ResMTNet.forward`), always on torch:
        on a whole-CT tile torch's channels-last convolutions beat ONNX Runtime (LIDC-IDRI-0001's
        two tiles: 3.6 against 4.5 s on 2 idle cores), on the small refinement crops ONNX Runtime
        wins by far."""
        if self.onnx is not None and not bf16 and not detect_only:  # int16 HU in, normalised inside
            hu = np.asarray(hu_crop).astype(np.int16, copy=False)
            out = self.onnx(hu[None, None] if hu.ndim == 3 else hu[:, None], "mask" if with_mask else "nomask")
            return {k: torch.from_numpy(v) for k, v in out.items()}
        x = normalize_hu(hu_crop)
        x = x[None, None] if x.ndim == 3 else x[:, None]
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        del x
        if self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = self.net(t, with_mask=with_mask, detect_only=detect_only)
        return {k: v.float().cpu() for k, v in out.items()}

    def _flip_batch(self, crop: np.ndarray) -> dict[str, torch.Tensor]:
        """:meth:`_flip_average` with the four crops (as is, flipped along y, x, both) as one
        batch of 4 through the network: same averages, one forward."""
        batch = np.stack([crop, crop[:, ::-1], crop[:, :, ::-1], crop[:, ::-1, ::-1]])
        o = self._run(batch, True)
        del batch
        out = {k: v[0:1] for k, v in o.items()}
        mean = {}
        for k in ("malignancy", "size", "mask", "heatmap"):
            v = o[k]
            acc = v[0:1].clone()
            acc += torch.flip(v[1:2], (3,))
            acc += torch.flip(v[2:3], (4,))
            acc += torch.flip(v[3:4], (3, 4))
            mean[k] = acc / 4
        return {**out, **mean, "heatmap": out["heatmap"], "heatmap_mean": mean["heatmap"]}

    def _flip_average(self, crop: np.ndarray, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Test-time augmentation of the refinement pass: the malignancy, size and mask maps are
        averaged over the crop flipped along y, x and both (maps flip back exactly because the
        crop extent is a multiple of every stride), and so is the heatmap, as
        ``"heatmap_mean"`` (the finding's score); heatmap and offsets stay those of the
        unflipped crop, so the centre is unchanged."""
        acc = {k: out[k].clone() for k in ("malignancy", "size", "mask", "heatmap")}
        flips = [(3,), (4,), (3, 4)]
        for dims in flips:
            o = self._run(np.ascontiguousarray(np.flip(crop, axis=tuple(d - 2 for d in dims))), True)
            for k in acc:
                acc[k] += torch.flip(o[k], dims)
        mean = {k: v / (len(flips) + 1) for k, v in acc.items()}
        return {**out, **mean, "heatmap": out["heatmap"], "heatmap_mean": mean["heatmap"]}

    def _detect(self, iso: np.ndarray, region: Region) -> list[Detection]:
        """Detection pass over the region's bounding box; detections in iso voxel coordinates."""
        box = region.bounding_box() or tuple(slice(0, n) for n in iso.shape)
        lo = np.array([s.start for s in box])
        ext = np.array([s.stop - s.start for s in box])
        margin = self.margin
        cand_thr = self.candidate_threshold
        found: list[Detection] = []
        # z slabs of at most ``slab`` voxels (core), each covering the region's (y, x) bounding
        # box within the slab, with ``margin`` voxels of context on every side
        n_slabs = max(1, int(np.ceil(ext[0] / self.slab)))
        edges = np.linspace(lo[0], lo[0] + ext[0], n_slabs + 1).round().astype(int)
        for z0, z1 in zip(edges[:-1], edges[1:]):
            sub = region.bounding_box((slice(int(z0), int(z1)), box[1], box[2]))
            if sub is None:
                continue
            core_lo = np.array([z0, lo[1] + sub[1].start, lo[2] + sub[2].start])
            core_hi = np.array([z1, lo[1] + sub[1].stop, lo[2] + sub[2].stop])
            size = np.maximum(_ceil_to_arr(core_hi - core_lo + 2 * margin, INPUT_MULTIPLE), 32)
            start = core_lo - (size - (core_hi - core_lo)) // 2
            crop = _pad_crop(iso, start, size)
            if self.optimise:
                # the heatmap over the tile, the offset and size heads at its peaks only
                out = self._run(crop, False, bf16=self.detect_bf16, detect_only=True)
                del crop
                cells, scores = peak_cells(out["heatmap"], cand_thr, self.max_tile_peaks)[0]
                heads = self.net.heads_at(out.pop("features").to(self.device), cells.to(self.device))
                dets = detections(cells, scores, heads["offset"].cpu(), heads["size"].cpu())
            else:
                out = self._run(crop, False)
                del crop
                dets = decode(out, threshold=cand_thr, max_detections=self.max_tile_peaks)[0]
            del out
            for d in dets:
                c = np.asarray(d.center) + start
                if np.all(c >= core_lo - 0.5) and np.all(c < core_hi - 0.5):
                    found.append(Detection(tuple(c), d.diameter, d.score, d.malignancy))
        inside = []
        for d in found:
            idx = tuple(np.clip(np.round(d.center).astype(int), 0, np.asarray(iso.shape) - 1))
            if region[idx]:  # decode kept only peaks >= cand_thr
                inside.append(d)
        return suppress(inside)

    @staticmethod
    def _refine_size(diameter: float) -> int:
        """Side (voxels = mm) of the refinement crop for a nodule of ``diameter`` mm."""
        return int(min(64, max(32, _ceil_to(int(1.6 * diameter + 12), INPUT_MULTIPLE))))

    def _refine(self, iso, det: Detection, in_shape, spacing, origin, direction, again: bool = True,
                details: dict | None = None, may_skip: bool = False) -> Finding | None:
        """Refinement pass on a crop centred on ``det``; returns the Finding in input
        coordinates. When the refined diameter needs a larger crop than the one used, the pass
        runs once more with it (so large nodules are not cut by the crop). With ``may_skip``
        (optimised path) it returns None, without flip averaging, for a candidate whose
        unflipped score is below ``threshold - skip_margin`` (module docstring)."""
        size = self._refine_size(det.diameter)
        c0 = np.round(np.asarray(det.center)).astype(int)
        start = c0 - size // 2
        crop = _pad_crop(iso, start, np.array([size] * 3))
        local = np.asarray(det.center) - start
        if not self.optimise or not self.tta:
            out = self._run(crop, True)
            if self.tta:
                out = self._flip_average(crop, out)
        else:
            if may_skip and self.skip_margin is not None:
                plain = self._run(crop, False)
                centre_u, diameter_u = _refined_centre(plain, local, det.diameter)
                score_u = sample_map(torch.sigmoid(plain["heatmap"][0]), centre_u, HEATMAP_STRIDE)
                if score_u < self.threshold - self.skip_margin and not (again and self._refine_size(diameter_u) > size):
                    self._counts["skipped"] += 1
                    return None
            out = self._flip_batch(crop)
            self._counts["flip_averaged"] += 1
        centre_l, diameter = _refined_centre(out, local, det.diameter)
        if again and self._refine_size(diameter) > size:
            bigger = Detection(tuple(centre_l + start), diameter, det.score, det.malignancy)
            return self._refine(iso, bigger, in_shape, spacing, origin, direction, again=False, details=details,
                                may_skip=may_skip)
        # the score: sigmoid of the (flip-averaged) heatmap logits of this crop, centred on the
        # candidate, at the refined centre; steadier than the detection pass's peak, whose value
        # moves with the position of the nodule in the large tile
        score = sample_map(torch.sigmoid(out.get("heatmap_mean", out["heatmap"])[0]), centre_l, HEATMAP_STRIDE)
        if self.record_scores is not None and "heatmap_mean" in out:
            self.record_scores.append((sample_map(torch.sigmoid(out["heatmap"][0]), centre_l, HEATMAP_STRIDE), score))
        prob = torch.sigmoid(out["mask"][0, 0]).numpy()
        mask = _component_near(prob >= 0.5, centre_l, radius=max(2.0, diameter / 2))
        logit = sample_map(out["malignancy"][0], centre_l, MALIGNANCY_STRIDE)
        features = nodule_features(crop, mask, diameter, logit)
        branch = float(1.0 / (1.0 + np.exp(-logit)))
        malignancy = float(self.readout.probability(features)[0]) if self.readout is not None else branch
        uncalibrated = malignancy
        if self.calibration is not None:
            malignancy = float(self.calibration(malignancy))
        if details is not None:
            details.update(features=features, branch_malignancy=branch, uncalibrated_malignancy=uncalibrated)
        centre_iso = centre_l + start
        sp = np.asarray(spacing)
        centre_in = centre_iso / sp  # iso voxel j lies at input voxel j * 1 mm / spacing
        centre_mm = voxel_to_world(centre_in, origin, spacing, direction)
        m_in, m_off = _mask_to_input(prob, mask, start, sp, in_shape)
        vol_mm3 = float(m_in.sum() * np.prod(sp)) if m_in is not None else 0.0
        return Finding(
            center_mm=tuple(float(v) for v in centre_mm),
            center_voxel=tuple(float(v) for v in centre_in),
            diameter_mm=float(diameter),
            volume_mm3=vol_mm3,
            malignancy=float(np.clip(malignancy, 0, 1)),
            score=float(score),
            mask=m_in,
            mask_offset=m_off,
        )


def fast_bf16() -> bool:
    """True on a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX tiles)."""
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def _refined_centre(out: dict[str, torch.Tensor], local: np.ndarray, diameter: float) -> tuple[np.ndarray, float]:
    """(refined centre, diameter) in crop voxels: the strongest heatmap peak of ``out`` within
    max(3, diameter / 2) voxels of the candidate centre ``local``; the candidate centre and the
    size map there when there is none. Peaks and offsets come from the unflipped crop, so the
    centre is the same with or without flip averaging (the diameter is not)."""
    dets = decode(out, threshold=0.0, max_detections=20)[0]
    near = [d for d in dets if np.linalg.norm(np.asarray(d.center) - local) <= max(3.0, diameter / 2)]
    best = max(near, key=lambda d: d.score) if near else None
    centre_l = np.asarray(best.center) if best is not None else local
    cell = tuple(np.clip((centre_l // HEATMAP_STRIDE).astype(int), 0, np.asarray(out["size"].shape[2:]) - 1))
    diam = best.diameter if best is not None else float(torch.exp(out["size"][(0, 0) + cell]))
    return centre_l, float(diam)


def _suppress_findings(findings: list[Finding]) -> list[Finding]:
    """Distance suppression (:func:`model.detector.suppress`, in mm) of refined findings: two
    candidates that the refinement pass moved onto the same nodule are reported once."""
    return suppress(findings, centre=lambda f: f.center_mm, diameter=lambda f: f.diameter_mm)


def _ceil_to_arr(a: np.ndarray, m: int) -> np.ndarray:
    return (-(-np.asarray(a) // m) * m).astype(int)


def _component_near(binary: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """The connected component of ``binary`` with a voxel within ``radius`` of ``centre``
    (the one closest to it); a ball of ``radius`` when there is none."""
    lab, n = ndi.label(binary)
    if n:
        zz, yy, xx = np.ogrid[: binary.shape[0], : binary.shape[1], : binary.shape[2]]
        dist = np.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2)
        best, best_d = 0, np.inf
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            d = float(dist[sl][lab[sl] == i].min())
            if d < best_d:
                best, best_d = i, d
        if best_d <= radius:
            return lab == best
    zz, yy, xx = np.ogrid[: binary.shape[0], : binary.shape[1], : binary.shape[2]]
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2


def _mask_to_input(prob: np.ndarray, mask: np.ndarray, start: np.ndarray, spacing: np.ndarray, in_shape) -> tuple[np.ndarray | None, tuple[int, int, int]]:
    """Resample a 1 mm mask (crop at iso voxel ``start``) onto the input grid.

    Returns (bool crop, offset (z, y, x) in input voxels); (None, (0,0,0)) if empty."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None, (0, 0, 0)
    lo_iso = idx.min(0) + start - 1
    hi_iso = idx.max(0) + start + 1
    lo = np.maximum(np.floor(lo_iso / spacing).astype(int), 0)
    hi = np.minimum(np.ceil(hi_iso / spacing).astype(int) + 1, in_shape)
    if np.any(hi <= lo):
        return None, (0, 0, 0)
    grids = np.meshgrid(*[np.arange(a, b) * s for a, b, s in zip(lo, hi, spacing)], indexing="ij")
    coords = np.stack([g - s for g, s in zip(grids, start)])
    soft = ndi.map_coordinates(np.where(mask, prob, 0.0).astype(np.float32), coords, order=1, mode="constant", cval=0.0)
    out = soft >= 0.5
    if not out.any():  # sub-voxel nodule on a coarse grid: keep the voxel nearest the centre
        out[tuple(np.asarray(out.shape) // 2)] = True
    return out, tuple(int(v) for v in lo)


def default_threshold(weights: str | Path | None = None) -> float | None:
    """The validated operating point stored beside ``weights`` (default weights if None)."""
    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    meta = json.loads(path.with_suffix(".json").read_text())
    return meta.get("threshold")
