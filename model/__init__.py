"""Res-MTNet: nodule detection, segmentation and malignancy (a leaf package: no DICOM networking,
no database). Importing ``model`` does not import torch; ``model.inference`` does.
"""
from pathlib import Path

from model.finding import Finding

#: The weights shipped with the package, loaded by ``Predictor(weights=None)``.
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "resmtnet.pt"

__all__ = ["DEFAULT_WEIGHTS", "Finding"]
