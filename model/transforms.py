"""CT preprocessing and augmentation.

Spatial augmentation (rotation, scale, flips, elastic deformation) is one resampling of the
source through a known map, so image, mask and nodule centres stay aligned: the crop is sampled
as ``src = A @ (out - c_out) + c_src + u(out)`` where ``A`` (3x3) combines rotation, isotropic
zoom and flips and ``u`` is a smooth displacement field (elastic); centres are mapped back with
``A^-1`` and diameters divided by the zoom. Intensity augmentation (HU window jitter, Gaussian
noise, Gaussian blur) uses MONAI transforms on the normalised image.

All arrays are (Z, Y, X) on the 1 mm grid; centres are continuous (z, y, x) voxel indices.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

HU_MIN, HU_MAX = -1000.0, 600.0


def normalize_hu(hu: np.ndarray) -> np.ndarray:
    """HU -> network input: clip to [-1000, 600] and map to about [-1.2, 1.5] (float32)."""
    return ((np.clip(hu.astype(np.float32), HU_MIN, HU_MAX) + 300.0) / 600.0).astype(np.float32)


def normalize_hu_torch(hu):
    """:func:`normalize_hu` of a torch tensor (any dtype), the same float32 operations in the
    same order (the ONNX graphs take HU and normalise inside, :mod:`model.onnx_backend`)."""
    import torch

    return (torch.clamp(hu.to(torch.float32), HU_MIN, HU_MAX) + 300.0) / 600.0


def rotation_matrix(az: float, tilt_y: float, tilt_x: float) -> np.ndarray:
    """Rotation (3x3, acting on (z, y, x)) by ``az`` about z then small tilts about y and x (rad)."""
    c, s = np.cos(az), np.sin(az)
    rz = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    c, s = np.cos(tilt_y), np.sin(tilt_y)
    ry = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    c, s = np.cos(tilt_x), np.sin(tilt_x)
    rx = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class SpatialParams:
    """One draw of spatial augmentation. ``matrix`` maps output offsets to source offsets."""

    matrix: np.ndarray
    zoom: float
    elastic: np.ndarray | None  # (3, S, S, S) displacement in source voxels, or None

    @classmethod
    def identity(cls) -> "SpatialParams":
        return cls(np.eye(3), 1.0, None)


def draw_spatial(rng: np.random.Generator, size: int, strength: float = 1.0,
                 zoom_range: tuple[float, float] = (0.85, 1.15)) -> SpatialParams:
    """Random rotation (any angle about z, up to 15 degrees tilt), zoom in ``zoom_range``
    (log-uniform; default [0.85, 1.15]),
    independent flips of each axis, and with probability 0.3 an elastic field
    (Gaussian-smoothed noise, sigma 6 voxels, up to ~1.5 voxels displacement)."""
    rot = rotation_matrix(rng.uniform(-np.pi, np.pi) * strength, *(rng.uniform(-0.26, 0.26, 2) * strength))
    zoom = float(np.exp(rng.uniform(np.log(zoom_range[0]), np.log(zoom_range[1])) * strength))
    flips = np.diag(np.where(rng.random(3) < 0.5, -1.0, 1.0))
    matrix = rot @ flips / zoom
    elastic = None
    if rng.random() < 0.3 * strength:
        small = rng.normal(size=(3, size // 4 + 1, size // 4 + 1, size // 4 + 1)).astype(np.float32)
        field = np.stack([ndi.zoom(ndi.gaussian_filter(c, 1.5), 4, order=1)[:size, :size, :size] for c in small])
        field *= 1.5 / max(1e-6, float(np.abs(field).max()))
        elastic = field
    return SpatialParams(matrix, zoom, elastic)


def sample_crop(
    volume: np.ndarray,
    mask: np.ndarray | None,
    c_src: np.ndarray,
    size: int,
    params: SpatialParams,
    cval: float = -1000.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sample a (size, size, size) crop centred on source point ``c_src`` through ``params``.

    Returns (image float32 HU, mask bool or None). Outside the source: ``cval`` (image), 0 (mask).
    """
    c_out = (size - 1) / 2.0
    g = np.indices((size,) * 3, dtype=np.float32).reshape(3, -1) - c_out
    src = (params.matrix @ g) + np.asarray(c_src, np.float32)[:, None]
    if params.elastic is not None:
        src = src + params.elastic.reshape(3, -1)
    coords = src.reshape((3,) + (size,) * 3)
    img = ndi.map_coordinates(volume.astype(np.float32, copy=False), coords, order=1, mode="constant", cval=cval)
    msk = None
    if mask is not None:
        msk = ndi.map_coordinates(mask.astype(np.float32), coords, order=1, mode="constant", cval=0.0) >= 0.5
    return img.astype(np.float32), msk


def map_point(p_src: np.ndarray, c_src: np.ndarray, size: int, params: SpatialParams) -> np.ndarray:
    """Where a source point lands in the crop (continuous (z, y, x)); ignores the elastic field
    except for its value at the crop centre (the field is smooth and at most ~1.5 voxels)."""
    c_out = (size - 1) / 2.0
    d = np.asarray(p_src, float) - np.asarray(c_src, float)
    if params.elastic is not None:
        mid = size // 2
        d = d - params.elastic[:, mid, mid, mid]
    return np.linalg.solve(params.matrix, d) + c_out


class IntensityAugment:
    """HU window jitter (shift +-0.07, scale 0.9-1.1 of the normalised image, i.e. about
    +-40 HU and +-10 % contrast), Gaussian noise (p 0.3, std up to 0.04 ~ 25 HU) and Gaussian
    blur (p 0.2, sigma 0.4-1.0 voxel): MONAI array transforms, seeded."""

    def __init__(self, seed: int = 0):
        from monai.transforms import RandGaussianNoise, RandGaussianSmooth, RandScaleIntensityFixedMean, RandShiftIntensity

        self.ops = [
            RandShiftIntensity(offsets=0.07, prob=0.8),
            RandScaleIntensityFixedMean(factors=0.1, prob=0.8),
            RandGaussianNoise(prob=0.3, mean=0.0, std=0.04),
            RandGaussianSmooth(sigma_x=(0.4, 1.0), sigma_y=(0.4, 1.0), sigma_z=(0.4, 1.0), prob=0.2),
        ]
        for i, op in enumerate(self.ops):
            op.set_random_state(seed + i)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (1, D, H, W) normalised image -> same shape, float32."""
        for op in self.ops:
            x = op(x)
        return np.asarray(x, np.float32)
