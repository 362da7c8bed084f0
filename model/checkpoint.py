"""Weights I/O of Res-MTNet: the float16 state dict (``resmtnet.pt``) and its metadata
(``resmtnet.json``: config, provenance, threshold, malignancy read-out and its calibration).

Used by inference, the ONNX backend, evaluation and training alike; imports no training code
(``model.train`` imports this module, never the reverse).
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from model.network import ResMTNet


def provenance() -> dict:
    """Git revision and package versions, for the metadata written beside the weights."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        rev, dirty = "", False
    import monai
    import scipy
    import SimpleITK

    return {
        "git_revision": rev or "unknown",
        "git_dirty_model": dirty,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "SimpleITK": SimpleITK.Version_VersionString(),
    }


def save_weights(net: ResMTNet, path: Path, meta: dict) -> None:
    """Weights only (float16 state dict) plus ``<path>.json`` metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    torch.save(sd, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str) + "\n")


def build_network(meta_or_cfg: dict) -> ResMTNet:
    # weights written before ``mask_blocks`` existed had none
    return ResMTNet(widths=tuple(meta_or_cfg["widths"]), mask_width=meta_or_cfg["mask_width"],
                    cross_task=meta_or_cfg["cross_task"], mask_blocks=meta_or_cfg.get("mask_blocks", 0))


def load_weights(path: str | Path, device: str = "cpu") -> tuple[ResMTNet, dict]:
    """(network in eval mode, metadata) from :func:`save_weights` output."""
    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    net = build_network(meta["config"])
    sd = torch.load(path, map_location=device, weights_only=True)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return net.to(device).eval(), meta


