"""Data loading: images, the LUNA16 nodule cubes, LUNA16 ``.mhd`` + ``annotations.csv``,
LIDC-IDRI reader XML, the series split, and pasting nodules into real lung.

Coordinate conventions: arrays are (Z, Y, X); ``spacing`` is (sz, sy, sx) mm; world points are
DICOM patient coordinates (LPS) in mm given as (x, y, z), as in LUNA16 and SimpleITK.
"""
from __future__ import annotations

import ast
import csv
import hashlib

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LUNA_CUBES = DATA_ROOT / "luna16-nodules"
LIDC_0001 = DATA_ROOT / "lidc-idri" / "LIDC-IDRI-0001"
LIDC_0001_XML = DATA_ROOT / "lidc-idri" / "LIDC-IDRI-0001-reads-069.xml"
# LIDC-IDRI-0001 reference nodule (LPS mm) and the z (mm) that splits its lungs into the part
# used for training negatives (z >= cut) and the part used for whole-scan validation (z < cut).
LIDC_0001_NODULE_MM = (56.17, 86.20, -115.86)
LIDC_0001_Z_CUT_MM = -180.0


# ----------------------------------------------------------------------------- images
def read_image(path: str | Path) -> sitk.Image:
    """Read a DICOM series folder (the series with most files) or a volume file SimpleITK
    reads (.mha, .mhd, .nii.gz, .nrrd). Raises ``ValueError`` naming the path otherwise."""
    path = Path(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        ids = reader.GetGDCMSeriesIDs(str(path))
        if not ids:
            raise ValueError(f"no DICOM series found in folder {str(path)!r}")
        files = max((reader.GetGDCMSeriesFileNames(str(path), i) for i in ids), key=len)
        reader.SetFileNames(files)
        return reader.Execute()
    if not path.exists():
        raise ValueError(f"input {str(path)!r} does not exist")
    return sitk.ReadImage(str(path))


def far_from(shape, centres_vox, radius: float) -> np.ndarray:
    """Bool mask of ``shape``: True farther than ``radius`` voxels from every centre (z, y, x)
    (where training and evaluation may paste a nodule: away from the real ones)."""
    keep = np.ones(shape, bool)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for c in centres_vox:
        keep &= (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 > radius**2
    return keep


def resample_to_iso(volume: np.ndarray, spacing: tuple[float, float, float], new_spacing: float = 1.0) -> np.ndarray:
    """Linear resampling of a (Z, Y, X) array with ``spacing`` (sz, sy, sx) mm onto an isotropic
    ``new_spacing`` grid with the same voxel-[0,0,0] position and axes. Output voxel ``j``
    lies at input voxel ``j * new_spacing / spacing``. Returns int16 HU (Z', Y', X')."""
    sp = np.asarray(spacing, float)
    if np.allclose(sp, new_spacing):
        return np.asarray(volume).astype(np.int16, copy=False)
    img = sitk.GetImageFromArray(np.asarray(volume, np.float32 if volume.dtype.kind == "f" else np.int16))
    img.SetSpacing(tuple(float(s) for s in sp[::-1]))
    size = [max(1, int(np.floor((n - 1) * s / new_spacing + 1e-6)) + 1) for n, s in zip(img.GetSize(), img.GetSpacing())]
    f = sitk.ResampleImageFilter()
    f.SetOutputSpacing((new_spacing,) * 3)
    f.SetSize(size)
    f.SetInterpolator(sitk.sitkLinear)
    f.SetDefaultPixelValue(-1024)
    f.SetOutputPixelType(sitk.sitkInt16)
    return sitk.GetArrayFromImage(f.Execute(img))


def voxel_to_world(index_zyx, origin_xyz, spacing_zyx, direction=None) -> np.ndarray:
    """LPS mm (x, y, z) of continuous voxel index (z, y, x) (SimpleITK convention)."""
    d = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    ijk = np.asarray(index_zyx, float)[::-1] * np.asarray(spacing_zyx, float)[::-1]
    return np.asarray(origin_xyz, float) + d @ ijk


def world_to_voxel(point_xyz, origin_xyz, spacing_zyx, direction=None) -> np.ndarray:
    """Continuous voxel index (z, y, x) of LPS point (x, y, z); inverse of :func:`voxel_to_world`."""
    d = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    ijk = np.linalg.solve(d, np.asarray(point_xyz, float) - np.asarray(origin_xyz, float))
    return (ijk / np.asarray(spacing_zyx, float)[::-1])[::-1]


# ----------------------------------------------------------------------------- LUNA16 cubes
@dataclass
class Cube:
    """One 40 mm, 1 mm isotropic LUNA16 nodule cube (labels.csv row).

    image: (40, 40, 40) int16 HU; mask: (40, 40, 40) bool; center: nodule centre (z, y, x)
    voxel index in the cube; diameter_mm: LUNA16 diameter; ratings: reader malignancy 1-5;
    median: their median (NaN when unrated); is_malignant: >= 2 readers rated >= 4.
    """

    name: str
    seriesuid: str
    image: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    center: tuple[float, float, float]
    diameter_mm: float
    ratings: list[int]
    median: float
    is_malignant: bool
    matched: bool = True  # False: no LUNA16 reference matched; diameter from the mask

    @property
    def median_label(self) -> float:
        """Literature label: 1 if median > 3, 0 if median < 3, NaN otherwise (3 or unrated)."""
        if not np.isfinite(self.median) or self.median == 3:
            return float("nan")
        return float(self.median > 3)

    @property
    def soft_target(self) -> float:
        """Training target for the malignancy head: 1 / 0 by the median rule, 0.5 at median 3,
        NaN when unrated."""
        if not np.isfinite(self.median):
            return float("nan")
        return 0.5 if self.median == 3 else float(self.median > 3)


def load_cubes(root: str | Path = LUNA_CUBES, limit: int | None = None) -> list[Cube]:
    """Load the cubes listed in ``root/labels.csv`` (optionally the first ``limit``)."""
    root = Path(root)
    out = []
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows[:limit]:
        img = sitk.ReadImage(str(root / "patches" / row["image"]))
        msk = sitk.ReadImage(str(root / "patches" / row["mask"]))
        centre_xyz = [float(row[f"patch_center_{a}"]) for a in "xyz"]
        center = world_to_voxel(centre_xyz, img.GetOrigin(), img.GetSpacing()[::-1], img.GetDirection())
        if np.any(center < 0) or np.any(center > np.asarray(img.GetSize()) - 1):
            # a few cubes carry an origin inconsistent with labels.csv; the cube is centred on
            # the nodule by construction
            center = np.asarray(img.GetSize()[::-1], float) // 2
        ratings = ast.literal_eval(row["malignancy_ratings"]) if row["malignancy_ratings"] else []
        med = float(row["malignancy_median"]) if row["malignancy_median"] not in ("", "nan") else float("nan")
        out.append(
            Cube(
                name=row["image"],
                seriesuid=row["seriesuid"],
                image=sitk.GetArrayFromImage(img).astype(np.int16),
                mask=sitk.GetArrayFromImage(msk) > 0,
                center=tuple(float(c) for c in center),
                diameter_mm=float(row["luna_diameter_mm"]) if row["luna_diameter_mm"] else equivalent_diameter(sitk.GetArrayFromImage(msk) > 0),
                ratings=list(ratings),
                median=med,
                is_malignant=row["is_malignant"].strip().lower() == "true",
                matched=bool(row["luna_diameter_mm"]),
            )
        )
    return out


def equivalent_diameter(mask: np.ndarray, voxel_volume_mm3: float = 1.0) -> float:
    """Diameter (mm) of the sphere with the mask's volume."""
    return float((6.0 * mask.sum() * voxel_volume_mm3 / np.pi) ** (1.0 / 3.0))


def split_cubes(cubes: list[Cube], val_fraction: float = 0.2) -> tuple[set[str], list[Cube], list[Cube]]:
    """(validation series, training cubes, validation cubes) by :func:`split_by_series`."""
    val = split_by_series([c.seriesuid for c in cubes], val_fraction)
    return val, [c for c in cubes if c.seriesuid not in val], [c for c in cubes if c.seriesuid in val]


def split_by_series(seriesuids: list[str], val_fraction: float = 0.2, salt: str = "res-mtnet") -> set[str]:
    """The validation series: a deterministic hash split (the same series always lands on the
    same side, whatever the order or subset of the list)."""
    val = set()
    for uid in set(seriesuids):
        h = int(hashlib.sha256((salt + uid).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        if h < val_fraction:
            val.add(uid)
    return val


# ----------------------------------------------------------------------------- LUNA16 scans
@dataclass
class Annotation:
    """A reference nodule: centre (x, y, z) LPS mm, diameter mm, optional malignancy ratings."""

    center_mm: tuple[float, float, float]
    diameter_mm: float
    ratings: list[int] = field(default_factory=list)
    n_readers: int = 4


def read_luna16_annotations(csv_path: str | Path) -> dict[str, list[Annotation]]:
    """``annotations.csv`` (seriesuid, coordX, coordY, coordZ, diameter_mm) -> per series.
    Also reads ``candidates.csv`` (seriesuid, coordX, coordY, coordZ, class): rows of class 1
    become annotations with diameter NaN, class 0 rows are skipped."""
    out: dict[str, list[Annotation]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if "class" in row and "diameter_mm" not in row:
                if int(row["class"]) != 1:
                    continue
                d = float("nan")
            else:
                d = float(row["diameter_mm"])
            c = (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
            out.setdefault(row["seriesuid"], []).append(Annotation(c, d))
    return out


def read_luna16_scan(folder: str | Path, seriesuid: str) -> sitk.Image:
    """The LUNA16 scan ``<folder>/<seriesuid>.mhd`` (searching sub-folders such as subset0)."""
    folder = Path(folder)
    hits = list(folder.glob(f"{seriesuid}.mhd")) or list(folder.glob(f"**/{seriesuid}.mhd"))
    if not hits:
        raise ValueError(f"no {seriesuid}.mhd under {str(folder)!r}")
    return sitk.ReadImage(str(hits[0]))


# ----------------------------------------------------------------------------- LIDC XML
@dataclass
class LidcRead:
    """One reader's nodule (>= 3 mm, with characteristics) from an LIDC XML file."""

    reader: int
    malignancy: int | None
    points_mm: np.ndarray = field(repr=False)  # (N, 3) LPS mm of included contour points

    @property
    def center_mm(self) -> np.ndarray:
        return self.points_mm.mean(0)


def read_lidc_xml(xml_path: str | Path, origin_xyz, spacing_zyx, direction=None) -> list[Annotation]:
    """Nodules from an LIDC-IDRI reader XML file, grouped across readers.

    Contour pixel (xCoord, yCoord) on slice ``imageZposition`` is mapped to LPS mm with the
    series geometry (``origin_xyz``, ``spacing_zyx``, ``direction``: SimpleITK convention of
    the series image). Readers' nodules closer than 10 mm or half the larger extent are merged.
    Nodules under 3 mm (single-point ROIs without characteristics) are skipped. Returns
    annotations with centre = mean of the readers' contour centres, diameter = mean of the
    readers' largest in-plane extents, the readers' malignancy ratings and their count.
    """
    ns = {"n": "http://www.nih.gov"}
    root = ET.parse(xml_path).getroot()
    sessions = root.findall("n:readingSession", ns) or root.findall("readingSession")
    tag = (lambda t: f"n:{t}") if root.tag.startswith("{") else (lambda t: t)
    reads: list[tuple[int, LidcRead, float]] = []
    d = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    for r, sess in enumerate(sessions):
        for nod in sess.findall(tag("unblindedReadNodule"), ns):
            ch = nod.find(tag("characteristics"), ns)
            if ch is None or ch.find(tag("malignancy"), ns) is None:
                continue
            mal = int(ch.find(tag("malignancy"), ns).text)
            pts = []
            for roi in nod.findall(tag("roi"), ns):
                inc = roi.find(tag("inclusion"), ns)
                if inc is not None and inc.text.strip().upper() != "TRUE":
                    continue
                z = float(roi.find(tag("imageZposition"), ns).text)
                for e in roi.findall(tag("edgeMap"), ns):
                    x = int(e.find(tag("xCoord"), ns).text)
                    y = int(e.find(tag("yCoord"), ns).text)
                    p = np.asarray(origin_xyz, float) + d @ np.array([x * spacing_zyx[2], y * spacing_zyx[1], 0.0])
                    p[2] = z
                    pts.append(p)
            if not pts:
                continue
            pts_a = np.asarray(pts)
            ext = float(max(np.ptp(pts_a[:, 0]), np.ptp(pts_a[:, 1])))
            reads.append((r, LidcRead(r, mal, pts_a), ext))
    groups: list[list[tuple[int, LidcRead, float]]] = []
    for item in reads:
        c = item[1].center_mm
        for g in groups:
            gc = np.mean([x[1].center_mm for x in g], 0)
            lim = max(10.0, 0.5 * max(item[2], max(x[2] for x in g)))
            if np.linalg.norm(c - gc) < lim and item[0] not in {x[0] for x in g}:
                g.append(item)
                break
        else:
            groups.append([item])
    out = []
    for g in groups:
        centre = np.mean([x[1].center_mm for x in g], 0)
        out.append(Annotation(tuple(float(v) for v in centre), float(np.mean([x[2] for x in g])), [x[1].malignancy for x in g], len(g)))
    return out


def read_lidc_excluded(xml_path: str | Path, origin_xyz, spacing_zyx, direction=None) -> list[tuple[tuple[float, float, float], float]]:
    """Reader marks that the LUNA16 protocol counts neither way: nodules < 3 mm (single-point
    ROIs without characteristics) and non-nodules (``locus``), as (LPS mm centre, radius mm);
    the radius is 5 mm (these marks have no size)."""
    ns = {"n": "http://www.nih.gov"}
    root = ET.parse(xml_path).getroot()
    tag = (lambda t: f"n:{t}") if root.tag.startswith("{") else (lambda t: t)
    d = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)

    def to_mm(x, y, z):
        p = np.asarray(origin_xyz, float) + d @ np.array([x * spacing_zyx[2], y * spacing_zyx[1], 0.0])
        p[2] = z
        return tuple(float(v) for v in p)

    out = []
    for sess in root.iter(f"{{{ns['n']}}}readingSession" if root.tag.startswith("{") else "readingSession"):
        for nod in sess.findall(tag("unblindedReadNodule"), ns):
            ch = nod.find(tag("characteristics"), ns)
            if ch is not None and ch.find(tag("malignancy"), ns) is not None:
                continue
            for roi in nod.findall(tag("roi"), ns):
                z = float(roi.find(tag("imageZposition"), ns).text)
                for e in roi.findall(tag("edgeMap"), ns):
                    out.append((to_mm(int(e.find(tag("xCoord"), ns).text), int(e.find(tag("yCoord"), ns).text), z), 5.0))
                    break
        for non in sess.findall(tag("nonNodule"), ns):
            z = float(non.find(tag("imageZposition"), ns).text)
            loc = non.find(tag("locus"), ns)
            out.append((to_mm(int(loc.find(tag("xCoord"), ns).text), int(loc.find(tag("yCoord"), ns).text), z), 5.0))
    return out


# ----------------------------------------------------------------------------- pasting
def paste_nodule(background: np.ndarray, cube_image: np.ndarray, cube_mask: np.ndarray, at: tuple[int, int, int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Paste the nodule of a 1 mm cube into a 1 mm ``background`` (modified in place).

    The cube is placed with its centre voxel at ``at`` (z, y, x) of the background; inside the
    nodule mask (dilated 1 voxel, feathered by a 1 mm Gaussian) the result is
    ``max(background, cube)`` blended, so denser background (vessels) is kept. Returns the
    background and the slices in it that received the cube (for placing the mask).
    """
    cs = np.asarray(cube_image.shape)
    start = np.asarray(at) - cs // 2
    lo = np.maximum(start, 0)
    hi = np.minimum(start + cs, background.shape)
    src = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
    dst = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    w = ndi.gaussian_filter(ndi.binary_dilation(cube_mask, iterations=1).astype(np.float32), 1.0)[src]
    w = np.clip(w * 1.5, 0, 1)
    bg = background[dst].astype(np.float32)
    fg = np.maximum(cube_image[src].astype(np.float32), bg)
    background[dst] = np.round(w * fg + (1 - w) * bg).astype(background.dtype)
    return background, dst


def lidc_0001_iso() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """LIDC-IDRI-0001 resampled to 1 mm: (hu (Z, Y, X) int16, lung region bool, origin LPS mm).
    Raises FileNotFoundError when the shared data is absent."""
    from model.lungs import lung_region

    if not LIDC_0001.is_dir():
        raise FileNotFoundError(f"LIDC-IDRI-0001 not found at {LIDC_0001}")
    img = read_image(LIDC_0001)
    hu = resample_to_iso(sitk.GetArrayFromImage(img), img.GetSpacing()[::-1])
    return hu, lung_region(hu), img.GetOrigin()



