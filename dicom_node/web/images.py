"""Key images of a finding, rendered on the server from the stored series (PNG).

Contract: ``KeyImages.render(finding_id, plane, offset)`` loads the series the finding was
computed on (``dicom_node.volume.load_series``: (Z, Y, X) float32 HU with LPS geometry), takes
the slice through the nodule centre in the requested plane, ``offset`` slices away from it
(clamped to the volume), shows it in a lung window (W 1500, L -600) and outlines the nodule:
with the boundary of its segment in the job's DICOM SEG (the result object of kind "seg", read
with highdicom; segment number = finding number) where the SEG covers that slice, else with a
circle of the finding's diameter around its centre (only on slices the sphere crosses).

Axial images are shown as stored (patient right on the image left for the usual supine
orientation); coronal and sagittal reformats are resampled to square millimetres with the
head up. Loaded volumes and masks are cached (a few series) so scrolling is fast; the database
session is never held while a series is read.
"""
from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select

from dicom_node.node import Node
from storage.models import FindingRow, Instance, Job, ResultObject, Series

log = logging.getLogger(__name__)

PLANES = ("axial", "coronal", "sagittal")
ZOOMS = (1, 2, 4)
LUNG_WINDOW = (-600.0, 1500.0)  # level, width (HU)
OUTLINE_RGB = (255, 196, 0)
DISPLAY_PX = 512


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
    number: int
    center_mm: tuple[float, float, float]
    diameter_mm: float


def window_to_grey(img: np.ndarray, level: float, width: float) -> np.ndarray:
    """8-bit grey of ``img`` (values in the window's units, e.g. HU) through a linear window
    (PS3.3 C.11.2.1.2 without the half-pixel shifts): ``level - width/2`` is black,
    ``level + width/2`` white."""
    width = max(float(width), 1.0)
    lo = float(level) - width / 2
    return np.clip((img.astype(np.float32) - lo) * (255.0 / width), 0, 255).astype(np.uint8)


def load_volume(paths: list[Path]):
    """The series as a ``dicom_node.volume.Volume`` (one place to switch the loader)."""
    from dicom_node.volume import load_series

    return load_series(paths)


