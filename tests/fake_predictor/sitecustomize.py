"""Test-only: a stand-in for the model, for supervision tests that need an inference they control.

Put this folder first on ``PYTHONPATH`` (tests/test_supervise.py does) and every process of the
node, the spawned stages included, replaces ``dicom_node.stages.make_predictor`` with a
predictor that writes ``started-<n>`` (holding its pid) into ``$FAKE_PREDICTOR_DIR``, waits until
the file ``release`` exists there, and returns no findings. Torch is never imported.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

_DIR = os.environ.get("FAKE_PREDICTOR_DIR")


def _make_predictor(settings):  # noqa: ANN001, ARG001
    folder = Path(_DIR)

    def predict(array, spacing, origin, direction):  # noqa: ANN001, ARG001
        n = len(list(folder.glob("started-*"))) + 1
        (folder / f"started-{n}").write_text(str(os.getpid()))
        deadline = time.monotonic() + 900
        while not (folder / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return []

    return predict


if _DIR:
    import dicom_node.stages

    dicom_node.stages.make_predictor = _make_predictor
