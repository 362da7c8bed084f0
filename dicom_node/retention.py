"""Retention: delete old studies, or the oldest while the disk is too full; never one with pending work.

Contract: a study's age is the time since its last instance arrived (the newest
``Series.last_received_at``). A pass deletes every study older than ``max_age_days`` and, while
free space on the data folder's file system is below ``min_free_disk_percent``, the oldest
studies until it is not (either rule 0: off). A study is protected, and never deleted, while
it has pending work: a job pending or running on one of its series, a transfer of its results
pending or sending, or a series still receiving (not yet evaluated by the scheduler, ``dirty``).
Nothing is deleted while ``dicom-node backup`` copies files (its marker in ``data_dir`` is
fresh).

Deleting a study (``dicom_node.app.deletion.delete_study``, the application layer) removes its index rows (study, series, instances, jobs, findings, result
objects, transfers) in one transaction that first locks the study and its series and re-checks
the protection, writes an audit event (``retention`` / ``study.delete``, with the reason, counts
and bytes; no patient data), commits, and only then removes the files: a crash in between leaves
unreferenced files, never rows that name missing files. A listener delivering into the study at
that moment waits for the lock and then fails its insert, so the instance is not acknowledged
and the sender retries it into a new study.

``storage_usage`` is the view behind ``GET /api/storage`` and the admin storage page. Sizes in
bytes (instance files as indexed; result objects are not counted), ages in days, times UTC.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

# Deleting a study (rows, lock, re-check, audit) is the application layer's; used here and re-exported.
from dicom_node.app.deletion import ACTOR, delete_study, protected  # noqa: F401
from dicom_node.backup import backup_running
from storage.models import Instance, Series, Study, utcnow

log = logging.getLogger(__name__)

#: ``shutil.disk_usage``-like: path -> an object with ``total``, ``used``, ``free`` (bytes).
DiskUsage = Callable[[Path], object]


@dataclass(frozen=True)
class Policy:
    """What retention deletes. ``max_age_days`` and ``min_free_disk_percent``: 0 means off."""

    max_age_days: float = 0.0
    min_free_disk_percent: float = 0.0
    interval_seconds: float = 3600.0

    @property
    def enabled(self) -> bool:
        return self.max_age_days > 0 or self.min_free_disk_percent > 0

    @classmethod
    def from_settings(cls, section) -> Policy:  # noqa: ANN001 - config.RetentionSection
        return cls(section.max_age_days, section.min_free_disk_percent, section.interval_seconds)


@dataclass
class StudyUsage:
    study_id: int
    study_instance_uid: str
    status: str
    instances: int
    bytes: int
    last_received_at: datetime

    def age_days(self, now: datetime) -> float:
        return (now - self.last_received_at).total_seconds() / 86400.0


@dataclass
class Candidate:
    usage: StudyUsage
    reason: str  # "age" or "disk"

    def to_json(self, now: datetime) -> dict:
        u = self.usage
        return {"study_instance_uid": u.study_instance_uid, "reason": self.reason, "instances": u.instances,
                "bytes": u.bytes, "last_received_at": u.last_received_at.isoformat(),
                "age_days": round(u.age_days(now), 3)}


@dataclass
class Report:
    deleted: list[Candidate] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (study UID, why) found protected on re-check
    paused: str | None = None
    freed_bytes: int = 0


def disk_figures(data_dir: Path, disk_usage: DiskUsage = shutil.disk_usage) -> dict:
    du = disk_usage(Path(data_dir))
    free_percent = 100.0 * du.free / du.total if du.total else 100.0
    return {"path": str(data_dir), "total_bytes": du.total, "used_bytes": du.used, "free_bytes": du.free,
            "free_percent": round(free_percent, 2)}


def study_usage(s: Session) -> list[StudyUsage]:
    """Every study with its instance count, bytes and last arrival, oldest first."""
    per_series = (select(Series.study_id.label("study_id"), func.count(Instance.id).label("n"),
                         func.coalesce(func.sum(Instance.size_bytes), 0).label("b"))
                  .select_from(Series).join(Instance, Instance.series_id == Series.id, isouter=True)
                  .group_by(Series.study_id).subquery())
    last = (select(Series.study_id.label("study_id"), func.max(Series.last_received_at).label("last"))
            .group_by(Series.study_id).subquery())
    rows = s.execute(
        select(Study.id, Study.study_instance_uid, Study.status, per_series.c.n, per_series.c.b, last.c.last,
               Study.created_at)
        .outerjoin(per_series, per_series.c.study_id == Study.id)
        .outerjoin(last, last.c.study_id == Study.id)
    ).all()
    out = []
    for sid, uid, status, n, b, last_at, created in rows:
        when = last_at or created
        if isinstance(when, str):  # an aggregate over a TypeDecorator column comes back raw on SQLite
            when = datetime.fromisoformat(when)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        out.append(StudyUsage(sid, uid, getattr(status, "value", str(status)), int(n or 0), int(b or 0), when))
    out.sort(key=lambda u: (u.last_received_at, u.study_id))
    return out


def plan(s: Session, policy: Policy, disk: dict, now: datetime | None = None) -> tuple[list[Candidate], dict[int, str]]:
    """What a pass would delete now, in order, and the studies protected by pending work.

    ``disk`` is ``disk_figures(...)``; the disk rule counts each study's indexed bytes as freed.
    """
    now = now or utcnow()
    usage = study_usage(s)
    guard = protected(s)
    chosen: list[Candidate] = []
    taken: set[int] = set()
    if policy.max_age_days > 0:
        cutoff = now - timedelta(days=policy.max_age_days)
        for u in usage:
            if u.last_received_at < cutoff and u.study_id not in guard:
                chosen.append(Candidate(u, "age"))
                taken.add(u.study_id)
    if policy.min_free_disk_percent > 0 and disk["total_bytes"]:
        need = policy.min_free_disk_percent / 100.0 * disk["total_bytes"] - disk["free_bytes"]
        need -= sum(c.usage.bytes for c in chosen)
        for u in usage:  # oldest first
            if need <= 0:
                break
            if u.study_id in taken or u.study_id in guard:
                continue
            chosen.append(Candidate(u, "disk"))
            taken.add(u.study_id)
            need -= u.bytes
    return chosen, guard


def remove_files(data_dir: Path, paths: list[str]) -> int:
    """Remove ``paths`` (relative to ``data_dir``) and the folders they leave empty; returns bytes freed."""
    root = Path(data_dir).resolve()
    freed, folders = 0, set()
    for rel in paths:
        p = Path(os.path.normpath(root / rel))
        if not str(p).startswith(str(root) + os.sep):
            log.warning("retention: refusing to remove %r outside %s", rel, root)
            continue
        try:
            freed += p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            pass
        folders.add(p.parent)
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        while folder != root and folder.parent != root:  # keep instances/ and results/ themselves
            try:
                folder.rmdir()  # only when empty (a listener may be writing a new file into it)
            except OSError:
                break
            folder = folder.parent
    return freed


def run_once(node, policy: Policy, *, apply: bool = True, disk_usage: DiskUsage = shutil.disk_usage,
             now: datetime | None = None) -> tuple[list[Candidate], Report]:
    """One pass: the plan and, with ``apply``, the deletions (one transaction per study).

    With the disk rule the free space is measured again after each round of deletions, up to
    ten rounds, so an estimate that freed too little is corrected in the same pass.
    """
    data_dir = node.settings.node.data_dir
    report = Report()
    if not policy.enabled:
        return [], report
    now = now or utcnow()
    with node.sessions() as s:
        candidates, _ = plan(s, policy, disk_figures(data_dir, disk_usage), now)
        s.rollback()
    if not apply:
        return candidates, report
    if backup_running(data_dir):
        report.paused = "a backup is running"
        log.info("retention: paused while a backup runs")
        return candidates, report
    rounds = 0
    batch = candidates
    while batch and rounds < 10:
        rounds += 1
        for c in batch:
            with node.sessions.begin() as s:
                paths, why = delete_study(s, c.usage.study_id, c.reason)
            if why:
                report.skipped.append((c.usage.study_instance_uid, why))
                continue
            freed = remove_files(data_dir, paths)
            report.freed_bytes += freed
            report.deleted.append(c)
            log.info("retention: deleted study %s (%s, last instance %.1f days ago): %d instance(s), %d bytes",
                     c.usage.study_instance_uid, c.reason, c.usage.age_days(now), c.usage.instances, freed)
        if policy.min_free_disk_percent <= 0:
            break
        done = {c.usage.study_id for c in report.deleted} | {c.usage.study_id for c in batch}
        with node.sessions() as s:
            more, _ = plan(s, Policy(0.0, policy.min_free_disk_percent), disk_figures(data_dir, disk_usage), now)
            s.rollback()
        batch = [c for c in more if c.usage.study_id not in done]
    return candidates, report


def storage_usage(node, policy: Policy, *, limit: int = 20, disk_usage: DiskUsage = shutil.disk_usage) -> dict:
    """Figures for the storage view: totals, disk, the largest studies and what retention deletes next."""
    now = utcnow()
    data_dir = node.settings.node.data_dir
    disk = disk_figures(data_dir, disk_usage)
    with node.sessions() as s:
        usage = study_usage(s)
        candidates, guard = plan(s, policy, disk, now) if policy.enabled else ([], protected(s))
        s.rollback()
    largest = sorted(usage, key=lambda u: (-u.bytes, u.study_id))[:limit]
    return {
        "studies": len(usage),
        "instances": sum(u.instances for u in usage),
        "instance_bytes": sum(u.bytes for u in usage),
        "disk": disk,
        "retention": {
            "enabled": policy.enabled, "max_age_days": policy.max_age_days,
            "min_free_disk_percent": policy.min_free_disk_percent, "interval_seconds": policy.interval_seconds,
            "paused_by_backup": backup_running(data_dir), "protected_studies": len(guard),
            "next": [c.to_json(now) for c in candidates[:limit]], "next_total": len(candidates),
            "next_bytes": sum(c.usage.bytes for c in candidates),
        },
        "largest": [{"study_instance_uid": u.study_instance_uid, "status": u.status, "instances": u.instances,
                     "bytes": u.bytes, "last_received_at": u.last_received_at.isoformat(),
                     "age_days": round(u.age_days(now), 3), "protected": guard.get(u.study_id)} for u in largest],
    }


def run_retention(node, stop: threading.Event, policy: Policy) -> None:
    """Apply ``policy`` every ``interval_seconds`` until ``stop`` is set (first pass at once)."""
    log.info("retention every %.0f s: max_age_days=%s min_free_disk_percent=%s", policy.interval_seconds,
             policy.max_age_days, policy.min_free_disk_percent)
    while not stop.is_set():
        try:
            run_once(node, policy)
        except Exception:  # noqa: BLE001 - keep the loop alive; the database may be restarting
            log.exception("retention pass failed")
        stop.wait(policy.interval_seconds)


def start_retention(node, stop: threading.Event) -> threading.Thread | None:
    """Start the retention loop in a thread of the calling stage when ``[retention]`` enables it."""
    policy = Policy.from_settings(node.settings.retention)
    if not policy.enabled:
        return None
    t = threading.Thread(target=run_retention, args=(node, stop, policy), name="retention", daemon=True)
    t.start()
    return t
