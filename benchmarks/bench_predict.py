"""Benchmark ``dicom-node predict`` on the real LIDC-IDRI-0001 CT: before and after the speed
work (issue 12), in one run, beside the MONAI RetinaNet peer.

    .venv/bin/python benchmarks/bench_predict.py [--repeat 2] [--threads 2] [--no-peer]
        [--before-rev REV] [--json docs/model/bench_predict.json]

Every measurement is a fresh subprocess, measured by the parent with ``os.wait4`` (that child's
own wall seconds, CPU seconds (user + system, all threads) and peak RSS), so the figures hold
under load; the load average (``os.getloadavg``) is printed before and after each.

* ``before``: ``dicom-node predict LIDC-IDRI-0001 --json --reference`` (the reference path of
  this tree: four torch forwards per candidate, every candidate flip-averaged, no ONNX Runtime,
  no bfloat16); with ``--before-rev REV`` instead the ``dicom-node predict`` of git revision
  ``REV`` (``git archive`` into a temporary folder, run with ``PYTHONPATH`` on it).
* ``after``: ``dicom-node predict LIDC-IDRI-0001 --json`` (defaults: optimised, ``--threads
  auto``). A first, untimed ``after`` run exports and caches the ONNX graphs (its figures are
  reported as ``first_run``).
  Runs alternate before/after so that both meet the same load.
* findings diff: each ``after`` finding matched to the nearest ``before`` one: max centre
  distance (mm), max |malignancy| and |score| differences, counts.
* ``--peer`` (default on): the MONAI RetinaNet LUNA16 detector configuration (MONAI tutorials
  ``detection/config/config_train_luna16_16g.json``: 3-D ResNet-50 backbone with
  ``conv1_t_stride=[2,2,1]``, FPN ``returned_layers=[1,2]``, anchors ``[[6,8,4],[8,6,5],[10,10,6]]``
  at scales ``[1,2,4]``, input resampled to 0.703125 x 0.703125 x 1.25 mm, sliding-window
  inference) with **untrained (random) weights**: it measures speed and memory on the same
  volume only, no findings. A whole run takes tens of minutes here, so the network is timed on
  one ``--peer-roi`` window (default 192x192x96 voxels) and the time is extrapolated to the
  number of sliding windows (at that roi, and per voxel at the tutorial's 512x512x192 roi).

Target (issue 12): after <= 8 s and <= 1.2 GB on 2 idle cores, findings within 1 mm and 0.02.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIDC = ROOT.parent / "shared" / "data" / "lidc-idri" / "LIDC-IDRI-0001"
REFERENCE_MM = (56.17, 86.20, -115.86)
DEFAULT_JSON = ROOT / "docs" / "model" / "bench_predict.json"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def measure(cmd: list[str], env: dict | None = None, timeout: float = 1800, cwd: Path = ROOT) -> dict:
    """Run ``cmd``; its wall seconds, CPU seconds (user + system of the child and everything it
    waited for) and peak RSS (MB) from ``os.wait4``, its stdout, the load average around it."""
    load0 = _load()
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, env=env, text=True)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return {"rc": p.returncode, "wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
            "peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "load_before": load0, "load_after": _load(),
            "stdout": stdout, "stderr_tail": stderr.strip().splitlines()[-3:]}


def _predict_cmd(threads: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "dicom_node.cli", "predict", str(LIDC), "--json", "--threads", str(threads), *extra]


def _predict_run(cmd, env, cwd: Path = ROOT) -> dict:
    m = measure(cmd, env, cwd=cwd)
    lines = [json.loads(x) for x in m.pop("stdout").splitlines() if x.startswith("{")]
    m["result"] = lines[-1] if lines else None
    return m


def diff_findings(before: list[dict], after: list[dict]) -> dict:
    """Each ``after`` finding matched to the nearest ``before`` one (LPS mm)."""
    import numpy as np

    if not before or not after:
        return {"n_before": len(before), "n_after": len(after), "max_centre_mm": None if before or after else 0.0,
                "max_malignancy_diff": None, "max_score_diff": None}
    dist, dmal, dscore = [], [], []
    for a in after:
        b = min(before, key=lambda b: np.linalg.norm(np.subtract(a["center_mm"], b["center_mm"])))
        dist.append(float(np.linalg.norm(np.subtract(a["center_mm"], b["center_mm"]))))
        dmal.append(abs(a["malignancy"] - b["malignancy"]))
        dscore.append(abs(a["score"] - b["score"]))
    return {"n_before": len(before), "n_after": len(after), "max_centre_mm": round(max(dist), 3),
            "max_malignancy_diff": round(max(dmal), 4), "max_score_diff": round(max(dscore), 4)}


def _summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["rc"] == 0 and r.get("result")]
    if not ok:
        return {"error": runs[-1]["stderr_tail"] if runs else "no run"}
    return {
        "process_wall_s": [r["wall_s"] for r in ok], "process_cpu_s": [r["cpu_s"] for r in ok],
        "predict_wall_s": [r["result"]["seconds"] for r in ok],
        "predict_cpu_s": [r["result"].get("cpu_seconds") for r in ok],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ok), "load": [[r["load_before"], r["load_after"]] for r in ok],
        "findings": ok[-1]["result"]["findings"],
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


def child_stages(reference: bool, threads: str) -> dict:
    """One in-process ``predict_image``: per-stage wall and CPU
    seconds and the candidate counts of the refinement pass."""
    sys.path.insert(0, str(ROOT))
    from model.data import read_image
    from model.inference import Predictor

    image = read_image(LIDC)
    p = Predictor(threads=threads, optimise=not reference)
    p.predict_image(image)
    return {"mode": "reference" if reference else "optimised", "runtime": p.runtime, "threads": p.threads,
            "detect_bf16": getattr(p, "detect_bf16", False),
            "wall_s": {k: round(v, 2) for k, v in p.last_timing.items()},
            "cpu_s": {k: round(v, 2) for k, v in p.last_cpu.items()}, "counts": p.last_counts,
            "peak_rss_mb": round(_peak_mb(), 1)}


def skip_margin_study(n_cubes: int = 55, phantoms: int = 3) -> dict:
    """Every candidate flip-averaged (no skip) on LIDC-IDRI-0001 as is and mirrored in x,
    ``phantoms`` phantoms and ``n_cubes`` validation cubes: how far flip averaging moves a
    candidate's score (flip-averaged minus unflipped, at the refined centre), and whether the
    findings with the skip equal those without (centre, score, malignancy to 1e-6)."""
    import numpy as np
    import SimpleITK as sitk

    sys.path.insert(0, str(ROOT))
    from model import data as D
    from model.inference import Predictor
    from model.phantom import make_phantom

    p = Predictor(threads=1)
    margin = p.skip_margin
    img = D.read_image(D.LIDC_0001)
    arr, sp = sitk.GetArrayFromImage(img), tuple(img.GetSpacing()[::-1])
    inputs = [("lidc", arr, sp), ("lidc-mirror-x", np.ascontiguousarray(arr[:, :, ::-1]), sp)]
    inputs += [(f"phantom{s}", make_phantom(seed=s, n_nodules=6).hu, (1.0, 1.0, 1.0)) for s in range(phantoms)]
    cubes = D.load_cubes()
    val = D.split_by_series([c.seriesuid for c in cubes])
    inputs += [(f"cube {c.seriesuid[-8:]}", c.image, (1.0, 1.0, 1.0)) for c in cubes if c.seriesuid in val][:n_cubes]
    pairs, mismatch, n_findings = [], [], 0
    t = time.perf_counter()
    for name, vol, spacing in inputs:
        p.skip_margin, p.record_scores = None, []
        full = p(vol, spacing)
        pairs += p.record_scores
        p.skip_margin, p.record_scores = margin, None
        fast = p(vol, spacing)
        n_findings += len(full)
        same = len(full) == len(fast) and all(
            np.linalg.norm(np.subtract(a.center_mm, b.center_mm)) <= 1e-6 and abs(a.score - b.score) <= 1e-6
            and abs(a.malignancy - b.malignancy) <= 1e-6 for a, b in zip(full, fast))
        if not same:
            mismatch.append(name)
    d = np.array([m - u for u, m in pairs])
    return {"skip_margin": margin, "threshold": p.threshold, "inputs": len(inputs), "candidates": int(d.size),
            "findings": n_findings, "max_increase": round(float(d.max()), 4), "max_abs_change": round(float(np.abs(d).max()), 4),
            "p99_abs_change": round(float(np.quantile(np.abs(d), 0.99)), 4), "inputs_with_other_findings": mismatch,
            "seconds": round(time.perf_counter() - t, 1)}


def _spawn_child(args: list[str], timeout: float) -> dict:
    m = measure([sys.executable, __file__, *args], timeout=timeout)
    if m["rc"] != 0:
        return {"error": m["stderr_tail"], "cmd": args}
    out = json.loads(m["stdout"].strip().splitlines()[-1])
    out.update(process_wall_s=m["wall_s"], process_cpu_s=m["cpu_s"], process_peak_rss_mb=m["peak_rss_mb"],
               load=[m["load_before"], m["load_after"]])
    return out


def _before_tree(rev: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="bench-before-"))
    data = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=data, check=True)
    return tmp


def _fmt(v) -> str:
    if isinstance(v, list):
        v = [x for x in v if x is not None]
        if not v:
            return "-"
        return f"{min(v):.1f}-{max(v):.1f}" if len(v) > 1 and min(v) != max(v) else f"{v[0]:.1f}"
    return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def print_table(res: dict) -> None:
    rows = [("", "before", "after", "MONAI RetinaNet (untrained, est.)")]
    b, a, m = res.get("before", {}), res.get("after", {}), res.get("monai_retinanet") or {}
    rows.append(("predict wall s (in CLI)", _fmt(b.get("predict_wall_s")), _fmt(a.get("predict_wall_s")),
                 _fmt(m.get("estimated_predict_s_at_tutorial_roi"))))
    rows.append(("predict CPU s (in CLI)", _fmt(b.get("predict_cpu_s")), _fmt(a.get("predict_cpu_s")), "-"))
    rows.append(("process wall s", _fmt(b.get("process_wall_s")), _fmt(a.get("process_wall_s")), "-"))
    rows.append(("process CPU s", _fmt(b.get("process_cpu_s")), _fmt(a.get("process_cpu_s")), "-"))
    rows.append(("peak RSS MB", _fmt(b.get("peak_rss_mb")), _fmt(a.get("peak_rss_mb")),
                 _fmt(m.get("process_peak_rss_mb")) + " (one window)" if m else "-"))
    d = res.get("findings_diff", {})
    rows.append(("findings", str(d.get("n_before")), str(d.get("n_after")), "-"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    print(f"findings diff: max centre {d.get('max_centre_mm')} mm, max malignancy {d.get('max_malignancy_diff')}, "
          f"max score {d.get('max_score_diff')}")
    print(f"load average before {res['load_average_before']} after {res['load_average_after']} "
          f"on {res['cpus_usable']} usable CPUs")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of before and of after (alternating)")
    ap.add_argument("--threads", default="2", help="--threads for predict (default: %(default)s; 'auto' allowed)")
    ap.add_argument("--before-rev", default=None, help="git revision whose predict is 'before' (default: --reference of this tree)")
    ap.add_argument("--peer", dest="peer", action="store_true", default=True, help="run the MONAI RetinaNet peer (default)")
    ap.add_argument("--no-peer", dest="peer", action="store_false", help="skip the MONAI RetinaNet peer")
    ap.add_argument("--no-stages", dest="stages", action="store_false", help="skip the per-stage breakdown")
    ap.add_argument("--peer-roi", type=int, nargs=3, default=[192, 192, 96])
    ap.add_argument("--peer-timeout", type=float, default=900)
    ap.add_argument("--json", default=str(DEFAULT_JSON), help="write the results here (default: %(default)s)")
    ap.add_argument("--skip-margin-study", action="store_true",
                    help="only measure how far flip averaging moves candidate scores (minutes; 1 thread) and print it")
    ap.add_argument("--child", choices=["monai", "stages"], help=argparse.SUPPRESS)
    ap.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child == "monai":
        print(json.dumps(child_monai_retinanet(int(a.threads), a.peer_roi)))
        return 0
    if a.child == "stages":
        print(json.dumps(child_stages(a.reference, a.threads)))
        return 0
    if a.skip_margin_study:
        print(json.dumps(skip_margin_study(), indent=2))
        return 0
    if not LIDC.is_dir():
        print(f"bench_predict: LIDC-IDRI-0001 not found at {LIDC} (shared data absent); nothing to measure", file=sys.stderr)
        return 0
    sys.path.insert(0, str(ROOT))
    from model.threads import available_cpus

    res = {"cpus_usable": available_cpus(), "threads": a.threads, "load_average_before": _load(),
           "before_is": f"git {a.before_rev}" if a.before_rev else "this tree, predict --reference"}
    env_after = dict(os.environ, PYTHONPATH=str(ROOT))
    before_tree = _before_tree(a.before_rev) if a.before_rev else None
    if before_tree:
        cmd_before = [sys.executable, "-m", "dicom_node.cli", "predict", str(LIDC), "--json"]
        env_before = dict(os.environ, PYTHONPATH=str(before_tree))
    else:
        cmd_before, env_before = _predict_cmd(a.threads, ["--reference"]), env_after
    cmd_after = _predict_cmd(a.threads, [])
    try:
        first = _predict_run(cmd_after, env_after)  # exports and caches the ONNX graphs
        res["first_run"] = {k: first[k] for k in ("rc", "wall_s", "cpu_s", "peak_rss_mb")}
        before, after = [], []
        for i in range(a.repeat):
            # ``python -m`` puts the working folder first on sys.path: run "before" from its tree
            before.append(_predict_run(cmd_before, env_before, cwd=before_tree or ROOT))
            print(f"before {i + 1}/{a.repeat}: {before[-1]['wall_s']} s, {before[-1]['cpu_s']} CPU s, load {_load()}", file=sys.stderr)
            after.append(_predict_run(cmd_after, env_after))
            print(f"after {i + 1}/{a.repeat}: {after[-1]['wall_s']} s, {after[-1]['cpu_s']} CPU s, load {_load()}", file=sys.stderr)
    finally:
        if before_tree:
            shutil.rmtree(before_tree, ignore_errors=True)
    res["before"], res["after"] = _summary(before), _summary(after)
    res["findings_diff"] = diff_findings(res["before"].get("findings", []), res["after"].get("findings", []))
    if a.stages:
        res["stages_after"] = _spawn_child(["--child", "stages", "--threads", a.threads], 900)
        res["stages_reference"] = _spawn_child(["--child", "stages", "--threads", a.threads, "--reference"], 1800)
    if a.peer:
        res["monai_retinanet"] = _spawn_child(["--child", "monai", "--threads", a.threads, "--peer-roi", *map(str, a.peer_roi)],
                                              a.peer_timeout)
    res["load_average_after"] = _load()
    print_table(res)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"written {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
