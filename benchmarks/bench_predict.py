"""Benchmark ``predict`` on the real LIDC-IDRI-0001 CT: wall seconds and peak memory.

    .venv/bin/python benchmarks/bench_predict.py [--repeat 3] [--threads 2] [--peer] [--json OUT]

Each measurement runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its own:

* ``resmtnet``: :class:`model.inference.Predictor` with the shipped weights, ``predict_image``
  on the series as read by SimpleITK (DICOM reading timed separately), ``--repeat`` calls; it
  also reports whether the reference nodule was found and its malignancy.
* ``--peer``: the MONAI RetinaNet LUNA16 detector configuration (MONAI tutorials
  ``detection/config/config_train_luna16_16g.json``: 3-D ResNet-50 backbone with
  ``conv1_t_stride=[2,2,1]``, FPN ``returned_layers=[1,2]``, anchors ``[[6,8,4],[8,6,5],[10,10,6]]``
  at scales ``[1,2,4]``, input resampled to 0.703125 x 0.703125 x 1.25 mm, sliding-window
  inference) with **untrained** weights: a speed and memory comparison only. A whole run
  takes tens of minutes here, so the network is timed on one ``--peer-roi`` window (default
  192x192x96 voxels) and the time is extrapolated to the number of sliding windows (at that
  roi, and per voxel at the tutorial's 512x512x192 roi); the report says so.

Targets (issue 3): <= 30 s and <= 3 GB on a 2-core CPU for ResMTNet.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIDC = ROOT.parent / "shared" / "data" / "lidc-idri" / "LIDC-IDRI-0001"
REFERENCE_MM = (56.17, 86.20, -115.86)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_resmtnet(repeat: int, threads: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from model.data import read_image
    from model.inference import Predictor

    t = time.perf_counter()
    image = read_image(LIDC)
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    predictor = Predictor()
    load_s = time.perf_counter() - t
    runs, timings = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        findings = predictor.predict_image(image)
        runs.append(time.perf_counter() - t)
        timings.append({k: round(v, 2) for k, v in predictor.last_timing.items()})
    ref = np.asarray(REFERENCE_MM)
    hits = [f for f in findings if np.linalg.norm(np.subtract(f.center_mm, ref)) <= 33.0 / 2]
    return {
        "model": "resmtnet", "threads": threads, "dicom_read_s": round(read_s, 2), "weights_load_s": round(load_s, 2),
        "predict_s": [round(r, 2) for r in runs], "stages_s": timings, "peak_rss_mb": round(_peak_mb(), 1),
        "n_findings": len(findings), "threshold": predictor.threshold,
        "reference_found": bool(hits), "reference": hits[0].to_json() if hits else None,
        "volume": list(image.GetSize()), "spacing": list(image.GetSpacing()),
    }


def _has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def _intermediate_layer_getter():
    import torch

    class IntermediateLayerGetter(torch.nn.ModuleDict):
        """torchvision.models._utils.IntermediateLayerGetter (BSD-3-Clause), same behaviour:
        the backbone's children up to the last returned layer, returning those outputs."""

        def __init__(self, model, return_layers):
            wanted = dict(return_layers)
            layers = {}
            for name, module in model.named_children():
                layers[name] = module
                wanted.pop(name, None)
                if not wanted:
                    break
            super().__init__(layers)
            self.return_layers = dict(return_layers)

        def forward(self, x):
            out = {}
            for name, module in self.items():
                x = module(x)
                if name in self.return_layers:
                    out[self.return_layers[name]] = x
            return out

    return IntermediateLayerGetter


class _Lazy:
    def __call__(self, *a, **k):
        return _intermediate_layer_getter()(*a, **k)


_IntermediateLayerGetter = _Lazy()


def _windows(size, roi, overlap=0.25) -> int:
    """Number of sliding windows MONAI's SlidingWindowInferer uses for ``size`` and ``roi``."""
    import math

    n = 1
    for s, r in zip(size, roi):
        step = max(1, int(r * (1 - overlap)))
        n *= 1 if s <= r else math.ceil((s - r) / step) + 1
    return n


