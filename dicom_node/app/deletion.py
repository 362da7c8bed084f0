"""Deleting a whole study (retention, and what a retention pass re-checks): its rows in one
transaction that first locks the study and its series and re-checks that no work is pending,
audited as ``study.delete`` (reason, counts, bytes; no patient data). The caller commits, then
removes the returned files (``retention.remove_files``): a crash in between leaves unreferenced
files, never rows naming missing files. Contract and callers: ``dicom_node.retention``.
"""
from __future__ import annotations

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from storage import repo
from storage.models import (
    FindingRow,
    Instance,
    Job,
    JobState,
    ResultObject,
    RoutingDecision,
    Series,
    Study,
    Transfer,
    TransferState,
    utcnow,
)

ACTOR = "retention"


def protected(s: Session, study_ids: list[int] | None = None) -> dict[int, str]:
    """Study id -> why it must not be deleted (pending work), for ``study_ids`` (None: all)."""
    def only(stmt, column):
        return stmt if study_ids is None else stmt.where(column.in_(study_ids))

    why: dict[int, str] = {}
    for sid, state in s.execute(only(
            select(Series.study_id, Job.state).join(Job, Job.series_id == Series.id)
            .where(Job.state.in_([JobState.PENDING, JobState.RUNNING])), Series.study_id)):
        why.setdefault(sid, f"a job is {state.value}")
    for sid, state in s.execute(only(
            select(Series.study_id, Transfer.state).join(Job, Job.series_id == Series.id)
            .join(Transfer, Transfer.job_id == Job.id)
            .where(Transfer.state.in_([TransferState.PENDING, TransferState.SENDING])), Series.study_id)):
        why.setdefault(sid, f"a transfer is {state.value}")
    for (sid,) in s.execute(only(select(Series.study_id).where(Series.dirty.is_(True)), Series.study_id)):
        why.setdefault(sid, "a series is still receiving")
    return why


def _lock_study(s: Session, study_id: int) -> bool:
    """Take the write lock (SQLite) / the study's and its series' row locks (PostgreSQL); False if gone."""
    res = s.execute(update(Study).where(Study.id == study_id).values(updated_at=utcnow())
                    .execution_options(synchronize_session=False))
    if res.rowcount != 1:
        return False
    if s.bind.dialect.name == "postgresql":
        s.execute(select(Series.id).where(Series.study_id == study_id).with_for_update())
    return True


def delete_study(s: Session, study_id: int, reason: str, actor: str = ACTOR) -> tuple[list[str], str | None]:
    """Delete the study's rows (caller commits) if it has no pending work.

    Returns (file paths relative to data_dir to remove after the commit, None) or ([], why not).
    """
    if not _lock_study(s, study_id):
        return [], "already deleted"
    why = protected(s, [study_id]).get(study_id)
    if why:
        return [], why
    uid = s.scalar(select(Study.study_instance_uid).where(Study.id == study_id))
    series_ids = select(Series.id).where(Series.study_id == study_id).scalar_subquery()
    job_ids = select(Job.id).where(Job.series_id.in_(series_ids)).scalar_subquery()
    paths = list(s.scalars(select(Instance.path).where(Instance.series_id.in_(series_ids))))
    count, size = len(paths), int(s.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0))
                                           .where(Instance.series_id.in_(series_ids))) or 0)
    paths += list(s.scalars(select(ResultObject.path).where(ResultObject.job_id.in_(job_ids))))
    paths += _prerendered(s, job_ids)
    paths = list(dict.fromkeys(paths))  # a result is indexed as an instance too: one path, once
    s.execute(delete(Transfer).where(or_(Transfer.job_id.in_(job_ids), Transfer.series_id.in_(series_ids)))
              .execution_options(synchronize_session=False))  # results, and forwarded originals
    s.execute(delete(RoutingDecision).where(RoutingDecision.series_id.in_(series_ids))
              .execution_options(synchronize_session=False))
    s.execute(delete(FindingRow).where(or_(FindingRow.study_id == study_id, FindingRow.job_id.in_(job_ids)))
              .execution_options(synchronize_session=False))
    s.execute(delete(ResultObject).where(ResultObject.job_id.in_(job_ids)).execution_options(synchronize_session=False))
    s.execute(delete(Job).where(Job.series_id.in_(series_ids)).execution_options(synchronize_session=False))
    s.execute(delete(Instance).where(Instance.series_id.in_(series_ids)).execution_options(synchronize_session=False))
    s.execute(delete(Series).where(Series.study_id == study_id).execution_options(synchronize_session=False))
    s.execute(delete(Study).where(Study.id == study_id).execution_options(synchronize_session=False))
    repo.audit(s, actor, "study.delete", target=uid,
               detail={"reason": reason, "instances": count, "bytes": size, "files": len(paths)})
    return paths, None


def _prerendered(s: Session, job_ids) -> list[str]:
    """The key images the worker pre-rendered for the jobs' findings (``dicom_node.render``)."""
    from dicom_node import render

    out = []
    for job_id, number in s.execute(select(FindingRow.job_id, FindingRow.number).where(FindingRow.job_id.in_(job_ids))):
        for plane, window, zoom in render.PRERENDER:
            rel = render.cache_relpath(job_id, number, plane, window, zoom)
            out += [rel, render.info_relpath(rel)]
    return out