def seg_mask(seg_path: Path, volume, segment_number: int) -> np.ndarray | None:
    """Boolean (Z, Y, X) mask of one SEG segment on ``volume``'s grid, or None if unusable.

    Frames are placed by their source image reference (SOP Instance UID of the CT slice), else
    by their Image Position (Patient); frames of other segments or other grids are ignored.
    """
    import highdicom as hd

    try:
        seg = hd.seg.segread(seg_path)
        pixels = np.asarray(seg.pixel_array)
    except Exception as exc:  # noqa: BLE001 - a bad SEG falls back to the circle
        log.warning("cannot read SEG %s: %s", seg_path, exc)
        return None
    if pixels.ndim == 2:
        pixels = pixels[None]
    zdim, ydim, xdim = volume.array.shape
    if pixels.shape[1:] != (ydim, xdim):
        return None
    by_uid = {str(ds.SOPInstanceUID): z for z, ds in enumerate(volume.datasets)}
    mask = np.zeros(volume.array.shape, dtype=bool)
    found = False
    shared = None
    try:  # with one segment, writers may put its identification in the shared groups
        shared = int(seg.SharedFunctionalGroupsSequence[0].SegmentIdentificationSequence[0].ReferencedSegmentNumber)
    except (AttributeError, IndexError):
        pass
    for i, frame in enumerate(getattr(seg, "PerFrameFunctionalGroupsSequence", [])):
        try:
            number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        except (AttributeError, IndexError):
            number = shared
        if number is None:
            continue
        if number != segment_number:
            continue
        z = None
        try:
            uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            z = by_uid.get(uid)
        except (AttributeError, IndexError):
            pass
        if z is None:
            try:
                ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
                zf = float(volume.lps_to_voxel(ipp)[0])
                z = int(round(zf)) if abs(zf - round(zf)) < 0.25 else None
            except (AttributeError, IndexError, ValueError):
                z = None
        if z is None or not 0 <= z < zdim:
            continue
        mask[z] |= pixels[i] > 0
        found = True
    return mask if found else None


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
                number=f.number,
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
        if geo.seg_path is None:
            return None
        with self._mask_lock:
            if geo.number not in masks:
                masks[geo.number] = seg_mask(geo.seg_path, volume, geo.number) if geo.seg_path.exists() else None
            return masks[geo.number]

    # --- rendering --------------------------------------------------------------------------------

    def render(self, finding_id: int, plane: str = "axial", offset: int = 0, zoom: int = 1) -> tuple[bytes, dict]:
        """PNG bytes and facts about the slice shown (index, count, outline source).

        ``zoom`` 1 shows the whole slice (longest side 512 px); 2 and 4 show a 512 px square
        centred on the nodule, magnified.
        """
        if plane not in PLANES:
            raise ImageError(422, f"plane {plane!r} is not one of {list(PLANES)}")
        if zoom not in ZOOMS:
            raise ImageError(422, f"zoom {zoom!r} is not one of {list(ZOOMS)}")
        geo = self.geometry(finding_id)
        volume, masks = self._volume_and_masks(geo)
        mask = self._mask(geo, volume, masks)
        arr = volume.array
        centre = np.asarray(volume.lps_to_voxel(geo.center_mm), dtype=float)  # (z, y, x)
        axis = {"axial": 0, "coronal": 1, "sagittal": 2}[plane]
        count = arr.shape[axis]
        base = int(np.clip(round(centre[axis]), 0, count - 1))
        index = int(np.clip(base + int(offset), 0, count - 1))
        sz, sy, sx = volume.spacing
        if axis == 0:
            img, m2 = arr[index], (mask[index] if mask is not None else None)
            px_h, px_w = sy, sx
            c_row, c_col = centre[1], centre[2]
        elif axis == 1:
            img, m2 = arr[:, index, :], (mask[:, index, :] if mask is not None else None)
            px_h, px_w = sz, sx
            c_row, c_col = centre[0], centre[2]
        else:
            img, m2 = arr[:, :, index], (mask[:, :, index] if mask is not None else None)
            px_h, px_w = sz, sy
            c_row, c_col = centre[0], centre[1]
        flip = axis != 0 and self._z_goes_up(volume)
        dist_mm = abs(index - centre[axis]) * (sz, sy, sx)[axis]
        outline = "seg" if mask is not None else "circle"
        png = self._draw(img, m2, flip, px_h, px_w, c_row, c_col, geo.diameter_mm, dist_mm, zoom)
        return png, {"index": index, "count": count, "centre_index": base, "outline": outline, "plane": plane,
                     "zoom": zoom}

    @staticmethod
    def _z_goes_up(volume) -> bool:
        """Whether increasing slice index points to the patient's head (LPS +z)."""
        return float(np.asarray(volume.direction)[2, 2]) >= 0

    @staticmethod
    def _draw(img: np.ndarray, m2: np.ndarray | None, flip: bool, px_h: float, px_w: float,
              c_row: float, c_col: float, diameter_mm: float, dist_mm: float, zoom: int = 1) -> bytes:
        from PIL import Image, ImageDraw

        grey = window_to_grey(img, *LUNG_WINDOW)
        rows, cols = grey.shape
        if flip:
            grey = grey[::-1]
            m2 = None if m2 is None else m2[::-1]
            c_row = rows - 1 - c_row
        # Square millimetres, longest side DISPLAY_PX (times the zoom, cropped below).
        h_mm, w_mm = rows * px_h, cols * px_w
        scale = DISPLAY_PX * zoom / max(h_mm, w_mm)  # display pixels per mm
        out_h, out_w = max(1, round(h_mm * scale)), max(1, round(w_mm * scale))
        image = Image.fromarray(grey, mode="L").resize((out_w, out_h), Image.Resampling.BILINEAR).convert("RGB")
        if m2 is not None and m2.any():
            big = np.asarray(Image.fromarray(m2.astype(np.uint8) * 255, mode="L").resize((out_w, out_h), Image.Resampling.NEAREST)) > 0
            inner = big.copy()
            inner[1:-1, 1:-1] = big[1:-1, 1:-1] & big[:-2, 1:-1] & big[2:, 1:-1] & big[1:-1, :-2] & big[1:-1, 2:]
            edge = big & ~inner
            # Thicken the edge to 2 px so it reads at a glance.
            edge[1:, :] |= edge[:-1, :]
            edge[:, 1:] |= edge[:, :-1]
            rgb = np.asarray(image).copy()
            rgb[edge] = OUTLINE_RGB
            image = Image.fromarray(rgb)
        elif m2 is None and diameter_mm > 0 and dist_mm < diameter_mm / 2:
            radius_mm = (max(diameter_mm / 2, 1.0) ** 2 - dist_mm ** 2) ** 0.5
            cy = (c_row + 0.5) * px_h * scale
            cx = (c_col + 0.5) * px_w * scale
            r = max(radius_mm * scale, 4.0) + 2
            ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), outline=OUTLINE_RGB, width=2)
        if zoom > 1:
            cy = (c_row + 0.5) * px_h * scale
            cx = (c_col + 0.5) * px_w * scale
            left, top = round(cx - DISPLAY_PX / 2), round(cy - DISPLAY_PX / 2)
            image = image.crop((left, top, left + DISPLAY_PX, top + DISPLAY_PX))  # outside: black
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
