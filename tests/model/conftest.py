"""Fixtures for the model tests: the shared data (skipped with a message when absent), the
default weights (skipped when not shipped), small torch thread count."""
from __future__ import annotations

import pytest

from model import data as D


@pytest.fixture(autouse=True, scope="session")
def _threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def luna_cubes():
    if not (D.LUNA_CUBES / "labels.csv").exists():
        pytest.skip(f"LUNA16 nodule cubes not found at {D.LUNA_CUBES} (shared data absent)")
    return D.load_cubes()


@pytest.fixture(scope="session")
def lidc_dir():
    if not D.LIDC_0001.is_dir():
        pytest.skip(f"LIDC-IDRI-0001 not found at {D.LIDC_0001} (shared data absent)")
    return D.LIDC_0001


@pytest.fixture(scope="session")
def predictor():
    from model.inference import DEFAULT_WEIGHTS, Predictor

    if not DEFAULT_WEIGHTS.exists():
        pytest.skip(f"default weights not found at {DEFAULT_WEIGHTS}")
    return Predictor()
