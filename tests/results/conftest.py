"""Fixtures for the result-object tests: strict pydicom, synthetic and real series, findings."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config as pydicom_config

from dicom_node.volume import Volume, load_series
from model.finding import Finding

from .synthetic_ct import SeriesSpec, write_series

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
LIDC_SERIES = DATA / "lidc-idri" / "LIDC-IDRI-0001"
LIDC_NODULE_MM = (56.2, 86.2, -115.9)


@pytest.fixture(autouse=True)
def _strict(strict_pydicom):
    """Every test here runs pydicom in strict mode (``tests/conftest.py: strict_pydicom``)."""
    yield


def sphere_finding(
    volume: Volume, center_mm, radius_mm: float, malignancy: float, *, with_mask: bool = True
) -> Finding:
    """A finding whose mask is the voxelised ball of ``radius_mm`` around ``center_mm`` (LPS)."""
    center = volume.lps_to_voxel(center_mm)
    radii = [int(np.ceil(radius_mm / s)) for s in volume.spacing]
    zz, yy, xx = np.mgrid[tuple(slice(-r, r + 1) for r in radii)]
    base = np.round(center).astype(int)
    frac = center - base
    sz, sy, sx = volume.spacing
    mask = ((zz - frac[0]) * sz) ** 2 + ((yy - frac[1]) * sy) ** 2 + (
        (xx - frac[2]) * sx
    ) ** 2 <= radius_mm**2
    offset = tuple(int(b - r) for b, r in zip(base, radii))
    return Finding(
        center_mm=tuple(float(v) for v in center_mm),
        center_voxel=tuple(float(v) for v in center),
        diameter_mm=2 * radius_mm,
        volume_mm3=float(mask.sum() * sz * sy * sx),
        malignancy=malignancy,
        score=0.9,
        mask=mask if with_mask else None,
        mask_offset=offset,
    )


@pytest.fixture(scope="session")
def synthetic_volume(tmp_path_factory) -> Volume:
    """A 24-slice axial series, 40x36 pixels, 0.8 x 0.7 x 2.0 mm, with two soft-tissue balls."""
    directory = tmp_path_factory.mktemp("synthetic-series")
    spec = SeriesSpec(
        n_slices=24,
        rows=40,
        columns=36,
        origin=(-12.0, -16.0, -30.0),
        seed=3,
        sphere_center=(0.0, 0.0, -10.0),
        sphere_radius=5.0,
    )
    return load_series(write_series(directory, spec))


@pytest.fixture(scope="session")
def lidc_volume() -> Volume:
    if not LIDC_SERIES.is_dir():
        pytest.skip(f"LIDC-IDRI-0001 series absent: expected it in {LIDC_SERIES}")
    old = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.WARN  # real-world headers
    try:
        return load_series(sorted(LIDC_SERIES.glob("*.dcm")))
    finally:
        pydicom_config.settings.reading_validation_mode = old


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's messages for ``path`` (it writes them on stderr); skips when not installed."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def errors(messages: list[str]) -> list[str]:
    return [line for line in messages if line.startswith("Error")]


def save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path
