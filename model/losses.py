"""The joint loss of Res-MTNet.

``L = w_heat * L_heat + w_off * L_off + w_size * L_size + w_mal * L_mal + w_mask * L_mask``

* ``L_heat``: penalty-reduced pixel-wise focal loss on the centre heatmap (CenterNet, alpha=2,
  beta=4), normalised by the number of nodules in the batch (at least 1).
* ``L_off``, ``L_size``: L1 on the assigned cells only (offset in cells, size in log-voxels).
* ``L_mal``: binary cross-entropy (soft targets allowed) on the malignancy map cells inside
  labelled nodules, averaged over those cells.
* ``L_mask``: BCE + soft Dice on the full-resolution mask (Dice only over crops that contain a
  nodule voxel).

Fixed weights (see :data:`DEFAULT_WEIGHTS`); they were chosen so that each term is of order 1
early in training, with detection first. The model card records the values used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_WEIGHTS = {"heat": 1.0, "off": 1.0, "size": 1.0, "mal": 1.0, "mask": 1.0}


def focal_heatmap_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet focal loss. logits, target: (B, 1, *G); target 1 at centres, Gaussian around."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    neg = 1.0 - pos
    log_p = F.logsigmoid(logits)
    log_1p = F.logsigmoid(-logits)
    pos_loss = -((1 - p) ** alpha) * log_p * pos
    neg_loss = -((1 - target) ** beta) * (p**alpha) * log_1p * neg
    n = pos.sum().clamp(min=1.0)
    return (pos_loss.sum() + neg_loss.sum()) / n


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean L1 over channels at cells where ``mask`` (B, 1, *G) is 1; 0 when there are none."""
    n = mask.sum()
    if n == 0:
        return pred.sum() * 0.0
    return (torch.abs(pred - target) * mask).sum() / (n * pred.shape[1])


def malignancy_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """BCE over cells with ``weight`` 1 (B, 1, *G/2), averaged; 0 when none."""
    n = weight.sum()
    if n == 0:
        return logits.sum() * 0.0
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum() / n


def mask_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """BCE + soft Dice; logits, target (B, 1, *S), target in {0, 1}."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    has = target.flatten(1).sum(1) > 0
    if not has.any():
        return bce
    p = torch.sigmoid(logits).flatten(1)[has]
    t = target.flatten(1)[has]
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return bce + (1 - dice).mean()


def joint_loss(out: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor], weights: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """All loss terms and their weighted sum under ``"total"``.

    ``out``: network outputs (batched); ``tgt``: batched :func:`model.detector.make_targets`
    tensors plus ``"mask"`` (B, 1, *S) when ``out`` has a mask.
    """
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    terms = {
        "heat": focal_heatmap_loss(out["heatmap"], tgt["heatmap"]),
        "off": masked_l1(out["offset"], tgt["offset"], tgt["reg_mask"]),
        "size": masked_l1(out["size"], tgt["size"], tgt["reg_mask"]),
        "mal": malignancy_loss(out["malignancy"], tgt["malignancy"], tgt["mal_weight"]),
    }
    if "mask" in out:
        terms["mask"] = mask_loss(out["mask"], tgt["mask"])
    terms["total"] = sum(w[k] * v for k, v in terms.items())
    return terms
