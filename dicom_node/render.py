"""Views of a finding as PNG: one slice through the nodule in a display window, outlined.

Shared by the web stage (``dicom_node.web.images``, on request) and the worker (``prerender``,
right after a job's results are committed), so the worker imports nothing of the web.

Coordinates: ``volume.array`` is (Z, Y, X) in HU; ``volume.direction`` has as columns the LPS
unit vectors of the x, y and z index axes; ``centre_voxel`` is (z, y, x) in voxel indices.
Planes: axial = array[z], shown as stored (rows down the y index, columns along x: patient right
on the image left for a supine patient); coronal = array[:, y, :] and sagittal = array[:, :, x],
resampled to square millimetres (so the aspect follows the spacing), head up. Each image carries
orientation letters (A/P, R/L, S/I from the direction cosines, LPS) at the middle of its edges.

Windows (level, width in HU): ``WINDOWS``. Nodule ``n`` is outlined in its SEG colour
(``dicom_node.presentation.nodule_colour``): the boundary of its SEG segment where the SEG
covers the slice, else a circle of the finding's diameter on slices the sphere crosses.

Pre-rendered images: ``cache_relpath`` names, in the file store, the PNG of (job, nodule number,
plane, window, zoom) at the nodule centre; ``prerender`` writes them for every finding of a job
and the web serves them without loading the series (the first study page is then fast).
"""
from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicom_node.presentation import hex_rgb, nodule_colour

log = logging.getLogger(__name__)

PLANES = ("axial", "coronal", "sagittal")
ZOOMS = (1, 2, 4)
#: Display windows: name -> (level, width) in HU.
WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (50.0, 350.0), "bone": (500.0, 2000.0)}
DEFAULT_WINDOW = "lung"
DISPLAY_PX = 512
#: What ``prerender`` writes per finding: every plane, every window, whole slice, nodule centre.
PRERENDER = tuple((plane, window, 1) for plane in PLANES for window in WINDOWS)

_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}
_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))  # negative, positive LPS x, y, z


@dataclass(frozen=True)
class View:
    """One rendered slice: the PNG and what it shows."""

    png: bytes
    plane: str
    index: int  # slice index along the plane's axis (0-based)
    count: int  # slices along that axis
    centre_index: int  # the slice through the nodule centre
    outline: str  # "seg" or "circle"
    window: str
    zoom: int
    orientation: dict  # {"top": "A", "bottom": "P", "left": "R", "right": "L"}

    def info(self) -> dict:
        return {"plane": self.plane, "index": self.index, "count": self.count, "centre_index": self.centre_index,
                "outline": self.outline, "window": self.window, "zoom": self.zoom, "orientation": self.orientation}


def direction_letters(vector) -> str:
    """Orientation letters of an LPS direction, dominant first (e.g. ``"L"``, or ``"LA"`` if oblique)."""
    v = np.asarray(vector, dtype=float)
    order = np.argsort(-np.abs(v))
    letters = ""
    for axis in order:
        if abs(v[axis]) >= 0.3 or not letters:
            letters += _LETTERS[axis][1 if v[axis] > 0 else 0]
    return letters


def z_goes_up(volume) -> bool:
    """Whether increasing slice index points to the patient's head (LPS +z)."""
    return float(np.asarray(volume.direction)[2, 2]) >= 0


def orientation(volume, plane: str) -> dict:
    """The letters at the top, bottom, left and right of a displayed ``plane`` (LPS)."""
    d = np.asarray(volume.direction, dtype=float)
    x, y, z = d[:, 0], d[:, 1], d[:, 2]
    if plane == "axial":
        down, right = y, x
    else:
        down = -z if z_goes_up(volume) else z  # rows flipped so that the head is up
        right = x if plane == "coronal" else y
    return {"top": direction_letters(-down), "bottom": direction_letters(down),
            "left": direction_letters(-right), "right": direction_letters(right)}


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
        if number is None or number != segment_number:
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


def check_request(plane: str, window: str, zoom: int) -> None:
    """Raise ``ValueError`` naming the bad value."""
    if plane not in PLANES:
        raise ValueError(f"plane {plane!r} is not one of {list(PLANES)}")
    if window not in WINDOWS:
        raise ValueError(f"window {window!r} is not one of {list(WINDOWS)}")
    if zoom not in ZOOMS:
        raise ValueError(f"zoom {zoom!r} is not one of {list(ZOOMS)}")


def render_view(volume, mask: np.ndarray | None, centre_mm, diameter_mm: float, number: int,
                plane: str = "axial", offset: int = 0, window: str = DEFAULT_WINDOW, zoom: int = 1) -> View:
    """The slice ``offset`` slices from the nodule centre (clamped) in ``plane``.

    ``centre_mm``: LPS (x, y, z) mm; ``diameter_mm``: for the circle when there is no mask;
    ``number``: the nodule number (its colour). ``zoom`` 1 shows the whole slice (longest side
    512 px); 2 and 4 a 512 px square centred on the nodule, magnified.
    """
    check_request(plane, window, zoom)
    arr = volume.array
    centre = np.asarray(volume.lps_to_voxel(centre_mm), dtype=float)  # (z, y, x)
    axis = _AXIS[plane]
    count = arr.shape[axis]
    base = int(np.clip(round(centre[axis]), 0, count - 1))
    index = int(np.clip(base + int(offset), 0, count - 1))
    sz, sy, sx = volume.spacing
    if axis == 0:
        img, m2 = arr[index], (mask[index] if mask is not None else None)
        px_h, px_w, c_row, c_col = sy, sx, centre[1], centre[2]
    elif axis == 1:
        img, m2 = arr[:, index, :], (mask[:, index, :] if mask is not None else None)
        px_h, px_w, c_row, c_col = sz, sx, centre[0], centre[2]
    else:
        img, m2 = arr[:, :, index], (mask[:, :, index] if mask is not None else None)
        px_h, px_w, c_row, c_col = sz, sy, centre[0], centre[1]
    flip = axis != 0 and z_goes_up(volume)
    dist_mm = abs(index - centre[axis]) * (sz, sy, sx)[axis]
    labels = orientation(volume, plane)
    png = _draw(img, m2, flip, px_h, px_w, c_row, c_col, diameter_mm, dist_mm, zoom, WINDOWS[window],
                hex_rgb(nodule_colour(number)), labels)
    return View(png=png, plane=plane, index=index, count=count, centre_index=base,
                outline="seg" if mask is not None else "circle", window=window, zoom=zoom, orientation=labels)


