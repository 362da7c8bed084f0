"""dicom-node: a DICOM node that finds lung nodules and returns TID 1500 SR and SEG.

Research use only; not a medical device.
"""
__version__ = "0.1.0"
