"""Node health: disk, database and stage heartbeats, for ``/healthz`` and ``dicom-node status``.

``check_health(node)`` returns a JSON-ready dict: ``status`` "ok" or "error"; ``disk`` (free and
total bytes of the data directory's filesystem, against ``[node] min_free_disk_mb``);
``database`` ("ok" or "unreachable: <error class>"); ``stages``: for each stage in ``[node]
required_stages`` and each stage that has a heartbeat row, the newest heartbeat's age in
seconds (over every host), the number of processes, and "ok", "stale" (older than ``[node]
stage_stale_seconds``) or "down" (no row); ``problems``: one line per reason the status is
"error" (a low disk, an unreachable database, a required stage stale or down). Counts and
ages only, no patient data.
"""
from __future__ import annotations

import shutil
from datetime import timezone

from sqlalchemy import func, select, text

from dicom_node.node import Node
from storage.models import StageHeartbeat, utcnow


def check_health(node: Node) -> dict:
    cfg = node.settings.node
    problems: list[str] = []
    body: dict = {"status": "ok"}
    try:
        usage = shutil.disk_usage(cfg.data_dir)
        min_free = int(cfg.min_free_disk_mb * 1024 * 1024)
        low = usage.free < min_free
        body["disk"] = {"status": "low" if low else "ok", "free_bytes": usage.free, "total_bytes": usage.total,
                        "min_free_bytes": min_free}
        if low:
            problems.append(f"disk: {usage.free // 2**20} MiB free on the data directory's filesystem, "
                            f"below the {cfg.min_free_disk_mb:g} MiB watermark")
    except OSError as exc:
        body["disk"] = {"status": "error"}
        problems.append(f"disk: cannot read the data directory's free space ({exc.strerror or type(exc).__name__})")
    try:
        with node.sessions() as s:
            s.execute(text("SELECT 1"))
            beats = s.execute(select(StageHeartbeat.stage, func.max(StageHeartbeat.last_seen), func.count())
                              .group_by(StageHeartbeat.stage)).all()
        body["database"] = "ok"
    except Exception as exc:  # noqa: BLE001
        body["database"] = f"unreachable: {type(exc).__name__}"
        problems.append(f"database: unreachable ({type(exc).__name__})")
        beats = None
    if beats is not None:
        body["stages"] = _stages(node, beats, problems)
    if problems:
        body["status"] = "error"
        body["problems"] = problems
    return body


def _stages(node: Node, beats, problems: list[str]) -> dict:
    cfg = node.settings.node
    now = utcnow()
    seen = {stage: (last, n) for stage, last, n in beats}
    stages = {}
    for stage in dict.fromkeys([*cfg.required_stages, *sorted(seen)]):
        required = stage in cfg.required_stages
        if stage not in seen:
            entry = {"status": "down", "required": required}
            why = "down (no heartbeat)"
        else:
            last, n = seen[stage]
            if last.tzinfo is None:
                last = last.replace(tzinfo=timezone.utc)
            age = max(0.0, (now - last).total_seconds())
            state = "stale" if age > cfg.stage_stale_seconds else "ok"
            entry = {"status": state, "age_seconds": round(age, 1), "processes": n, "required": required}
            why = f"stale (last heartbeat {age:.0f} s ago)"
        stages[stage] = entry
        if required and entry["status"] != "ok":
            problems.append(f"stage {stage}: {why}")
    return stages
