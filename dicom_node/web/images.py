"""Key images of a finding for the study page, rendered on request (``dicom_node.render``).

Contract: ``KeyImages.render(finding_id, plane, offset, zoom, window)`` returns PNG bytes and
facts about the slice shown. At the nodule centre (``offset`` 0) it serves the image the worker
pre-rendered when the job finished (``dicom_node.render.prerender``), without reading the series;
otherwise it loads the series the finding was computed on (``dicom_node.volume.load_series``),
and outlines the nodule with its SEG segment (``findings.segment_number``; the nodule number for
rows written before that column existed) or a circle. Loaded volumes and masks are cached (a few
series) so scrolling is fast; the database session is never held while a series is read.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select

from dicom_node import render as renderer
from dicom_node.node import Node
from storage.models import FindingRow, Instance, Job, ResultObject, Series

log = logging.getLogger(__name__)

PLANES = renderer.PLANES
ZOOMS = renderer.ZOOMS
WINDOWS = renderer.WINDOWS


class ImageError(Exception):
    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code
        self.message = message


@dataclass(frozen=True)
class FindingGeometry:
    series_uid: str
    cache_key: tuple
    paths: tuple[Path, ...]
    seg_path: Path | None
    job_id: int
    number: int
    segment_number: int | None
    center_mm: tuple[float, float, float]
    diameter_mm: float


def load_volume(paths: list[Path]):
    """The series as a ``dicom_node.volume.Volume`` (one place to switch the loader)."""
    from dicom_node.volume import load_series

    return load_series(paths)


seg_mask = renderer.seg_mask
window_to_grey = renderer.window_to_grey  # used by DICOMweb's rendered resources


class KeyImages:
    def __init__(self, node: Node, cache_size: int = 2):
        self.node = node
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, tuple] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple, threading.Lock] = {}
        self._mask_lock = threading.Lock()

    # --- data -------------------------------------------------------------------------------------

    def geometry(self, finding_id: int) -> FindingGeometry:
        with self.node.sessions() as s:
            f = s.get(FindingRow, finding_id)
            if f is None:
                raise ImageError(404, f"finding {finding_id} not found")
            job = s.get(Job, f.job_id)
            series = s.get(Series, job.series_id)
            rows = s.execute(select(Instance.path, Instance.received_at).where(Instance.series_id == series.id)).all()
            if not rows:
                raise ImageError(404, f"series {series.series_instance_uid} has no stored instances")
            seg = s.scalar(select(ResultObject.path).where(ResultObject.job_id == job.id, ResultObject.kind == "seg")
                           .order_by(ResultObject.id.desc()).limit(1))
            latest = max(r.received_at for r in rows)
            return FindingGeometry(
                series_uid=series.series_instance_uid,
                cache_key=(series.series_instance_uid, len(rows), str(latest), seg or ""),
                paths=tuple(self.node.store.path(r.path) for r in rows),
                seg_path=self.node.store.path(seg) if seg else None,
                job_id=job.id,
                number=f.number,
                segment_number=f.segment_number if f.segment_number is not None else f.number,
                center_mm=(f.center_x_mm, f.center_y_mm, f.center_z_mm),
                diameter_mm=float(f.diameter_mm or 0.0),
            )

    def _volume_and_masks(self, geo: FindingGeometry):
        """The cached (volume, masks) of a series; one thread loads a series, others wait for it."""
        with self._lock:
            hit = self._cache.get(geo.cache_key)
            if hit is not None:
                self._cache.move_to_end(geo.cache_key)
                return hit
            loading = self._loading.setdefault(geo.cache_key, threading.Lock())
        with loading:
            with self._lock:
                hit = self._cache.get(geo.cache_key)
            if hit is not None:
                return hit
            try:
                volume = load_volume(list(geo.paths))
            except (ValueError, OSError) as exc:
                raise ImageError(422, f"series {geo.series_uid} cannot be shown: {exc}") from None
            finally:
                with self._lock:
                    self._loading.pop(geo.cache_key, None)
            entry = (volume, {})
            with self._lock:
                self._cache[geo.cache_key] = entry
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return entry

    def _mask(self, geo: FindingGeometry, volume, masks: dict) -> np.ndarray | None:
        if geo.seg_path is None or geo.segment_number is None:
            return None
        with self._mask_lock:
            if geo.segment_number not in masks:
                masks[geo.segment_number] = (renderer.seg_mask(geo.seg_path, volume, geo.segment_number)
                                             if geo.seg_path.exists() else None)
            return masks[geo.segment_number]

    # --- rendering --------------------------------------------------------------------------------

    def render(self, finding_id: int, plane: str = "axial", offset: int = 0, zoom: int = 1,
               window: str = renderer.DEFAULT_WINDOW) -> tuple[bytes, dict]:
        """PNG bytes and facts about the slice shown (index, count, outline source, orientation)."""
        try:
            renderer.check_request(plane, window, zoom)
        except ValueError as exc:
            raise ImageError(422, str(exc)) from None
        geo = self.geometry(finding_id)
        if offset == 0:
            cached = renderer.read_cached(self.node.store, geo.job_id, geo.number, plane, window, zoom,
                                          renderer.finding_key(geo.center_mm, geo.diameter_mm))
            if cached is not None:
                png, info = cached
                return png, {**info, "cached": True}
        volume, masks = self._volume_and_masks(geo)
        mask = self._mask(geo, volume, masks)
        view = renderer.render_view(volume, mask, geo.center_mm, geo.diameter_mm, geo.number, plane, offset,
                                    window, zoom)
        return view.png, {**view.info(), "cached": False}
