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


def test_evaluation_and_inference_code_import_no_training_code_even_inside_functions():
    import ast

    root = Path(__file__).resolve().parents[2] / "model"
    offenders = []
    for name in ("inference.py", "evaluate.py", "field_eval.py", "texture_eval.py", "onnx_backend.py", "checkpoint.py"):
        for node in ast.walk(ast.parse((root / name).read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{name}:{node.lineno} {m}" for m in mods if m == "model.train"]
    assert not offenders, offenders
