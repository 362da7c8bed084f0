"""``dicom-node evaluate``: validate Res-MTNet weights on the held-out series.

``--protocol field`` (the default, :mod:`model.field_eval`): off-centre, rescaled validation
cubes through the whole predictor (sensitivity by size band, false findings per cube, Dice),
malignancy beside the diameter-only baseline with a paired bootstrap CI, calibration (ECE,
reliability diagram, suspicion bands ``--bands``), sub-solid cubes, LIDC-IDRI-0001 resampled to
1.0/1.25/2.5/5 mm; writes ``OUT/field-evaluation.json``, ``OUT/field-rows.json``,
``OUT/reliability.png``, ``OUT/size-bands.png`` and prints a summary with each issue-12 target
met or missed. ``--quick``: 12 cubes, 2.5 mm only.

``--protocol centred`` (the earlier protocol) writes ``OUT/evaluation.json`` (LUNA16 FROC/CPM on whole-scan validation, malignancy accuracy
and AUC by the median rule and by is_malignant, Dice, diameter error, the trivial baselines,
the operating point at 1 false positive per scan, the LIDC-IDRI-0001 end-to-end check) and
``OUT/froc.png``, all read at the weights' threshold. ``--write-threshold`` first chooses the
operating threshold on TRAINING data only (:func:`model.evaluate.choose_threshold`: the lowest
score with <= 1 false positive per scan on whole scans built from training cubes pasted into the
training part of LIDC-IDRI-0001, z >= -180 mm), reads the validation at it and stores it, with
what it was chosen on (``threshold_source``), in the weights' ``.json``, where
:class:`model.inference.Predictor` reads it as its default threshold. The validation scans never
choose it.
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
                   help="choose the operating threshold on TRAINING scans only (lowest score with <= 1 FP/scan on training "
                        "cubes pasted into the training part of LIDC-IDRI-0001), read the validation at it and store it "
                        "beside the weights (centred protocol)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the predictor (default: %(default)s)")
    p.add_argument("--protocol", choices=("field", "centred"), default="field",
                   help="field (default): off-centre/rescaled cubes, malignancy vs diameter with bootstrap CI, calibration, "
                        "thin-slice resamples (OUT/field-evaluation.json); centred: the earlier centred-cube + whole-scan FROC protocol")
    p.add_argument("--quick", action="store_true", help="field protocol on 12 cubes, one thickness (2.5 mm), 200 bootstrap resamples")
    p.add_argument("--explain-misses", action="store_true",
                   help="field protocol: also name the stage where each missed off-centre cube's nodule is lost "
                        "(model.miss_diagnosis; OUT/field-misses.json)")
    p.add_argument("--bands", default="0.40,0.70", help="suspicion band cut-offs low/intermediate/high (default: the UI's %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from model import evaluate as E
    from model.inference import DEFAULT_WEIGHTS, Predictor

    torch.set_num_threads(args.threads)
    weights = Path(args.weights) if args.weights else DEFAULT_WEIGHTS
    try:
        predictor = Predictor(weights, threads=args.threads)
    except FileNotFoundError as exc:
        print(f"dicom-node evaluate: {exc}", file=sys.stderr)
        return 2
    if args.protocol == "field" and args.write_threshold:
        print("dicom-node evaluate: --write-threshold sets the operating point from the centred protocol's whole scans; "
              "use --protocol centred --write-threshold", file=sys.stderr)
        return 2
    if args.protocol == "field":
        return _run_field(args, predictor, weights)
    try:
        from model import data as D

        cubes = D.load_cubes()  # once: the threshold (training cubes) and the validation (validation cubes)
        chosen = None
        if args.write_threshold:
            meta = json.loads(weights.with_suffix(".json").read_text())
            cfg = meta.get("config", {})
            chosen = E.choose_threshold(predictor, cubes, seed=args.seed, max_lidc=args.max_lidc_scans,
                                        train_seed=int(cfg.get("seed", 0)), train_phantoms=int(cfg.get("phantoms", 2)),
                                        progress=sys.stderr.isatty())
            predictor.threshold = chosen["threshold"]
        result = E.evaluate(predictor, seed=args.seed, cubes=cubes, max_lidc=args.max_lidc_scans, progress=sys.stderr.isatty())
    except FileNotFoundError as exc:
        print(f"dicom-node evaluate: shared data missing: {exc}", file=sys.stderr)
        return 2
    if chosen is not None:
        result["threshold_choice"] = chosen
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
    if chosen is not None:
        meta_path = weights.with_suffix(".json")
        meta = json.loads(meta_path.read_text())
        meta["threshold"] = chosen["threshold"]
        meta["note"] = ("threshold is set by `dicom-node evaluate --protocol centred --write-threshold` on training scans "
                        "(training cubes only; see threshold_source)")
        meta["threshold_source"] = {"command": "dicom-node evaluate --protocol centred --write-threshold",
                                    **{k: v for k, v in chosen.items() if k != "froc"}}
        meta["validation"] = {k: result[k] for k in ("detection", "malignancy", "segmentation", "diameter")}
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("threshold_choice", "detection", "malignancy", "segmentation", "diameter",
                                             "lidc_idri_0001_end_to_end") if k in result}))
    return 0


def _run_field(args, predictor, weights: Path) -> int:
    import hashlib

    from model import data as D
    from model import field_eval as F

    bands = tuple(float(v) for v in args.bands.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        cubes = D.load_cubes()  # once: the protocol and --explain-misses use the same cubes
        res = F.evaluate_field(predictor, seed=args.seed, cubes=cubes, limit=12 if args.quick else None,
                               thicknesses=(2.5,) if args.quick else F.THICKNESSES_MM, bands=bands,
                               n_boot=200 if args.quick else 2000, progress=sys.stderr.isatty(),
                               phantoms=4 if args.quick else 12)
    except FileNotFoundError as exc:
        print(f"dicom-node evaluate: shared data missing: {exc}", file=sys.stderr)
        return 2
    rows = res.pop("_rows")
    if args.explain_misses:
        from model import miss_diagnosis as M

        _, _, val = D.split_cubes(cubes)
        val = [c for c in val if c.mask.any()][: 12 if args.quick else None]
        missed = {r["name"] for r in rows if not r["found"]}
        why = M.explain_field(predictor, [c for c in val if c.name in missed], seed=args.seed, only_missed=False)
        res["misses"] = {"by_stage": why["by_stage"], "by_band": why["by_band"]}
        (out / "field-misses.json").write_text(json.dumps(why, indent=1) + "\n")
    res["weights"] = str(weights)
    res["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    res["command"] = "dicom-node evaluate " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "dicom-node evaluate"
    res["quick"] = bool(args.quick)
    res["plots"] = F.plot_field(res, out)
    (out / "field-evaluation.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "field-rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(F.summary(res))
    return 0
