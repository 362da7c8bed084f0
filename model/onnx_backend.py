"""ONNX Runtime execution of Res-MTNet (optional; torch is the fallback).

The ONNX graphs are not shipped: they are exported from the loaded (BatchNorm-folded) torch
network, so they always match the committed weights. Two graphs (:data:`VARIANTS`), with and
without the mask head, for the refinement crops (the detection pass's whole-CT tiles run on
torch, faster there), each taking int16 HU, with dynamic batch and spatial axes (every extent
a multiple of :data:`model.network.INPUT_MULTIPLE`), opset 17, the TorchScript exporter
(deterministic for one torch version). An export is cached in
``$DICOM_NODE_CACHE`` (default ``$XDG_CACHE_HOME/dicom-node`` or ``~/.cache/dicom-node``)
as ``resmtnet-<sha256 of the weights file, 16 hex>-torch<version>-g<GRAPH_VERSION>-<variant>.onnx``; where
that folder cannot be written the export stays in memory.

:func:`open_runtime` returns None (the caller keeps torch) when onnxruntime or onnx is not
installed, when the export fails, or when the two runtimes disagree on a check input by more
than :data:`CHECK_ATOL` (logits). A passed check is remembered beside the cached graphs
(``<graph>.checked.json``: onnxruntime version, CPU, largest difference) and not repeated at the
next start on the same CPU with the same onnxruntime (it costs about 2 CPU seconds, most of them
torch's first forward); a marker that does not match, or a stricter ``CHECK_ATOL``, means the
check runs again. Importing this module imports neither.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

OPSET = 17
CHECK_ATOL = 1e-3  # largest |torch - onnxruntime| accepted on the check input (logit units)
# the graphs exported from one network: forward() keyword arguments and output names
VARIANTS = {
    "mask": ({"with_mask": True}, ("heatmap", "offset", "size", "malignancy", "mask")),
    "nomask": ({"with_mask": False}, ("heatmap", "offset", "size", "malignancy")),
}
# bumped whenever the exported graph changes for the same weights (a cached export of an older
# graph is then not reused): 2 = up-projections as transposed convolutions; 3 = int16 HU input,
# normalised in the graph
GRAPH_VERSION = 3


def cache_dir() -> Path:
    env = os.environ.get("DICOM_NODE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dicom-node"


def available() -> bool:
    """True when onnxruntime and onnx (needed by torch's exporter) are importable."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def _export_bytes(net, variant: str) -> bytes:
    import torch

    from model.transforms import normalize_hu_torch

    kwargs, names = VARIANTS[variant]

    class _Heads(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, hu):
            # the input is the HU crop itself (int16): its float32 copy lives in ONNX Runtime's
            # arena, freed after the first layer, instead of beside the crop for the whole run
            out = self.net(normalize_hu_torch(hu), **kwargs)
            return tuple(out[k] for k in names)

    x = torch.zeros(2, 1, 32, 32, 32, dtype=torch.int16)
    buf = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the extent check (a constant here)
        torch.onnx.export(_Heads(net).eval(), (x,), buf, input_names=["x"], output_names=list(names), opset_version=OPSET,
                          dynamic_axes={"x": {0: "b", 2: "d", 3: "h", 4: "w"}}, dynamo=False)
    return buf.getvalue()


def export(net, weights_path: Path, variant: str, digest: str | None = None) -> bytes | str:
    """The ONNX model of graph ``variant`` (:data:`VARIANTS`) for ``net`` (loaded from
    ``weights_path``; ``digest``: its sha256, computed when not given): a cached file's path, or
    the bytes when the cache folder is not writable."""
    import torch

    digest = digest or weights_digest(weights_path)
    name = f"resmtnet-{digest}-torch{torch.__version__.split('+')[0]}-g{GRAPH_VERSION}-{variant}.onnx"
    path = cache_dir() / name
    if path.is_file():
        return str(path)
    data = _export_bytes(net, variant)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return str(path)
    except OSError as exc:
        log.info("onnx cache %s not writable (%s); export kept in memory", path.parent, type(exc).__name__)
        return data


def weights_digest(weights_path: Path) -> str:
    """The first 16 hex digits of the weights file's sha256 (the cache key of its exports)."""
    return hashlib.sha256(Path(weights_path).read_bytes()).hexdigest()[:16]


def cpu_fingerprint() -> str:
    """The CPU model and its feature flags, hashed: ONNX Runtime picks kernels by them, so a
    check passed on one CPU says nothing of another sharing the cache folder."""
    text = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                text += "\n" + line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        text += platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _marker(graphs: list) -> Path | None:
    """Where the passed check of these cached graphs is remembered; None for in-memory graphs."""
    if not all(isinstance(g, str) for g in graphs):
        return None
    return Path(graphs[0]).with_suffix(".checked.json")


def _checked_before(marker: Path | None, ort_version: str) -> bool:
    if marker is None or not marker.is_file():
        return False
    try:
        m = json.loads(marker.read_text())
        return (m.get("onnxruntime") == ort_version and m.get("cpu") == cpu_fingerprint()
                and float(m.get("max_error", float("inf"))) <= CHECK_ATOL)
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def _remember_check(marker: Path | None, ort_version: str, err: float) -> None:
    if marker is None:
        return
    try:
        tmp = marker.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"onnxruntime": ort_version, "cpu": cpu_fingerprint(), "max_error": err,
                                   "atol": CHECK_ATOL}))
        os.replace(tmp, marker)
    except OSError as exc:
        log.info("onnx check marker %s not writable (%s)", marker, type(exc).__name__)


