"""CPU threads for inference: how many cores this process may use, and applying a setting.

``available_cpus()`` is the smaller of the CPU affinity mask (``os.sched_getaffinity``: the
cores the scheduler will run this process on, e.g. under ``taskset`` or a container's cpuset)
and the cgroup CPU quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``,
rounded up: a container limited to 1.5 CPUs gets 2 threads). ``os.cpu_count()`` counts the
host's cores and over-subscribes a container, so it is used only where neither is readable.

A setting is ``"auto"`` (or ``None``/``0``: all of :func:`available_cpus`) or a positive
number. When several inference workers share a host, give each ``1`` (``[model] threads = 1``,
``dicom-node predict --threads 1``): one thread per process avoids the spinning and cache
contention of several OpenMP pools on the same cores, and the processes run side by side.
Importing this module does not import torch.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by this process's cgroup quota (may be fractional), or None if unlimited
    or unreadable."""
    v2 = root / "cpu.max"
    try:
        quota, period = v2.read_text().split()[:2]
        if quota != "max" and float(period) > 0:
            return float(quota) / float(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = float((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = float((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """Cores this process may run on: min(affinity mask, ceil(cgroup quota)), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota(root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return max(1, n)


def resolve_threads(setting: int | str | None) -> int:
    """The thread count for ``setting``: ``"auto"``, ``None`` or ``0`` -> :func:`available_cpus`;
    a positive integer (or its string) -> itself. Anything else raises ValueError."""
    if setting is None or (isinstance(setting, str) and setting.strip().lower() == "auto"):
        return available_cpus()
    if isinstance(setting, bool):
        raise ValueError(f"threads must be 'auto' or a positive integer, got {setting!r}")
    try:
        n = int(str(setting).strip())
    except ValueError:
        raise ValueError(f"threads must be 'auto' or a positive integer, got {setting!r}") from None
    if n < 0:
        raise ValueError(f"threads must be 'auto' or a positive integer, got {setting!r}")
    return available_cpus() if n == 0 else n


def apply_torch_threads(n: int) -> None:
    """torch intra-op threads = ``n`` (process-wide); inter-op threads 1 where still settable
    (torch allows that only before its first parallel work)."""
    import torch

    torch.set_num_threads(int(n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
