"""``dicom-node train``: train Res-MTNet on the LUNA16 nodule cubes (seeded, resumable).

Writes ``OUT/resmtnet.pt`` (weights only) and ``OUT/resmtnet.json`` (resolved config, git
revision, package versions), ``OUT/config.json`` at the start, ``OUT/history.jsonl`` (loss
terms per step) and ``OUT/checkpoint.pt`` for ``--resume``. After the last step the malignancy
read-out (:mod:`model.readout`) is fitted on the training cubes, and its calibrator
(:mod:`model.calibration`: temperature, Platt or isotonic, chosen by cross-validated ECE) on
the read-out's out-of-fold probabilities of those cubes; both are stored in the ``.json``.
``--fit-readout`` does only that, for existing weights.
"""
from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train Res-MTNet (CPU or GPU)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/default", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=int, default=32, help="training crop side, voxels = mm (multiple of 8)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--phantoms", type=int, default=2, help="synthetic phantoms among the backgrounds")
    p.add_argument("--no-lidc-background", action="store_true", help="do not use LIDC-IDRI-0001 as background")
    p.add_argument("--mask-blocks", type=int, default=1,
                   help="full-resolution residual blocks in the mask path (default: %(default)s; the shipped "
                        "joint stage used 0 and added one with --mask-stage)")
    p.add_argument("--mask-width", type=int, default=8, help="channels of the full-resolution mask path (default: %(default)s)")
    p.add_argument("--no-cross-task", action="store_true", help="ablation: no cross-task residual connections")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=1, help="data-sampling processes")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--limit-cubes", type=int, default=None, help="use only the first N cubes (smoke tests)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (a different --steps keeps the one-cycle shape over the new total)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N", help="stop (with a checkpoint) after N steps of this session")
    p.add_argument("--fit-readout", action="store_true",
                   help="only (re)fit the malignancy read-out of OUT/resmtnet.pt and its calibrator on the training cubes "
                        "(no training)")
    p.add_argument("--calibration-data", choices=("centred", "centred+off-centre"), default="centred+off-centre",
                   help="training nodules the calibrator is fitted on (out-of-fold read-out probabilities): the centred "
                        "cubes, or also each cut off-centre and rescaled as the field protocol does (default: %(default)s)")
    p.add_argument("--mask-stage", metavar="WEIGHTS", default=None,
                   help="second stage: train only a new mask path (--mask-blocks full-resolution residual blocks of "
                        "--mask-width channels) on top of WEIGHTS, everything else frozen; --steps, --lr, --seed apply")
    p.add_argument("--no-readout", action="store_true", help="do not fit the malignancy read-out after training")
    g = p.add_argument_group("field augmentation (issue 12; all off by default)")
    g.add_argument("--init", metavar="WEIGHTS", default=None, help="fine-tune: start from WEIGHTS (their architecture)")
    g.add_argument("--size-balance", type=float, default=0.0, metavar="A",
                   help="draw nodule cubes with weight n_band**-A over the size bands 0-6/6-10/10-20/20-30/>30 mm (1: bands equal)")
    g.add_argument("--zoom-range", default="0.85,1.15", metavar="LO,HI", help="isotropic zoom of the augmentation (default: %(default)s)")
    g.add_argument("--resolution-jitter", type=float, default=0.0, metavar="P",
                   help="probability of re-sampling a crop through a voxel size in 0.8-1.25 mm and back")
    g.add_argument("--off-centre", type=float, default=0.0, metavar="P",
                   help="probability of a cube positive whose nodule may lie anywhere up to 2 voxels inside the crop")
    p.set_defaults(func=run)


def run(args) -> int:
    from model.train import TrainConfig, train

    if args.crop % 8:
        print(f"dicom-node train: --crop must be a multiple of 8, got {args.crop}", file=sys.stderr)
        return 2
    if args.fit_readout:
        from pathlib import Path

        from model.train import fit_readout

        weights = Path(args.out) / "resmtnet.pt"
        if not weights.exists():
            print(f"dicom-node train: {weights} not found (train first)", file=sys.stderr)
            return 2
        summary = fit_readout(weights, progress=sys.stderr.isatty(), calibration_data=args.calibration_data)
        print(f"{weights.with_suffix('.json')}: read-out fitted on {summary['n']} training nodules, "
              f"cross-validated AUC {summary['cv5_by_series']['auc']}, accuracy {summary['cv5_by_series']['accuracy']}; "
              f"calibration {summary['calibration']} (cross-validated ECE {summary['calibration_cv_ece']})")
        return 0
    cfg = TrainConfig(
        out_dir=args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size, crop=args.crop, lr=args.lr,
        phantoms=args.phantoms, use_lidc_background=not args.no_lidc_background, cross_task=not args.no_cross_task,
        threads=args.threads, workers=args.workers, device=args.device, limit_cubes=args.limit_cubes,
        fit_readout=not args.no_readout, mask_blocks=args.mask_blocks, mask_width=args.mask_width,
        init=args.init, size_balance=args.size_balance, zoom_range=tuple(float(v) for v in args.zoom_range.split(",")),
        resolution_jitter=args.resolution_jitter, off_centre=args.off_centre,
    )
    if args.mask_stage:
        from model.train import train_mask_head

        print(train_mask_head(cfg, args.mask_stage, progress=sys.stderr.isatty()))
        return 0
    path = train(cfg, resume=args.resume, progress=sys.stderr.isatty(), stop_after=args.stop_after)
    print(path if path is not None else f"stopped; resume with --resume --out {args.out}")
    return 0
