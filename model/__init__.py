"""Res-MTNet: nodule detection, segmentation and malignancy (a leaf package: no DICOM networking,
no database). Importing ``model`` does not import torch; ``model.inference`` does.
"""
from model.finding import Finding

__all__ = ["Finding"]