def window_to_grey(img: np.ndarray, level: float, width: float) -> np.ndarray:
    """8-bit grey of ``img`` (values in the window's units, e.g. HU) through a linear window
    (PS3.3 C.11.2.1.2 without the half-pixel shifts): ``level - width/2`` is black,
    ``level + width/2`` white."""
    width = max(float(width), 1.0)
    lo = float(level) - width / 2
    return np.clip((img.astype(np.float32) - lo) * (255.0 / width), 0, 255).astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font only
        return ImageFont.load_default()


def _draw(img: np.ndarray, m2: np.ndarray | None, flip: bool, px_h: float, px_w: float, c_row: float,
          c_col: float, diameter_mm: float, dist_mm: float, zoom: int, window: tuple[float, float],
          rgb_outline: tuple[int, int, int], labels: dict) -> bytes:
    from PIL import Image, ImageDraw

    grey = window_to_grey(img, *window)
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
        edge[1:, :] |= edge[:-1, :]  # 2 px, so it reads at a glance
        edge[:, 1:] |= edge[:, :-1]
        rgb = np.asarray(image).copy()
        rgb[edge] = rgb_outline
        image = Image.fromarray(rgb)
    elif m2 is None and diameter_mm > 0 and dist_mm < diameter_mm / 2:
        radius_mm = (max(diameter_mm / 2, 1.0) ** 2 - dist_mm ** 2) ** 0.5
        cy, cx = (c_row + 0.5) * px_h * scale, (c_col + 0.5) * px_w * scale
        r = max(radius_mm * scale, 4.0) + 2
        ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), outline=rgb_outline, width=2)
    if zoom > 1:
        cy, cx = (c_row + 0.5) * px_h * scale, (c_col + 0.5) * px_w * scale
        left, top = round(cx - DISPLAY_PX / 2), round(cy - DISPLAY_PX / 2)
        image = image.crop((left, top, left + DISPLAY_PX, top + DISPLAY_PX))  # outside: black
    _letters(image, labels)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _letters(image, labels: dict) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    font = _font(18)
    w, h = image.size
    for edge, text in labels.items():
        box = draw.textbbox((0, 0), text, font=font)
        tw, th = box[2] - box[0], box[3] - box[1]
        x, y = {"top": ((w - tw) / 2, 4), "bottom": ((w - tw) / 2, h - th - 8),
                "left": (6, (h - th) / 2), "right": (w - tw - 6, (h - th) / 2)}[edge]
        draw.text((x, y), text, font=font, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))


# --- pre-rendered images -------------------------------------------------------------------------

def cache_relpath(job_id: int, number: int, plane: str, window: str, zoom: int) -> str:
    """File-store path of the pre-rendered centre slice (beside the job's result objects)."""
    return f"results/{int(job_id)}/render/nodule-{int(number)}-{plane}-{window}-z{int(zoom)}.png"


def info_relpath(png_relpath: str) -> str:
    return png_relpath[:-4] + ".json"


def finding_key(center_mm, diameter_mm) -> str:
    """What a pre-rendered image was drawn for (centre LPS mm and diameter mm, to 0.01 mm): a file
    left under a reused job id (SQLite may reuse the ids of deleted rows) is never served for
    another finding."""
    return ",".join(f"{float(v):.2f}" for v in (*center_mm, diameter_mm))


def write_cached(store, job_id: int, number: int, view: View, key: str) -> None:
    rel = cache_relpath(job_id, number, view.plane, view.window, view.zoom)
    store.write_atomic(rel, view.png)
    store.write_atomic(info_relpath(rel), json.dumps({**view.info(), "finding_key": key}).encode())


def read_cached(store, job_id: int, number: int, plane: str, window: str, zoom: int,
                key: str) -> tuple[bytes, dict] | None:
    """The pre-rendered PNG and its facts, or None when absent, unreadable or drawn for another
    finding (``finding_key``)."""
    rel = cache_relpath(job_id, number, plane, window, zoom)
    try:
        info = json.loads(store.read_bytes(info_relpath(rel)))
        if info.pop("finding_key", None) != key:
            return None
        return store.read_bytes(rel), info
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Nodule:
    """What ``prerender`` needs of a finding: its number, SEG segment, centre (LPS mm), diameter."""

    number: int
    segment_number: int | None
    center_mm: tuple[float, float, float]
    diameter_mm: float


def prerender(store, job_id: int, volume, seg_path: Path | None, nodules: list[Nodule]) -> int:
    """Write the centre views (``PRERENDER``) of every nodule of a job; returns how many images."""
    written = 0
    for n in nodules:
        mask = None
        if seg_path is not None and n.segment_number is not None and seg_path.exists():
            mask = seg_mask(seg_path, volume, n.segment_number)
        for plane, window, zoom in PRERENDER:
            view = render_view(volume, mask, n.center_mm, n.diameter_mm, n.number, plane, 0, window, zoom)
            write_cached(store, job_id, n.number, view, finding_key(n.center_mm, n.diameter_mm))
            written += 1
    return written
