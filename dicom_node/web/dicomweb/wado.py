"""WADO-RS (PS3.18 10.4): retrieve studies, series, instances, metadata, frames, bulk data and
rendered images; and WADO-URI (PS3.18 9) for single objects.

* Instances (``/studies/{s}``, ``/series/{se}``, ``/instances/{i}``): multipart/related;
  type="application/dicom", streamed file by file, each file exactly as stored (its transfer
  syntax in the part's Content-Type).
* Metadata: DICOM JSON from the headers, cached per series (``metadata.MetadataCache``).
* Frames (``/frames/1,2``) and bulk data (``/bulk/7FE00010``): native, uncompressed little endian
  (``transfer-syntax=1.2.840.10008.1.2.1``), multipart/related; type="application/octet-stream";
  a single ``Accept: application/octet-stream`` gets one part without the multipart wrapping.
  Stored native pixel data is sliced, not decoded; compressed data is decoded with pydicom.
* Rendered (``/rendered``, ``/frames/{n}/rendered``): PNG (default) or JPEG of one frame, in the
  window given by ``window=center,width`` or else the instance's own, else its value range;
  ``/thumbnail`` of an instance or a series (its middle instance) the same, at most 128 px.

The route's UIDs must name the instance's own study and series (else 404).
"""
from __future__ import annotations

import io
import logging

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.web.deps import DB
from dicom_node.web.dicomweb.auth import Reader
from dicom_node.web.dicomweb.metadata import PIXEL_DATA, is_native
from dicom_node.web.dicomweb.responses import (
    DicomJSONResponse,
    DicomWebError,
    accept_types,
    base_url,
    file_chunks,
    multipart_response,
)
from dicom_node.web.images import window_to_grey
from storage.models import Instance, Series, Study

log = logging.getLogger(__name__)
router = APIRouter()

EXPLICIT_LE = "1.2.840.10008.1.2.1"
MAX_FRAMES_LISTED = 10_000


# --- look-ups ------------------------------------------------------------------------------------

def _study(s: Session, study_uid: str) -> Study:
    row = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if row is None:
        raise DicomWebError(404, "no such study")
    return row


def _series(s: Session, study_uid: str, series_uid: str) -> Series:
    row = s.scalar(select(Series).join(Study, Series.study_id == Study.id)
                   .where(Study.study_instance_uid == study_uid, Series.series_instance_uid == series_uid))
    if row is None:
        raise DicomWebError(404, "no such series in this study")
    return row


def _instance(s: Session, study_uid: str, series_uid: str, sop_uid: str) -> Instance:
    row = s.scalar(select(Instance).join(Series, Instance.series_id == Series.id)
                   .join(Study, Series.study_id == Study.id)
                   .where(Study.study_instance_uid == study_uid, Series.series_instance_uid == series_uid,
                          Instance.sop_instance_uid == sop_uid))
    if row is None:
        raise DicomWebError(404, "no such instance in this series")
    return row


def _ordered_instances(s: Session, *where) -> list[tuple[str, str]]:
    rows = s.execute(select(Instance.path, Instance.transfer_syntax_uid).join(Series, Instance.series_id == Series.id)
                     .join(Study, Series.study_id == Study.id).where(*where)
                     .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)).all()
    s.commit()  # end the read before streaming (SQLite)
    return [(r.path, r.transfer_syntax_uid) for r in rows]


# --- instances -----------------------------------------------------------------------------------

def _check_accept_dicom(request: Request) -> None:
    for media, params in accept_types(request):
        if media in ("*/*", "multipart/related", "multipart/*", "application/dicom"):
            part = params.get("type", "application/dicom").lower() if media.startswith("multipart") else media
            if part in ("application/dicom", "*/*", "*"):
                return
    raise DicomWebError(406, "instances are served as multipart/related; type=\"application/dicom\"")


def _dicom_response(node, rows: list[tuple[str, str]]):  # noqa: ANN001
    if not rows:
        raise DicomWebError(404, "no instances")

    def parts():
        for relpath, ts in rows:
            path = node.store.path(relpath)
            if not path.exists():
                log.warning("WADO-RS: %s has no file (removed meanwhile?): skipped", relpath)
                continue
            yield f"application/dicom; transfer-syntax={ts}", file_chunks(path)

    return multipart_response(parts(), "application/dicom")