_ARENA_REGISTERED = False


def _shared_arena(ort) -> None:
    """Register (once per process) the ONNX Runtime environment's CPU arena allocator that
    sessions with ``session.use_env_allocators`` share."""
    global _ARENA_REGISTERED
    if _ARENA_REGISTERED:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg({}))  # ONNX Runtime's defaults
    _ARENA_REGISTERED = True


class OnnxNet:
    """``net(hu, variant)``: ``ResMTNet.forward`` of :func:`model.transforms.normalize_hu` of an
    int16 HU array (B, 1, *S), graph ``variant`` (a key of :data:`VARIANTS`) -> dict of float32
    numpy arrays (same keys and shapes as the torch network's outputs)."""

    def __init__(self, sessions: dict[str, object]):
        self.sessions = sessions

    def __call__(self, x: np.ndarray, variant: str) -> dict[str, np.ndarray]:
        sess = self.sessions[variant]
        outs = sess.run(None, {"x": np.ascontiguousarray(x, np.int16)})
        return {o.name: v for o, v in zip(sess.get_outputs(), outs)}

    @property
    def threads(self) -> int:
        return int(self.sessions["mask"].get_session_options().intra_op_num_threads)


def open_runtime(net, weights_path: Path, threads: int) -> OnnxNet | None:
    """ONNX Runtime sessions for ``net`` with ``threads`` intra-op threads, checked against
    torch; None when unavailable or not matching (the reason is logged)."""
    if not available():
        log.info("onnxruntime or onnx not installed: torch runtime")
        return None
    import onnxruntime as ort
    import torch

    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # no busy-waiting between operators: on a host shared with other work (or other
        # workers) spinning threads burn the cores the others need
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # one memory arena for both graphs (and every Predictor of the process) instead of one
        # per session (LIDC-IDRI-0001, when the detection tiles still ran on ONNX Runtime: peak
        # RSS 1226 -> 1157 MB)
        _shared_arena(ort)
        so.add_session_config_entry("session.use_env_allocators", "1")
        digest = weights_digest(weights_path)
        graphs = {v: export(net, weights_path, v, digest) for v in VARIANTS}
        sessions = {m: ort.InferenceSession(g, so, providers=["CPUExecutionProvider"]) for m, g in graphs.items()}
    except Exception as exc:  # noqa: BLE001 - any exporter/runtime failure means: keep torch
        log.warning("onnx runtime unavailable (%s: %s): torch runtime", type(exc).__name__, str(exc)[:200])
        return None
    onnx_net = OnnxNet(sessions)
    marker = _marker(list(graphs.values()))
    if _checked_before(marker, ort.__version__):
        return onnx_net
    # the check: a fixed pseudo-random input, both graphs, every output
    from model.transforms import normalize_hu

    x = np.random.default_rng(0).integers(-1100, 700, (2, 1, 40, 32, 48)).astype(np.int16)
    worst = 0.0
    with torch.inference_mode():
        for v, (kwargs, _) in VARIANTS.items():
            ref = {k: t.numpy() for k, t in net(torch.from_numpy(normalize_hu(x)), **kwargs).items()}
            got = onnx_net(x, v)
            if set(ref) != set(got):
                log.warning("onnx outputs %s differ from torch's %s: torch runtime", sorted(got), sorted(ref))
                return None
            err = max(float(np.abs(ref[k] - got[k]).max()) for k in ref)
            if not err <= CHECK_ATOL:
                log.warning("onnx runtime differs from torch by %.2g (> %.0e): torch runtime", err, CHECK_ATOL)
                return None
            worst = max(worst, err)
    _remember_check(marker, ort.__version__, worst)
    return onnx_net
