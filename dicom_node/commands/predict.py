"""``dicom-node predict``: run Res-MTNet on DICOM series folders or volume files.

Prints one JSON object per input on its own line (DESIGN.md):
``{"input": ..., "findings": [{"center_mm": [x, y, z], "diameter_mm": ..., "volume_mm3": ...,
"malignancy": p, "score": s}, ...], "seconds": ..., "cpu_seconds": ...}`` with coordinates in DICOM
patient (LPS) millimetres (``seconds``: wall time of reading and predicting the input;
``cpu_seconds``: CPU time of this process over the same span, all threads); an input that cannot be read gives ``{"input": ..., "error": "..."}`` and exit
status 1. With ``--masks DIR`` each input's nodule mask (label i = finding i, by score) is
written as ``DIR/<name>_mask.nii.gz`` with the input's geometry.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="find and characterise lung nodules in CT volumes", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM series folder or volume file (.mha, .mhd, .nii.gz, .nrrd)")
    p.add_argument("--json", action="store_true", help="one JSON object per input on stdout (the only output format)")
    p.add_argument("--masks", metavar="DIR", default=None, help="write each input's nodule label mask here")
    p.add_argument("--threshold", type=float, default=None,
                   help="minimum detection score (default: the validated operating point, ~1 false positive per scan)")
    p.add_argument("--weights", default=None, help="weights file (default: the shipped model/weights/resmtnet.pt)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--threads", default="auto",
                   help="CPU threads (default: %(default)s = the cores this process may use; 1 when several "
                        "workers share a host)")
    p.add_argument("--runtime", choices=["auto", "torch", "onnx"], default="auto",
                   help="network runtime (default: %(default)s = ONNX Runtime when installed and matching torch)")
    p.add_argument("--reference", action="store_true",
                   help="the reference path without the speed optimisations (for comparison; slower)")
    p.set_defaults(func=run)


def mask_name(path: Path) -> str:
    """A safe file stem for the mask of ``path`` (volume file suffixes removed)."""
    name = path.name if path.is_dir() else re.sub(r"(\.nii\.gz|\.nii|\.mha|\.mhd|\.nrrd|\.dcm)$", "", path.name)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "input"


def write_mask(image, findings, out: Path) -> None:
    """Label volume (uint8/uint16, label i+1 for finding i) with ``image``'s geometry."""
    import numpy as np
    import SimpleITK as sitk

    shape = image.GetSize()[::-1]
    labels = np.zeros(shape, np.uint16 if len(findings) > 255 else np.uint8)
    for i, f in enumerate(findings):
        if f.mask is None:
            continue
        sl = tuple(slice(o, min(o + n, s)) for o, n, s in zip(f.mask_offset, f.mask.shape, shape))
        sub = f.mask[tuple(slice(0, s.stop - s.start) for s in sl)]
        view = labels[sl]
        view[sub & (view == 0)] = i + 1
    img = sitk.GetImageFromArray(labels)
    img.CopyInformation(image)
    out.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(out), useCompression=True)


def run(args) -> int:
    from model.data import read_image
    from model.inference import Predictor

    try:
        predictor = Predictor(args.weights, threshold=args.threshold, device=args.device, threads=args.threads,
                              runtime=args.runtime, optimise=not args.reference)
    except FileNotFoundError as exc:
        print(f"dicom-node predict: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as exc:
        print(f"dicom-node predict: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    # A progress bar on stderr only when it is a terminal; stdout carries nothing but the JSON
    # lines (tqdm.write clears the bar on stderr and writes the line unchanged to stdout).
    bar = tqdm(args.paths, desc="predict", unit="input", file=sys.stderr, disable=not sys.stderr.isatty(),
               dynamic_ncols=True)
    status = 0
    for raw in bar:
        path = Path(raw)
        bar.set_postfix_str(path.name, refresh=True)
        t, c = time.perf_counter(), time.process_time()
        try:
            image = read_image(path)
        except (ValueError, RuntimeError) as exc:
            _emit({"input": raw, "error": str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)})
            status = 1
            continue
        image = _as_int16(image)
        findings = predictor.predict_image(image)
        seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - c
        if args.masks:
            write_mask(image, findings, Path(args.masks) / f"{mask_name(path)}_mask.nii.gz")
        _emit({"input": raw, "findings": [f.to_json() for f in findings], "seconds": round(seconds, 2),
               "cpu_seconds": round(cpu_seconds, 2)})
    bar.close()
    return status


def _as_int16(image):
    """A wider integer image (GDCM gives 32-bit after rescaling DICOM to HU) as int16, values
    clamped to its range: half the memory, and the resampling works in int16 anyway."""
    import SimpleITK as sitk

    if image.GetPixelID() not in (sitk.sitkInt32, sitk.sitkUInt32, sitk.sitkInt64, sitk.sitkUInt64, sitk.sitkUInt16):
        return image
    return sitk.Cast(sitk.Clamp(image, sitk.sitkInt32 if image.GetPixelID() != sitk.sitkInt64 else sitk.sitkInt64,
                                -32768, 32767), sitk.sitkInt16)


def _emit(obj: dict) -> None:
    """One JSON object on its own line on stdout, flushed (the ``predict --json`` contract)."""
    from tqdm import tqdm

    tqdm.write(json.dumps(obj), file=sys.stdout)
    sys.stdout.flush()
