"""Synthetic chest CT phantom with known nodules, for tests and extra training signal.

A phantom is a (Z, Y, X) int16 HU volume on a 1 mm isotropic grid (axes like a supine CT: z
cranio-caudal, y anterior-posterior, x right-left) containing:
  * a body ellipse (soft tissue +40 HU, a fat ring -100 HU) with a spine-like bone (+500 HU);
  * two lungs, ellipsoids at about -850 HU with parenchymal noise;
  * a trachea and main bronchi (air, +40 HU wall);
  * branching vessel trees from each hilum (+40 HU, radius tapering 3 mm -> 0.5 mm);
  * nodules of known centre, diameter and kind: ``solid`` (+30 HU), ``part-solid`` (ground-glass
    halo -550 HU around a solid core), ``ground-glass`` (-600 HU), ``calcified`` (+400 HU
    core), ``spiculated`` (solid with radial spicules); the ground-glass attenuation (the
    halo's, for part-solid) can be set per nodule (``PhantomNodule.ggo_hu``; ``make_phantom``
    draws it from ``ggo_hu_range`` when given);
  * scanner-like Gaussian blur (sigma 0.7 mm) and noise (sigma 15 HU).

``mask`` marks every nodule voxel (the label image: nodule ``i`` has value ``i + 1``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

KINDS = ("solid", "part-solid", "ground-glass", "calcified", "spiculated")
TRAINING_SEED_BASE = 10_000  # training backgrounds; validation's phantoms start at 90_000


def training_phantom_seeds(train_seed: int = 0, phantoms: int = 2) -> list[int]:
    """The seeds of the phantoms training pastes nodules into (``TrainConfig.seed``,
    ``.phantoms``; :func:`model.train.phantom_backgrounds`), the one place they are defined."""
    return [TRAINING_SEED_BASE + train_seed * 100 + i for i in range(phantoms)]


@dataclass
class PhantomNodule:
    """center: (z, y, x) voxel = mm; diameter: mm; kind: one of :data:`KINDS`; ggo_hu: the
    ground-glass attenuation in HU (ground-glass nodules, and a part-solid nodule's halo);
    None: -600 (ground-glass) and -550 (halo)."""

    center: tuple[float, float, float]
    diameter: float
    kind: str
    ggo_hu: float | None = None


@dataclass
class Phantom:
    hu: np.ndarray = field(repr=False)  # (Z, Y, X) int16
    lungs: np.ndarray = field(repr=False)  # bool, lung parenchyma incl. vessels
    labels: np.ndarray = field(repr=False)  # int16, nodule i -> i + 1
    nodules: list[PhantomNodule]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + ((xx - centre[2]) / radii[2]) ** 2 <= 1.0


def _tube(vol: np.ndarray, a: np.ndarray, b: np.ndarray, r0: float, r1: float, value: float, where: np.ndarray | None = None) -> None:
    """Paint a tapered tube from ``a`` (radius r0) to ``b`` (radius r1) with ``value``."""
    lo = np.maximum(np.floor(np.minimum(a, b) - max(r0, r1) - 1).astype(int), 0)
    hi = np.minimum(np.ceil(np.maximum(a, b) + max(r0, r1) + 2).astype(int), vol.shape)
    if np.any(hi <= lo):
        return
    g = np.stack(np.meshgrid(*[np.arange(l, h) for l, h in zip(lo, hi)], indexing="ij"), -1).astype(np.float32)
    ab = b - a
    t = np.clip(((g - a) @ ab) / max(float(ab @ ab), 1e-6), 0, 1)
    dist = np.linalg.norm(g - (a + t[..., None] * ab), axis=-1)
    inside = dist <= r0 + (r1 - r0) * t
    sl = tuple(slice(l, h) for l, h in zip(lo, hi))
    if where is not None:
        inside &= where[sl]
    vol[sl][inside] = value


def _vessel_tree(vol, lungs, rng, start, direction, radius, depth) -> None:
    if depth == 0 or radius < 0.5:
        return
    length = rng.uniform(12, 30) * (radius / 2 + 0.5)
    d = direction / np.linalg.norm(direction)
    end = start + d * length
    end = np.clip(end, 0, np.asarray(vol.shape) - 1)
    _tube(vol, start, end, radius, radius * 0.8, 40.0, where=lungs)
    for _ in range(2):
        nd = d + rng.normal(0, 0.6, 3)
        _vessel_tree(vol, lungs, rng, end, nd, radius * 0.7, depth - 1)


def _paint_nodule(hu, labels, label, nod: PhantomNodule, rng) -> None:
    r = nod.diameter / 2
    c = np.asarray(nod.center)
    radii = r * rng.uniform(0.85, 1.15, 3)
    radii *= r / np.cbrt(np.prod(radii))  # keep the equivalent diameter
    body = _ellipsoid(hu.shape, c, radii)
    if nod.kind == "solid":
        hu[body] = 30
    elif nod.kind == "ground-glass":
        hu[body] = np.maximum(hu[body], -600 if nod.ggo_hu is None else nod.ggo_hu)
    elif nod.kind == "part-solid":
        hu[body] = np.maximum(hu[body], -550 if nod.ggo_hu is None else nod.ggo_hu)
        hu[_ellipsoid(hu.shape, c, radii * 0.5)] = 30
    elif nod.kind == "calcified":
        hu[body] = 60
        hu[_ellipsoid(hu.shape, c, radii * 0.6)] = 400
    elif nod.kind == "spiculated":
        hu[body] = 30
        for _ in range(rng.integers(6, 12)):
            v = rng.normal(size=3)
            v /= np.linalg.norm(v)
            _tube(hu, c + v * r * 0.8, c + v * r * rng.uniform(1.4, 1.9), 0.9, 0.4, 30.0)
    else:
        raise ValueError(f"unknown nodule kind {nod.kind!r}; expected one of {KINDS}")
    labels[body] = label


def make_phantom(
    shape: tuple[int, int, int] = (160, 224, 288),
    n_nodules: int = 4,
    seed: int = 0,
    kinds: tuple[str, ...] = KINDS,
    diameter_range: tuple[float, float] = (4.0, 20.0),
    ggo_hu_range: tuple[float, float] | None = None,
) -> Phantom:
    """A random chest phantom (1 mm voxels) with ``n_nodules`` nodules inside the lungs.

    ``diameter_range``: mm; ``ggo_hu_range``: (low, high) HU from which each ground-glass and
    part-solid nodule's ground-glass attenuation is drawn (None: the fixed defaults, and the
    same random stream as before the option existed).
    """
    rng = np.random.default_rng(seed)
    Z, Y, X = shape
    hu = np.full(shape, -1000, np.int16)
    cz, cy, cx = Z / 2, Y / 2, X / 2
    body = _ellipsoid(shape, (cz, cy, cx), (Z * 2, Y * 0.46, X * 0.47))
    hu[body] = -100
    hu[_ellipsoid(shape, (cz, cy, cx), (Z * 2, Y * 0.42, X * 0.43))] = 40
    hu[_ellipsoid(shape, (cz, cy + Y * 0.3, cx), (Z * 2, Y * 0.07, X * 0.05))] = 500  # spine
    lungs = np.zeros(shape, bool)
    for side in (-1, 1):
        lc = (cz + rng.uniform(-3, 3), cy - Y * 0.02, cx + side * X * 0.2)
        lungs |= _ellipsoid(shape, lc, (Z * 0.45, Y * 0.3, X * 0.16) * rng.uniform(0.93, 1.03, 3))
    parenchyma = ndi.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), 1.5) * 60
    hu[lungs] = (-850 + parenchyma[lungs]).astype(np.int16)
    # airways: trachea down the middle, bronchi to each lung
    carina = np.array([cz + Z * 0.05, cy - Y * 0.08, cx])
    _tube(hu, np.array([0.0, carina[1], cx]), carina, 8, 7, 40.0)
    _tube(hu, np.array([0.0, carina[1], cx]), carina, 6.5, 5.5, -1000.0)
    for side in (-1, 1):
        end = carina + np.array([Z * 0.1, 0, side * X * 0.15])
        _tube(hu, carina, end, 6, 4, 40.0)
        _tube(hu, carina, end, 4.5, 2.8, -1000.0)
        hilum = carina + np.array([Z * 0.05, Y * 0.05, side * X * 0.12])
        for _ in range(8):
            _vessel_tree(hu, lungs, rng, hilum.copy(), rng.normal(0, 1, 3) + np.array([0, 0, side * 1.5]), 3.0, 6)
    labels = np.zeros(shape, np.int16)
    nodules: list[PhantomNodule] = []
    inner = ndi.binary_erosion(lungs, iterations=int(diameter_range[1] / 2) + 2)
    cand = np.flatnonzero(inner)
    tries = 0
    while len(nodules) < n_nodules and cand.size and tries < 200:
        tries += 1
        c = np.asarray(np.unravel_index(cand[rng.integers(cand.size)], shape), float)
        d = float(rng.uniform(*diameter_range))
        if any(np.linalg.norm(c - np.asarray(n.center)) < (d + n.diameter) / 2 + 10 for n in nodules):
            continue
        kind = str(kinds[len(nodules) % len(kinds)])
        ggo = float(rng.uniform(*ggo_hu_range)) if ggo_hu_range and kind in ("ground-glass", "part-solid") else None
        nod = PhantomNodule(tuple(c), d, kind, ggo)
        _paint_nodule(hu, labels, len(nodules) + 1, nod, rng)
        nodules.append(nod)
    out = ndi.gaussian_filter(hu.astype(np.float32), 0.7) + rng.normal(0, 15, shape).astype(np.float32)
    return Phantom(np.clip(out, -1024, 3071).astype(np.int16), lungs, labels, nodules)
