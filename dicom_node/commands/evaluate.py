"""``dicom-node evaluate``: validate Res-MTNet weights on the held-out series.

Writes ``OUT/evaluation.json`` (LUNA16 FROC/CPM on whole-scan validation, malignancy accuracy
and AUC by the median rule and by is_malignant, Dice, diameter error, the trivial baselines,
the operating point at 1 false positive per scan, the LIDC-IDRI-0001 end-to-end check) and
``OUT/froc.png``. ``--write-threshold`` stores the operating point in the weights' ``.json``,
where :class:`model.inference.Predictor` reads it as its default threshold.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="validate Res-MTNet weights (LUNA16 FROC, malignancy, Dice)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="weights file (default: the shipped model/weights/resmtnet.pt)")
    p.add_argument("--out", default="runs/eval", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the nodule placement")
    p.add_argument("--max-lidc-scans", type=int, default=16, help="whole scans built on LIDC-IDRI-0001 (rest: phantoms)")
    p.add_argument("--write-threshold", action="store_true",
                   help="store the operating point (1 FP/scan on the real-lung validation scans) beside the weights")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from model import evaluate as E
    from model.inference import DEFAULT_WEIGHTS, Predictor

    torch.set_num_threads(args.threads)
    weights = Path(args.weights) if args.weights else DEFAULT_WEIGHTS
    try:
        predictor = Predictor(weights)
    except FileNotFoundError as exc:
        print(f"dicom-node evaluate: {exc}", file=sys.stderr)
        return 2
    try:
        result = E.evaluate(predictor, seed=args.seed, max_lidc=args.max_lidc_scans, progress=sys.stderr.isatty())
    except FileNotFoundError as exc:
        print(f"dicom-node evaluate: shared data missing: {exc}", file=sys.stderr)
        return 2
    op = result["detection"]["operating_threshold_1fp"]
    predictor.threshold = op
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        result["lidc_idri_0001_end_to_end"] = E.lidc_end_to_end(predictor, figure_path=out / "lidc0001_findings.png")
    except (FileNotFoundError, ValueError) as exc:
        result["lidc_idri_0001_end_to_end"] = {"skipped": str(exc)}
    E.plot_froc(result, out / "froc.png")
    curves = result.pop("_curves")
    result["weights"] = str(weights)
    (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "froc_curves.json").write_text(json.dumps(curves) + "\n")
    if args.write_threshold:
        meta_path = weights.with_suffix(".json")
        meta = json.loads(meta_path.read_text())
        meta["threshold"] = op
        where = "LIDC-IDRI-0001-based (real lung)" if result["detection"]["operating_point_scans"] == "lidc_background" else "all"
        meta["threshold_source"] = (f"dicom-node evaluate (seed {args.seed}): lowest score with <= 1 FP/scan on the {where} "
                                    "whole-scan validation scans")
        meta["validation"] = {k: result[k] for k in ("detection", "malignancy", "segmentation", "diameter")}
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("detection", "malignancy", "segmentation", "diameter", "lidc_idri_0001_end_to_end")}))
    return 0