@router.get("/studies/{study}", summary="WADO-RS: retrieve a study's instances")
def retrieve_study(study: str, request: Request, s: DB, user: Reader):
    _check_accept_dicom(request)
    _study(s, study)
    return _dicom_response(request.app.state.node, _ordered_instances(s, Study.study_instance_uid == study))


@router.get("/studies/{study}/series/{series}", summary="WADO-RS: retrieve a series' instances")
def retrieve_series(study: str, series: str, request: Request, s: DB, user: Reader):
    _check_accept_dicom(request)
    _series(s, study, series)
    return _dicom_response(request.app.state.node, _ordered_instances(
        s, Study.study_instance_uid == study, Series.series_instance_uid == series))


@router.get("/studies/{study}/series/{series}/instances/{instance}", summary="WADO-RS: retrieve an instance")
def retrieve_instance(study: str, series: str, instance: str, request: Request, s: DB, user: Reader):
    _check_accept_dicom(request)
    row = _instance(s, study, series, instance)
    return _dicom_response(request.app.state.node, [(row.path, row.transfer_syntax_uid)])


# --- metadata ------------------------------------------------------------------------------------

@router.get("/studies/{study}/metadata", summary="WADO-RS: metadata of a study's instances")
def study_metadata(study: str, request: Request, s: DB, user: Reader):
    st = _study(s, study)
    cache = request.app.state.dicomweb_metadata
    base = base_url(request)
    chunks = []
    for se in s.scalars(select(Series).where(Series.study_id == st.id).order_by(Series.series_number, Series.id)).all():
        data = cache.series(s, se, study, base)
        if len(data) > 2:
            chunks.append(data[1:-1])
    return DicomJSONResponse(b"[" + b",".join(chunks) + b"]")


@router.get("/studies/{study}/series/{series}/metadata", summary="WADO-RS: metadata of a series' instances")
def series_metadata(study: str, series: str, request: Request, s: DB, user: Reader):
    se = _series(s, study, series)
    return DicomJSONResponse(request.app.state.dicomweb_metadata.series(s, se, study, base_url(request)))


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata",
            summary="WADO-RS: metadata of an instance")
def instance_metadata(study: str, series: str, instance: str, request: Request, s: DB, user: Reader):
    import json

    row = _instance(s, study, series, instance)
    se = s.get(Series, row.series_id)
    items = json.loads(request.app.state.dicomweb_metadata.series(s, se, study, base_url(request)))
    found = [i for i in items if i.get("00080018", {}).get("Value", [None])[0] == instance]
    if not found:
        raise DicomWebError(404, "instance file unreadable")
    return DicomJSONResponse(found)


# --- pixel data ----------------------------------------------------------------------------------

def _read_full(node, row: Instance):  # noqa: ANN001
    try:
        return dcmread(node.store.path(row.path))
    except FileNotFoundError:
        raise DicomWebError(404, "instance file missing") from None


def _frame_count(ds) -> int:  # noqa: ANN001
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def frame_bytes(ds, index: int) -> bytes:  # noqa: ANN001
    """Frame ``index`` (0-based) as native little-endian bytes (1-bit data packed per frame)."""
    from pydicom.pixels import pack_bits, pixel_array

    ts = str(ds.file_meta.TransferSyntaxUID)
    bits = int(ds.BitsAllocated)
    if ts in (EXPLICIT_LE, "1.2.840.10008.1.2") and bits % 8 == 0:
        size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
        data = ds.PixelData
        chunk = data[index * size:(index + 1) * size]
        if len(chunk) != size:
            raise DicomWebError(404, f"frame {index + 1} is not in the pixel data")
        return bytes(chunk)
    arr = pixel_array(ds, index=index, raw=True)
    if bits == 1:
        return pack_bits(arr, pad=False)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def _frame_numbers(frames: str, count: int) -> list[int]:
    try:
        numbers = [int(f) for f in frames.split(",") if f.strip()]
    except ValueError:
        raise DicomWebError(400, "frames must be a comma-separated list of frame numbers") from None
    if not numbers or len(numbers) > MAX_FRAMES_LISTED:
        raise DicomWebError(400, "no frame numbers, or too many")
    bad = [n for n in numbers if not 1 <= n <= count]
    if bad:
        raise DicomWebError(404, f"frame {bad[0]} does not exist (the instance has {count})")
    return numbers


