"""Studies as the worklist, the study page and the findings export show them (read only)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sqlalchemy import and_, func, literal, or_, select
from sqlalchemy.orm import Session, selectinload

from dicom_node import presentation
from dicom_node.app import studies as app_studies
from dicom_node.node import Node
from dicom_node.web import schemas
from dicom_node.web.errors import ServiceError, not_found
from dicom_node.web.views.queues import job_out, transfer_out
from storage import repo
from storage.models import (
    Destination,
    FindingReview,
    FindingRow,
    Job,
    JobState,
    ResultObject,
    ReviewDecision,
    Series,
    Study,
    StudyStatus,
    Transfer,
    utcnow,
)

MAX_PAGE_SIZE = 200


SORTS = ("suspicion", "date", "received")


STATUS_LABELS = {
    "received": "Received",
    "waiting": "Waiting",
    "processing": "Processing",
    "done": "Done",
    "not_eligible": "Not eligible",
    "not_analysed": "Not analysed",
    "failed": "Failed",
}


@dataclass
class StudyQuery:
    status: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    modality: str | None = None
    q: str | None = None
    sort: str = "suspicion"
    page: int = 1
    page_size: int = 50

    def normalised(self) -> StudyQuery:
        if self.status and self.status not in STATUS_LABELS:
            raise ServiceError(422, f"status {self.status!r} is not one of {list(STATUS_LABELS)}")
        if self.sort not in SORTS:
            raise ServiceError(422, f"sort {self.sort!r} is not one of {list(SORTS)}")
        self.page = max(1, int(self.page or 1))
        self.page_size = min(MAX_PAGE_SIZE, max(1, int(self.page_size or 50)))
        self.modality = (self.modality or "").strip().upper() or None
        self.q = (self.q or "").strip() or None
        return self


def _da(d: date) -> str:
    return d.strftime("%Y%m%d")


def list_studies(s: Session, query: StudyQuery) -> tuple[list[Study], int]:
    """One page of studies matching ``query`` and the total count.

    Default order, most suspicious first: highest malignancy, then largest diameter, then most
    findings (studies without findings after), then newest study date.
    """
    query = query.normalised()
    where = []
    if query.status:
        where.append(Study.status == StudyStatus(query.status))
    if query.date_from:
        where.append(Study.study_date >= _da(query.date_from))
    if query.date_to:
        where.append(Study.study_date <= _da(query.date_to))
    if query.modality:
        joined = literal("\\") + func.coalesce(Study.modalities, "") + literal("\\")
        where.append(joined.contains("\\" + query.modality + "\\", autoescape=True))
    if query.q:
        where.append(or_(*(col.icontains(query.q, autoescape=True) for col in (
            Study.patient_name, Study.patient_id, Study.accession_number,
            Study.study_instance_uid, Study.study_description))))
    cond = and_(*where) if where else literal(True)
    total = s.scalar(select(func.count()).select_from(Study).where(cond)) or 0
    if query.sort == "suspicion":
        order = [Study.max_malignancy.desc().nulls_last(), Study.max_diameter_mm.desc().nulls_last(),
                 Study.findings_count.desc().nulls_last(), Study.study_date.desc().nulls_last(), Study.id.desc()]
    elif query.sort == "date":
        order = [Study.study_date.desc().nulls_last(), Study.id.desc()]
    else:
        order = [Study.created_at.desc(), Study.id.desc()]
    rows = s.scalars(select(Study).where(cond).order_by(*order)
                     .offset((query.page - 1) * query.page_size).limit(query.page_size))
    return list(rows), int(total)


def format_da(value: str | None) -> str | None:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or None


def patient_name(value: str | None) -> str | None:
    """DICOM PN ``Family^Given^Middle`` as ``Family, Given Middle``."""
    if not value:
        return None
    first = value.split("=")[0]
    parts = [p for p in first.split("^")]
    family = parts[0]
    rest = " ".join(p for p in parts[1:3] if p)
    return f"{family}, {rest}" if rest and family else (family or rest)


def patient_label(name: str | None, patient_id: str | None) -> str:
    """What the worklist and the study header both call the patient: the name, else the ID."""
    return name or patient_id or "Anonymous patient"


def study_summary(study: Study, reviews: schemas.ReviewCounts | None = None) -> schemas.StudySummary:
    return schemas.StudySummary(
        study_instance_uid=study.study_instance_uid,
        status=study.status.value,
        status_reason=study.status_reason,
        patient_name=patient_name(study.patient_name),
        patient_id=study.patient_id,
        accession_number=study.accession_number,
        study_date=format_da(study.study_date),
        study_description=study.study_description,
        modalities=[m for m in (study.modalities or "").split("\\") if m],
        findings_count=study.findings_count,
        max_diameter_mm=study.max_diameter_mm,
        max_malignancy=study.max_malignancy,
        received_at=study.created_at,
        updated_at=study.updated_at,
        reviews=reviews,
    )


def get_study(s: Session, uid: str) -> Study:
    study = s.scalar(select(Study).where(Study.study_instance_uid == uid).options(selectinload(Study.series)))
    if study is None:
        raise not_found(f"study {uid}")
    return study


def study_findings(s: Session, study: Study) -> list[tuple[FindingRow, Series]]:
    """Findings of the latest finished job of each analysed series, in nodule-number order
    (which is most malignant first: ``dicom_node.results.common.order_findings``)."""
    latest = _latest_done_jobs([study.id])
    rows = s.execute(select(FindingRow, Series)
                     .join(latest, latest.c.job_id == FindingRow.job_id)
                     .join(Series, Series.id == latest.c.series_id)
                     .options(selectinload(FindingRow.review))
                     .order_by(Series.id, FindingRow.number))
    return [(f, se) for f, se in rows]


def _latest_done_jobs(study_ids: list[int]):
    """Subquery (series_id, job_id, study_id): the latest finished job of each series of the studies."""
    return (select(Job.series_id, func.max(Job.id).label("job_id"), Series.study_id.label("study_id"))
            .join(Series, Series.id == Job.series_id)
            .where(Series.study_id.in_(study_ids), Job.state == JobState.DONE)
            .group_by(Job.series_id, Series.study_id).subquery())


def review_counts(s: Session, study_ids: list[int]) -> dict[int, schemas.ReviewCounts]:
    """Per study: findings of its latest results and how many readers accepted or rejected."""
    if not study_ids:
        return {}
    latest = _latest_done_jobs(study_ids)
    rows = s.execute(
        select(latest.c.study_id, func.count(FindingRow.id),
               func.count(FindingReview.id).filter(FindingReview.decision == ReviewDecision.ACCEPTED.value),
               func.count(FindingReview.id).filter(FindingReview.decision == ReviewDecision.REJECTED.value))
        .select_from(latest)
        .join(FindingRow, FindingRow.job_id == latest.c.job_id)
        .outerjoin(FindingReview, FindingReview.finding_id == FindingRow.id)
        .group_by(latest.c.study_id))
    return {sid: schemas.ReviewCounts(findings=n, accepted=a, rejected=r, pending=n - a - r) for sid, n, a, r in rows}


def study_summaries(s: Session, studies: list[Study]) -> list[schemas.StudySummary]:
    counts = review_counts(s, [st.id for st in studies])
    return [study_summary(st, counts.get(st.id)) for st in studies]


def review_out(r: FindingReview | None) -> schemas.ReviewOut | None:
    if r is None:
        return None
    return schemas.ReviewOut(decision=r.decision, comment=r.comment, reviewer=r.reviewer, reviewed_at=r.reviewed_at)


def finding_out(f: FindingRow, se: Series) -> schemas.FindingOut:
    """A finding as readers see it: rounded (``dicom_node.presentation``), numbered, coloured."""
    return schemas.FindingOut(
        id=f.id, number=f.number, segment_number=f.segment_number, job_id=f.job_id,
        series_instance_uid=se.series_instance_uid,
        center_mm=[presentation.round_mm(v) for v in (f.center_x_mm, f.center_y_mm, f.center_z_mm)],
        location=f.location, diameter_mm=presentation.round_mm(f.diameter_mm),
        volume_mm3=presentation.round_mm3(f.volume_mm3),
        malignancy=presentation.round_probability(f.malignancy),
        suspicion=presentation.suspicion_level(f.malignancy),
        score=presentation.round_probability(f.score), colour=presentation.nodule_colour(f.number),
        image_url=f"/api/findings/{f.id}/image?plane=axial", review=review_out(f.review))


def _study_finding(s: Session, study_uid: str, number: int) -> FindingRow:
    study = get_study(s, study_uid)
    for f, _se in study_findings(s, study):
        if f.number == number:
            return f
    raise not_found(f"finding {number} of study {study_uid}")


def export_findings(s: Session) -> list[schemas.FindingExportRow]:
    """Every finding of the latest results of every study, with its review (follow-up of the model)."""
    latest = (select(Job.series_id, func.max(Job.id).label("job_id"))
              .where(Job.state == JobState.DONE).group_by(Job.series_id).subquery())
    rows = s.execute(select(FindingRow, Series.series_instance_uid, Study.study_instance_uid)
                     .join(latest, latest.c.job_id == FindingRow.job_id)
                     .join(Series, Series.id == latest.c.series_id)
                     .join(Study, Study.id == Series.study_id)
                     .options(selectinload(FindingRow.review))
                     .order_by(Study.id, Series.id, FindingRow.number))
    out = []
    for f, series_uid, study_uid in rows:
        r = f.review
        out.append(schemas.FindingExportRow(
            study_instance_uid=study_uid, series_instance_uid=series_uid, job_id=f.job_id, finding_number=f.number,
            center_x_mm=presentation.round_mm(f.center_x_mm), center_y_mm=presentation.round_mm(f.center_y_mm),
            center_z_mm=presentation.round_mm(f.center_z_mm), diameter_mm=presentation.round_mm(f.diameter_mm),
            volume_mm3=presentation.round_mm3(f.volume_mm3), malignancy=presentation.round_probability(f.malignancy),
            suspicion=presentation.suspicion_level(f.malignancy), score=presentation.round_probability(f.score),
            location=f.location, review=r.decision if r else "pending", review_comment=r.comment if r else None,
            reviewer=r.reviewer if r else None, reviewed_at=r.reviewed_at if r else None))
    return out


EXPORT_COLUMNS = list(schemas.FindingExportRow.model_fields)


def export_csv(rows: list[schemas.FindingExportRow]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=EXPORT_COLUMNS, lineterminator="\r\n")
    w.writeheader()
    for row in rows:
        d = row.model_dump()
        d["reviewed_at"] = row.reviewed_at.isoformat() if row.reviewed_at else ""
        w.writerow({k: ("" if v is None else _csv_safe(v)) for k, v in d.items()})
    return buf.getvalue()


def _csv_safe(value):
    """Free text that a spreadsheet would run as a formula is quoted with a leading apostrophe."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def study_detail(s: Session, uid: str, node: Node | None = None) -> schemas.StudyDetail:
    """The study with its series (and, given ``node``, why each undecided series is waiting),
    findings, result objects, jobs and transfers."""
    study = get_study(s, uid)
    summary = study_summary(study)
    series = sorted(study.series, key=lambda x: (x.is_result, x.series_number or 0, x.id))
    series_ids = [x.id for x in series]
    by_id = {x.id: x for x in series}
    jobs = list(s.scalars(select(Job).where(Job.series_id.in_(series_ids)).order_by(Job.id.desc()))) if series_ids else []
    job_ids = [j.id for j in jobs]
    results = list(s.scalars(select(ResultObject).where(ResultObject.job_id.in_(job_ids))
                             .order_by(ResultObject.job_id.desc(), ResultObject.kind))) if job_ids else []
    mine = or_(Transfer.job_id.in_(job_ids), Transfer.series_id.in_(series_ids))  # results, forwarded originals
    transfers = list(s.execute(select(Transfer, Destination.name).join(Destination, Destination.id == Transfer.destination_id)
                               .where(mine).order_by(Transfer.id.desc()))) if series_ids else []
    findings = [finding_out(f, se) for f, se in study_findings(s, study)]
    summary.reviews = review_counts(s, [study.id]).get(study.id)
    return schemas.StudyDetail(
        **summary.model_dump(),
        series=[schemas.SeriesOut(
            series_instance_uid=x.series_instance_uid, modality=x.modality, series_number=x.series_number,
            series_description=x.series_description, instance_count=x.instance_count or 0,
            eligible=x.eligible, eligibility_reason=x.eligibility_reason, is_result=bool(x.is_result),
            route_summary=x.route_summary,
            waiting_reason=app_studies.waiting_reason(node, s, x, utcnow()) if node is not None else None)
            for x in series],
        findings=findings,
        results=[schemas.ResultOut(id=r.id, job_id=r.job_id, kind=r.kind, sop_instance_uid=r.sop_instance_uid,
                                   series_instance_uid=r.series_instance_uid,
                                   download_url=f"/api/results/{r.id}/file") for r in results],
        jobs=[job_out(j, by_id.get(j.series_id), uid) for j in jobs],
        transfers=[transfer_out(t, name) for t, name in transfers],
    )


def latest_done_job_ids(s: Session, study: Study) -> list[int]:
    return [j for (j,) in s.execute(
        select(func.max(Job.id)).join(Series, Series.id == Job.series_id)
        .where(Series.study_id == study.id, Job.state == JobState.DONE).group_by(Job.series_id))]


def latest_job_ids(s: Session, study: Study) -> list[int]:
    return [j for (j,) in s.execute(
        select(func.max(Job.id)).join(Series, Series.id == Job.series_id)
        .where(Series.study_id == study.id).group_by(Job.series_id))]


def status_counts(s: Session) -> dict[str, int]:
    counts = repo.count_by(s, Study.status)
    return {k: counts.get(k, 0) for k in STATUS_LABELS}


def suspicion_level(malignancy: float | None) -> str:
    """``presentation.suspicion_level``, or ``"none"`` for a study without findings."""
    return "none" if malignancy is None else presentation.suspicion_level(malignancy)
