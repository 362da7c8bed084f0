"""The result type of the model: one detected nodule.

Imports numpy only, so that DICOM-side code (results, storage, web) can use it without torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Finding:
    """One nodule found in a volume.

    Coordinates:
      * ``center_mm``: (x, y, z) in DICOM patient coordinates (LPS), millimetres.
      * ``center_voxel``: (z, y, x) continuous voxel index into the input array (Z, Y, X).
      * ``mask``: bool array (d, h, w) covering the nodule, whose voxel [0, 0, 0] is the input
        voxel ``mask_offset`` = (z, y, x); ``None`` when no mask was produced.

    ``diameter_mm`` is the equivalent-sphere or axial long-axis diameter in mm (the model card says
    which), ``volume_mm3`` the mask volume in mm^3, ``malignancy`` the probability in [0, 1] that
    readers would rate the nodule malignant, ``score`` the detection confidence in [0, 1].
    """

    center_mm: tuple[float, float, float]
    center_voxel: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float
    malignancy: float
    score: float
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    mask_offset: tuple[int, int, int] = (0, 0, 0)

    def to_json(self) -> dict:
        """The JSON form used by ``dicom-node predict --json`` (DESIGN.md)."""
        return {
            "center_mm": [round(float(c), 2) for c in self.center_mm],
            "diameter_mm": round(float(self.diameter_mm), 2),
            "volume_mm3": round(float(self.volume_mm3), 1),
            "malignancy": round(float(self.malignancy), 4),
            "score": round(float(self.score), 4),
        }