def _octet_mode(request: Request) -> str:
    """"multipart" or "single" (a bare application/octet-stream Accept); 406 for other types."""
    for media, params in accept_types(request):
        ts = params.get("transfer-syntax", "*")
        if ts not in ("*", EXPLICIT_LE):
            continue
        if media in ("multipart/related", "multipart/*"):
            if params.get("type", "application/octet-stream").lower() in ("application/octet-stream", "*/*", "*"):
                return "multipart"
        elif media == "application/octet-stream":
            return "single"
        elif media == "*/*":
            return "multipart"
    raise DicomWebError(406, "frames and bulk data are served as application/octet-stream with transfer syntax "
                             f"{EXPLICIT_LE} (uncompressed)")


def _octets(parts: list[bytes], mode: str):
    content_type = f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
    if mode == "single" and len(parts) == 1:
        return Response(parts[0], media_type="application/octet-stream",
                        headers={"Content-Type": content_type})
    return multipart_response(((content_type, (lambda b=b: iter((b,)))) for b in parts), "application/octet-stream")


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
            summary="WADO-RS: frames of an instance (uncompressed)")
def retrieve_frames(study: str, series: str, instance: str, frames: str, request: Request, s: DB, user: Reader):
    mode = _octet_mode(request)
    row = _instance(s, study, series, instance)
    s.commit()
    ds = _read_full(request.app.state.node, row)
    if "PixelData" not in ds:
        raise DicomWebError(404, "the instance has no pixel data")
    numbers = _frame_numbers(frames, _frame_count(ds))
    return _octets([frame_bytes(ds, n - 1) for n in numbers], mode)


@router.get("/studies/{study}/series/{series}/instances/{instance}/bulk/{tag}",
            summary="WADO-RS: bulk data of an instance (BulkDataURI)")
def retrieve_bulk(study: str, series: str, instance: str, tag: str, request: Request, s: DB, user: Reader):
    mode = _octet_mode(request)
    row = _instance(s, study, series, instance)
    s.commit()
    try:
        key = int(tag, 16)
    except ValueError:
        raise DicomWebError(400, "the bulk data tag is 8 hexadecimal digits") from None
    ds = _read_full(request.app.state.node, row)
    if f"{key:08X}" == PIXEL_DATA and "PixelData" in ds:
        if is_native(str(ds.file_meta.TransferSyntaxUID)):
            data = bytes(ds.PixelData)  # as stored (1-bit data stays packed)
        else:
            data = b"".join(frame_bytes(ds, i) for i in range(_frame_count(ds)))
        return _octets([data], mode)
    if key not in ds or not isinstance(ds[key].value, (bytes, bytearray)):
        raise DicomWebError(404, "no such bulk data element at the top level of the instance")
    return _octets([bytes(ds[key].value)], mode)


# --- rendered ------------------------------------------------------------------------------------

def _window(request: Request, ds, arr: np.ndarray) -> tuple[float, float]:  # noqa: ANN001
    raw = request.query_params.get("window")
    if raw:
        try:
            center, width = (float(v) for v in raw.split(",")[:2])
        except ValueError:
            raise DicomWebError(400, "window is center,width[,function] in the image's values (e.g. HU)") from None
        return center, width
    if "WindowCenter" in ds and "WindowWidth" in ds:
        def first(v):  # noqa: ANN001
            return float(v[0] if hasattr(v, "__len__") and not isinstance(v, str) else v)
        return first(ds.WindowCenter), first(ds.WindowWidth)
    lo, hi = float(arr.min()), float(arr.max())
    return (lo + hi) / 2, max(hi - lo, 1.0)


