"""The optimised inference path (issue 12): same findings as the reference path on a synthetic
phantom, batched flips equal to sequential ones, ONNX Runtime checked against torch with torch
as the fallback, and the thread setting (cores from affinity and cgroup quota) applied.
Speed itself is measured by benchmarks/bench_predict.py, never asserted here."""
from __future__ import annotations

import json

import numpy as np
import pytest

from model import threads as T


# ----------------------------------------------------------------------------- threads
def _affinity():
    import os

    return len(os.sched_getaffinity(0))


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "max 100000\n"}, None),  # unlimited: the affinity mask
    ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU -> 1 thread
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs -> 2 threads (rounded up)
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1 unlimited
    ({}, None),  # no cgroup files
])
def test_available_cpus_follows_affinity_and_cgroup_quota(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    want = _affinity() if expected is None else min(expected, _affinity())
    assert T.available_cpus(tmp_path) == want


def test_resolve_threads():
    auto = T.available_cpus()
    assert T.resolve_threads("auto") == auto and T.resolve_threads(None) == auto and T.resolve_threads(0) == auto
    assert T.resolve_threads(1) == 1 and T.resolve_threads("3") == 3
    for bad in ("two", -1, True, "1.5"):
        with pytest.raises(ValueError, match="threads"):
            T.resolve_threads(bad)


def test_model_config_threads_knob():
    from pydantic import ValidationError

    from dicom_node.config import ModelSection

    assert ModelSection().threads == "auto" and ModelSection().runtime == "auto"
    assert ModelSection(threads=1).threads == 1 and ModelSection(threads="2").threads == 2
    for bad in (0, "many"):
        with pytest.raises(ValidationError):
            ModelSection(threads=bad)
    with pytest.raises(ValidationError):
        ModelSection(runtime="tensorrt")


def test_predictor_applies_the_thread_setting(predictor):
    import torch

    from model.inference import Predictor

    try:
        one = Predictor(threads=1)
        assert one.threads == 1 and torch.get_num_threads() == 1
        if one.onnx is not None:
            assert one.onnx.threads == 1
        auto = Predictor(threads="auto")
        assert auto.threads == T.available_cpus() and torch.get_num_threads() == auto.threads
        with pytest.raises(ValueError, match="threads"):
            Predictor(threads="lots")
    finally:
        torch.set_num_threads(2)  # the model tests' setting (conftest)


# ----------------------------------------------------------------------------- same findings
@pytest.fixture(scope="module")
def phantom():
    from model.phantom import make_phantom

    return make_phantom(shape=(96, 160, 200), seed=3, n_nodules=4, kinds=("solid", "part-solid", "spiculated"),
                        diameter_range=(6.0, 16.0))


def _match(ref, new, tol_mm=1.0, tol_p=0.02):
    assert len(new) == len(ref), ([f.to_json() for f in ref], [f.to_json() for f in new])
    for r in ref:
        n = min(new, key=lambda f: np.linalg.norm(np.subtract(f.center_mm, r.center_mm)))
        assert np.linalg.norm(np.subtract(n.center_mm, r.center_mm)) <= tol_mm
        assert abs(n.score - r.score) <= tol_p and abs(n.malignancy - r.malignancy) <= tol_p
        assert abs(n.diameter_mm - r.diameter_mm) <= tol_mm
        assert abs(n.volume_mm3 - r.volume_mm3) <= 0.05 * r.volume_mm3 + 5


def test_optimised_path_gives_the_reference_findings_on_a_phantom(predictor, phantom):
    """Batched flips, the skip far below the threshold, ONNX Runtime (when installed) and the
    bfloat16 detection pass (on a CPU with native bfloat16) change no finding: within 1 mm and
    0.02 of score and malignancy, at the default threshold, a low one and a high one (where
    candidates of this small phantom fall far enough below it to be skipped)."""
    from model.inference import Predictor

    import torch

    ref = Predictor(optimise=False, threads=2)
    fast = Predictor(threads=2)
    assert fast.optimise and not ref.optimise and ref.runtime == "torch" and not ref.detect_bf16
    default = ref.threshold
    for thr in (default, 0.15, 0.45):
        ref.threshold = fast.threshold = thr
        want = ref(phantom.hu, (1.0, 1.0, 1.0), origin=(-150.0, -120.0, -300.0))
        got = fast(phantom.hu, (1.0, 1.0, 1.0), origin=(-150.0, -120.0, -300.0))
        if thr <= default:
            assert want, "the phantom's nodules should give findings"
        _match(want, got)
        c = fast.last_counts  # (the bfloat16 detection pass may add or drop a candidate near 0.2)
        assert c["skipped"] + c["flip_averaged"] >= c["candidates"] > 0
        if thr == 0.45:
            assert c["skipped"] > 0  # the skip is exercised (candidates far below the threshold)
    torch.set_num_threads(2)


def test_batched_flips_equal_sequential_flips(predictor, phantom):
    from model.inference import Predictor

    p = Predictor(runtime="torch", threads=2)
    nod = phantom.nodules[0]
    start = np.round(nod.center).astype(int) - 24
    crop = np.ascontiguousarray(phantom.hu[start[0]:start[0] + 48, start[1]:start[1] + 48, start[2]:start[2] + 48])
    import torch

    with torch.inference_mode():
        seq = p._flip_average(crop, p._run(crop, True))
        bat = p._flip_batch(crop)
    assert set(seq) == set(bat)
    for k in seq:
        np.testing.assert_allclose(bat[k].numpy(), seq[k].numpy(), atol=2e-4, err_msg=k)


def test_skip_margin_covers_the_flip_averaging_shift(predictor, phantom):
    """The skip is safe only if flip averaging moves no candidate's score by as much as the
    margin: measured on every candidate of the phantom (all flip-averaged)."""
    from model.inference import Predictor

    p = Predictor(threads=2)
    p.skip_margin, p.threshold, p.record_scores = None, 0.0, []
    p(phantom.hu, (1.0, 1.0, 1.0))
    assert len(p.record_scores) >= 5
    shift = max(m - u for u, m in p.record_scores)
    assert shift < Predictor.skip_margin


# ----------------------------------------------------------------------------- ONNX Runtime
def test_onnx_runtime_is_checked_and_torch_is_the_fallback(predictor, monkeypatch, tmp_path):
    from model import onnx_backend
    from model.inference import Predictor

    if not onnx_backend.available():
        pytest.skip("onnxruntime/onnx not installed: torch is used (the fallback itself)")
    monkeypatch.setenv("DICOM_NODE_CACHE", str(tmp_path / "cache"))
    p = Predictor(runtime="onnx", threads=2)
    assert p.runtime == "onnx"
    cache = tmp_path / "cache"
    assert len(list(cache.glob("resmtnet-*-torch*-*.onnx"))) == len(onnx_backend.VARIANTS) == 2
    assert sorted(x.name for x in cache.iterdir()) == sorted(
        [x.name for x in cache.glob("*.onnx")] + [x.name for x in cache.glob("*.checked.json")])
    # the passed check is remembered: the next start on this CPU does not run torch for it
    (marker,) = cache.glob("*.checked.json")
    assert json.loads(marker.read_text())["max_error"] <= onnx_backend.CHECK_ATOL
    calls = []
    monkeypatch.setattr(p.net, "forward", lambda *a, **k: calls.append(1))
    assert onnx_backend.open_runtime(p.net, p.weights_path, 2) is not None and calls == []
    monkeypatch.undo()
    monkeypatch.setenv("DICOM_NODE_CACHE", str(cache))
    # a marker from another CPU (or a corrupt one) means: check again
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "cpu": "another"}))
    assert not onnx_backend._checked_before(marker, __import__("onnxruntime").__version__)
    marker.write_text("{not json")
    assert not onnx_backend._checked_before(marker, __import__("onnxruntime").__version__)
    # the same crop through both runtimes
    import torch

    crop = np.random.default_rng(1).integers(-1000, 200, (48, 40, 56)).astype(np.int16)
    t = Predictor(runtime="torch", threads=2)
    with torch.inference_mode():
        a, b = p._run(crop, True), t._run(crop, True)
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=1e-3, err_msg=k)
    # a runtime that disagrees with torch is not used
    monkeypatch.setattr(onnx_backend, "CHECK_ATOL", -1.0)
    assert Predictor(runtime="auto", threads=2).runtime == "torch"
    with pytest.raises(RuntimeError, match="onnx"):
        Predictor(runtime="onnx", threads=2)
    torch.set_num_threads(2)


def test_onnx_cache_not_writable_keeps_the_export_in_memory(predictor, monkeypatch, tmp_path):
    from model import onnx_backend
    from model.inference import Predictor

    if not onnx_backend.available():
        pytest.skip("onnxruntime/onnx not installed")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DICOM_NODE_CACHE", str(blocker / "cache"))
    assert Predictor(runtime="onnx", threads=2).runtime == "onnx"
    import torch

    torch.set_num_threads(2)
