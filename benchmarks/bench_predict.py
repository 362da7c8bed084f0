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
  inference) with **untrained** weights: a speed and memory comparison only. The sliding
  window uses ``--peer-roi`` (default 192x192x96 voxels) instead of the tutorial's
  512x512x192 so that it fits in memory here; the amount of computation is about the same.

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


def child_monai_retinanet(threads: int, roi: list[int]) -> dict:
    import numpy as np
    import SimpleITK as sitk
    import torch
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import RetinaNet, resnet_fpn_feature_extractor
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.networks.nets import resnet

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
    extractor = resnet_fpn_feature_extractor(backbone, 3, False, [1, 2], None)
    net = RetinaNet(spatial_dims=3, num_classes=1, num_anchors=anchor_generator.num_anchors_per_location()[0],
                    feature_extractor=extractor, size_divisible=[16, 16, 8])
    det = RetinaNetDetector(network=net, anchor_generator=anchor_generator, debug=False)
    det.set_target_keys(box_key="box", label_key="label")
    det.set_box_selector_parameters(score_thresh=0.02, topk_candidates_per_level=1000, nms_thresh=0.22, detections_per_img=300)
    det.set_sliding_window_inferer(roi_size=roi, overlap=0.25, sw_batch_size=1, mode="constant", device="cpu")
    det.eval()
    t = time.perf_counter()
    with torch.no_grad():
        out = det([torch.from_numpy(arr)[None]], use_inferer=True)
    infer_s = time.perf_counter() - t
    return {"model": "monai-retinanet-luna16 (untrained)", "threads": threads, "resample_s": round(prep_s, 2),
            "predict_s": [round(infer_s + prep_s, 2)], "network_s": round(infer_s, 2), "roi": roi, "input_xyz": list(arr.shape),
            "peak_rss_mb": round(_peak_mb(), 1), "n_boxes": int(out[0]["box"].shape[0]),
            "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 1)}


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
    ap.add_argument("--peer-timeout", type=float, default=1800)
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