def render_frame(request: Request, ds, index: int, max_size: int | None = None) -> Response:  # noqa: ANN001
    from PIL import Image
    from pydicom.pixels import apply_rescale, pixel_array

    if "PixelData" not in ds:
        raise DicomWebError(406, "the instance is not an image: nothing to render")
    want = "image/png"
    for media, _ in accept_types(request):
        if media in ("image/png", "image/jpeg"):
            want = media
            break
        if media in ("*/*", "image/*"):
            break
    else:
        raise DicomWebError(406, "rendered images are image/png or image/jpeg")
    arr = pixel_array(ds, index=index)
    if int(ds.get("SamplesPerPixel", 1)) == 1:
        if int(ds.BitsAllocated) == 1:
            grey = (arr > 0).astype(np.uint8) * 255
        else:
            arr = apply_rescale(arr, ds).astype(np.float32)
            grey = window_to_grey(arr, *_window(request, ds, arr))
            if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
                grey = 255 - grey
        image = Image.fromarray(grey, mode="L")
    else:
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")
    if max_size is not None:
        image.thumbnail((max_size, max_size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    if want == "image/jpeg":
        quality = request.query_params.get("quality", "90")
        image.save(buf, format="JPEG", quality=max(1, min(100, int(quality) if quality.isdigit() else 90)))
    else:
        image.save(buf, format="PNG", compress_level=1)
    return Response(buf.getvalue(), media_type=want)


@router.get("/studies/{study}/series/{series}/instances/{instance}/rendered",
            summary="WADO-RS: an instance rendered (first frame; PNG or JPEG)")
def rendered_instance(study: str, series: str, instance: str, request: Request, s: DB, user: Reader):
    row = _instance(s, study, series, instance)
    s.commit()
    return render_frame(request, _read_full(request.app.state.node, row), 0)


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered",
            summary="WADO-RS: a frame rendered (PNG or JPEG)")
def rendered_frame(study: str, series: str, instance: str, frame: str, request: Request, s: DB, user: Reader):
    row = _instance(s, study, series, instance)
    s.commit()
    ds = _read_full(request.app.state.node, row)
    numbers = _frame_numbers(frame, _frame_count(ds))
    if len(numbers) != 1:
        raise DicomWebError(400, "one frame at a time is rendered")
    return render_frame(request, ds, numbers[0] - 1)


THUMBNAIL_PX = 128


@router.get("/studies/{study}/series/{series}/instances/{instance}/thumbnail",
            summary="WADO-RS: a small rendered image of an instance (at most 128 px)")
def thumbnail_instance(study: str, series: str, instance: str, request: Request, s: DB, user: Reader):
    row = _instance(s, study, series, instance)
    s.commit()
    return render_frame(request, _read_full(request.app.state.node, row), 0, THUMBNAIL_PX)


@router.get("/studies/{study}/series/{series}/thumbnail",
            summary="WADO-RS: a small rendered image of a series (its middle instance)")
def thumbnail_series(study: str, series: str, request: Request, s: DB, user: Reader):
    se = _series(s, study, series)
    rows = s.scalars(select(Instance).where(Instance.series_id == se.id)
                     .order_by(Instance.instance_number, Instance.id)).all()
    s.commit()
    if not rows:
        raise DicomWebError(404, "the series has no instances")
    return render_frame(request, _read_full(request.app.state.node, rows[len(rows) // 2]), 0, THUMBNAIL_PX)


# --- WADO-URI ------------------------------------------------------------------------------------

@router.get("/wado", summary="WADO-URI: one object as application/dicom, image/jpeg or image/png")
def wado_uri(request: Request, s: DB, user: Reader):
    q = request.query_params
    if q.get("requestType") != "WADO":
        raise DicomWebError(400, "requestType=WADO is required")
    study, series, instance = q.get("studyUID"), q.get("seriesUID"), q.get("objectUID")
    if not (study and series and instance):
        raise DicomWebError(400, "studyUID, seriesUID and objectUID are required")
    row = _instance(s, study, series, instance)
    s.commit()
    content = (q.get("contentType") or "image/jpeg").split(",")[0].strip()
    node = request.app.state.node
    if content == "application/dicom":
        return Response(node.store.path(row.path).read_bytes(), media_type="application/dicom")
    if content not in ("image/jpeg", "image/png"):
        raise DicomWebError(406, "contentType is application/dicom, image/jpeg or image/png")
    ds = _read_full(node, row)
    frame = int(q.get("frameNumber", "1")) if q.get("frameNumber", "1").isdigit() else 1
    if not 1 <= frame <= _frame_count(ds):
        raise DicomWebError(404, "no such frame")
    scope = dict(request.scope)
    scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"accept"] + [(b"accept", content.encode())]
    return render_frame(Request(scope), ds, frame - 1)

