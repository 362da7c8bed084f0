"""Content identity of received instances: what a job's idempotency key rests on.

A job is identified by what its series contains, not by file bytes: for every instance its SOP
Instance UID and the sha256 of its pixel data *as decoded* (``pixel_digest``), plus the model
version and the routing rule that asked for it (``content_key``). The same study resent in
another transfer syntax (JPEG 2000 lossless, implicit VR, deflated, ...) decodes to the same
pixels and maps to the same key, so it creates no job and sends nothing.

Decoding happens here, in the schedule stage (the listener never decodes). Each instance's
digest is cached in ``instances.pixel_sha256`` beside the file hash it was computed from
(``pixel_of_sha256``), so an unchanged instance is decoded once.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from pydicom import dcmread

#: Attributes that give decoded pixels their meaning, hashed with them (the values survive any
#: transfer syntax): matrix, frames, samples, rescale to HU and patient geometry (LPS mm).
_GEOMETRY = ("Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "RescaleSlope", "RescaleIntercept",
             "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


def pixel_digest(path: Path) -> str:
    """sha256 of the instance's decoded pixel data (values, as int64 or float64 little endian,
    C order) and of the attributes in ``_GEOMETRY``; of those attributes alone when the instance
    has no pixel data. Raises what pydicom raises for an unreadable or undecodable file."""
    ds = dcmread(path)
    h = hashlib.sha256()
    for keyword in _GEOMETRY:
        value = ds.get(keyword)
        h.update(f"{keyword}={'' if value is None else str(value)}\n".encode())
    if "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        arr = ds.pixel_array
        canon = arr.astype("<f8" if arr.dtype.kind == "f" else "<i8", copy=False)
        h.update(f"shape={arr.shape}\n".encode())
        h.update(np.ascontiguousarray(canon).tobytes())
    else:
        h.update(b"no pixel data\n")
    return h.hexdigest()


def content_key(model_version: str, rule: str, instances: list[tuple[str, str]]) -> str:
    """The idempotency key of a job: sha256 over the model version, the rule name and the sorted
    (SOP Instance UID, decoded-pixel sha256) pairs of the series."""
    h = hashlib.sha256(f"content-v1\n{model_version}\nrule={rule}".encode())
    for uid, digest in sorted(instances):
        h.update(f"\n{uid}:{digest}".encode())
    return h.hexdigest()