def child_monai_retinanet(threads: int, roi: list[int]) -> dict:
    """Time the RetinaNet network on ``roi`` windows of the resampled LIDC-IDRI-0001 and
    extrapolate to the whole sliding-window inference (one full run takes tens of minutes on
    this CPU: the tutorial configuration is about 70 TFLOP per CT, mostly its 256-channel
    heads at stride 4)."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from monai.apps.detection.networks.retinanet_network import RetinaNet
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    import monai.networks.blocks.backbone_fpn_utils as fpn_utils
    from monai.networks.blocks.backbone_fpn_utils import _resnet_fpn_extractor
    from monai.networks.nets import resnet

    if not _has_torchvision():  # MONAI borrows one small class from torchvision: provide it
        import types

        fpn_utils.torchvision_models = types.SimpleNamespace(_utils=types.SimpleNamespace(IntermediateLayerGetter=_IntermediateLayerGetter))

    torch.set_num_threads(threads)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(LIDC)))
    image = reader.Execute()
    t = time.perf_counter()
    spacing = (0.703125, 0.703125, 1.25)
    size = [int(round(n * s / t_)) for n, s, t_ in zip(image.GetSize(), image.GetSpacing(), spacing)]
    res = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing, image.GetDirection(), -1024, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(res).transpose(2, 1, 0)  # MONAI order (x, y, z)
    arr = np.clip((arr + 1024.0) / (300.0 + 1024.0), 0, 1).astype(np.float32)
    prep_s = time.perf_counter() - t
    anchor_generator = AnchorGeneratorWithAnchorShape(feature_map_scales=[1, 2, 4], base_anchor_shapes=[[6, 8, 4], [8, 6, 5], [10, 10, 6]])
    backbone = resnet.ResNet(block=resnet.ResNetBottleneck, layers=[3, 4, 6, 3], block_inplanes=resnet.get_inplanes(),
                             n_input_channels=1, conv1_t_stride=[2, 2, 1], conv1_t_size=[7, 7, 7])
    # = monai's resnet_fpn_feature_extractor(backbone, 3, False, [1, 2], None) without its
    # torchvision-only argument check (5 trainable layers when not pretrained)
    extractor = _resnet_fpn_extractor(backbone, 3, 5, returned_layers=[1, 2], extra_blocks=None)
    net = RetinaNet(spatial_dims=3, num_classes=1, num_anchors=anchor_generator.num_anchors_per_location()[0],
                    feature_extractor=extractor, size_divisible=[16, 16, 8]).eval()
    x0, y0, z0 = [(s - r) // 2 for s, r in zip(arr.shape, roi)]
    window = torch.from_numpy(np.ascontiguousarray(arr[x0:x0 + roi[0], y0:y0 + roi[1], z0:z0 + roi[2]]))[None, None]
    times = []
    with torch.no_grad():
        for _ in range(2):
            t = time.perf_counter()
            net(window)
            times.append(time.perf_counter() - t)
    per_window = times[-1]
    n_small = _windows(arr.shape, roi)
    tutorial_roi = [512, 512, 192]
    n_tut = _windows(arr.shape, tutorial_roi)
    per_voxel = per_window / float(np.prod(roi))
    return {"model": "monai-retinanet-luna16 (untrained)", "threads": threads, "resample_s": round(prep_s, 2),
            "input_xyz": list(arr.shape), "roi_measured": roi, "window_s": [round(v, 2) for v in times],
            "windows_at_roi": n_small, "estimated_predict_s_at_roi": round(prep_s + n_small * per_window, 1),
            "tutorial_roi": tutorial_roi, "windows_at_tutorial_roi": n_tut,
            "estimated_predict_s_at_tutorial_roi": round(prep_s + n_tut * float(np.prod(tutorial_roi)) * per_voxel, 1),
            "peak_rss_mb_one_window": round(_peak_mb(), 1),
            "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 1),
            "note": "estimates: measured time of one window x number of sliding windows (overlap 0.25)"}


def _spawn(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, __file__, *args]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s", "cmd": args}
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}", "cmd": args}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = round(time.perf_counter() - t, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer", action="store_true", help="also run the MONAI RetinaNet LUNA16 configuration (untrained)")
    ap.add_argument("--peer-roi", type=int, nargs=3, default=[192, 192, 96])
    ap.add_argument("--peer-timeout", type=float, default=900)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", choices=["resmtnet", "monai"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child == "resmtnet":
        print(json.dumps(child_resmtnet(a.repeat, a.threads)))
        return 0
    if a.child == "monai":
        print(json.dumps(child_monai_retinanet(a.threads, a.peer_roi)))
        return 0
    if not LIDC.is_dir():
        print(f"bench_predict: LIDC-IDRI-0001 not found at {LIDC} (shared data absent); nothing to measure", file=sys.stderr)
        return 0
    results = {"cpu_count": os.cpu_count(), "load_average_before": os.getloadavg()}
    results["resmtnet"] = _spawn(["--child", "resmtnet", "--repeat", str(a.repeat), "--threads", str(a.threads)], 600)
    if a.peer:
        results["monai_retinanet"] = _spawn(["--child", "monai", "--threads", str(a.threads), "--peer-roi", *map(str, a.peer_roi)], a.peer_timeout)
    results["load_average_after"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
