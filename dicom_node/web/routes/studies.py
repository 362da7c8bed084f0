"""Studies (the worklist), their findings' key images and result downloads."""
from __future__ import annotations

from datetime import date
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from dicom_node.web import schemas, services
from dicom_node.web.deps import DB, AdminUser, AnyUser, NodeDep, PageNumber, RowId
from dicom_node.web.images import WINDOWS, ImageError
from storage.models import ResultObject

router = APIRouter(prefix="/api", tags=["studies"])


@router.get("/studies", response_model=schemas.StudyPage,
            summary="Worklist: studies with AI status and findings, most suspicious first")
def list_studies(
    s: DB, user: AnyUser,
    status: Annotated[str | None, Query(description="received, waiting, processing, done, not_eligible, not_analysed, failed")] = None,
    date_from: Annotated[date | None, Query(description="study date from (YYYY-MM-DD)")] = None,
    date_to: Annotated[date | None, Query(description="study date to (YYYY-MM-DD), inclusive")] = None,
    modality: Annotated[str | None, Query(description="e.g. CT")] = None,
    q: Annotated[str | None, Query(description="search patient name/ID, accession, study UID or description")] = None,
    sort: Annotated[str, Query(description="suspicion (default), date, received")] = "suspicion",
    page: PageNumber = 1,
    page_size: Annotated[int, Query(ge=1, le=services.MAX_PAGE_SIZE)] = 50,
) -> schemas.StudyPage:
    query = services.StudyQuery(status=status, date_from=date_from, date_to=date_to, modality=modality, q=q,
                                sort=sort, page=page, page_size=page_size)
    rows, total = services.list_studies(s, query)
    return schemas.StudyPage(items=services.study_summaries(s, rows), total=total,
                             page=query.page, page_size=query.page_size)


@router.get("/studies/{study_uid}", response_model=schemas.StudyDetail,
            summary="One study: series, findings, result objects, jobs and transfers")
def get_study(study_uid: str, s: DB, node: NodeDep, user: AnyUser) -> schemas.StudyDetail:
    detail = services.study_detail(s, study_uid, node)
    for t in detail.transfers:  # delivery errors are the administrator's business
        t.error = services.visible_transfer_error(user.role, t.error)
    return detail


FindingNumber = Annotated[int, Path(ge=1, le=100_000, description="nodule number (SR tracking id 'Nodule <n>')")]


@router.post("/studies/{study_uid}/findings/{number}/review", response_model=schemas.FindingOut,
             summary="Accept or reject a finding (a reader's review; audited, the latest decision counts)")
def review_finding(study_uid: str, number: FindingNumber, body: schemas.ReviewIn, s: DB,
                   user: AnyUser) -> schemas.FindingOut:
    f = services.review_finding(s, user.username, study_uid, number, body)
    s.commit()
    s.refresh(f)
    from storage.models import Series

    return services.finding_out(f, s.get(Series, f.job.series_id))


@router.get("/findings/export", response_class=Response,
            responses={200: {"content": {"text/csv": {}, "application/json": {
                "schema": {"type": "array", "items": {"$ref": "#/components/schemas/FindingExportRow"}}}}}},
            summary="All findings of the latest results with their reviews, as CSV or JSON (follow-up of the model)")
def export_findings(s: DB, user: AnyUser,
                    format: Annotated[str, Query(pattern="^(csv|json)$", description="csv or json")] = "json") -> Response:
    rows = services.export_findings(s)
    headers = {"Content-Disposition": f'attachment; filename="findings.{format}"', "Cache-Control": "no-store"}
    if format == "csv":
        return Response(services.export_csv(rows), media_type="text/csv; charset=utf-8", headers=headers)
    return JSONResponse([r.model_dump(mode="json") for r in rows], headers=headers)


def _complete(s, user, study_uid: str, series_uid: str | None) -> dict:
    uids = services.complete_now(s, user.username, study_uid, series_uid)  # 404 for an unknown UID
    s.commit()
    return {"study_instance_uid": study_uid, "series": uids}


@router.post("/studies/{study_uid}/complete", summary="Complete now: evaluate the study's series at the next "
             "scheduler pass, open associations and quiet period aside (admin)")
def complete_study(study_uid: str, s: DB, user: AdminUser) -> dict:
    return _complete(s, user, study_uid, None)


@router.post("/studies/{study_uid}/series/{series_uid}/complete",
             summary="Complete now, for one series of the study (admin)")
def complete_series(study_uid: str, series_uid: str, s: DB, user: AdminUser) -> dict:
    return _complete(s, user, study_uid, series_uid)


@router.get("/findings/{finding_id}/image", response_class=Response,
            responses={200: {"content": {"image/png": {}}}},
            summary="Key image of a finding (PNG, in a window, nodule outlined, orientation letters)")
def finding_image(request: Request, finding_id: RowId, user: AnyUser,
                  plane: Annotated[str, Query(description="axial, coronal or sagittal")] = "axial",
                  offset: Annotated[int, Query(ge=-2000, le=2000, description="slices from the nodule centre")] = 0,
                  zoom: Annotated[int, Query(ge=1, le=4, description="1 (whole slice), 2 or 4 (centred on the nodule)")] = 1,
                  window: Annotated[str, Query(description=", ".join(
                      f"{k} (W {w:.0f} / L {lv:.0f})" for k, (lv, w) in WINDOWS.items()))] = "lung") -> Response:
    try:
        png, info = request.app.state.key_images.render(finding_id, plane, offset, zoom, window)
    except ImageError as exc:
        raise HTTPException(exc.status_code, detail=exc.message) from None
    o = info["orientation"]
    headers = {"Cache-Control": "private, max-age=300", "X-Slice-Index": str(info["index"]),
               "X-Slice-Count": str(info["count"]), "X-Centre-Index": str(info["centre_index"]),
               "X-Outline": info["outline"], "X-Zoom": str(info["zoom"]), "X-Window": info["window"],
               "X-Orientation": f"{o['top']},{o['bottom']},{o['left']},{o['right']}",
               "X-Prerendered": "1" if info.get("cached") else "0"}
    return Response(png, media_type="image/png", headers=headers)


@router.get("/results/{result_id}/file", response_class=FileResponse,
            responses={200: {"content": {"application/dicom": {}}}},
            summary="Download a result object (SR or SEG) as a DICOM file")
def result_file(result_id: RowId, s: DB, node: NodeDep, user: AnyUser) -> FileResponse:
    row = s.get(ResultObject, result_id)
    if row is None:
        raise HTTPException(404, detail=f"result object {result_id} not found")
    path = node.store.path(row.path)
    if not path.exists():
        raise HTTPException(410, detail=f"the file of result object {result_id} is no longer in the store")
    return FileResponse(path, media_type="application/dicom", filename=f"{row.kind}-{row.sop_instance_uid}.dcm")
