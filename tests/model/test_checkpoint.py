"""Checkpoint I/O lives in model.checkpoint: inference does not import training code."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imported(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return set(out.stdout.split())


def test_inference_does_not_import_train():
    mods = _imported("model.inference")
    assert "model.checkpoint" in mods
    assert "model.train" not in mods


def test_onnx_backend_does_not_import_train():
    assert "model.train" not in _imported("model.onnx_backend")


def test_train_reexports_checkpoint_io():
    from model import checkpoint, train

    assert train.load_weights is checkpoint.load_weights
    assert train.save_weights is checkpoint.save_weights
