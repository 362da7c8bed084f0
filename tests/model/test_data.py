"""Loaders on small files written here in the exact published formats (LUNA16 .mhd/.raw +
annotations.csv / candidates.csv, LIDC-IDRI reader XML), the series split, pasting, and the
real LUNA16 cubes when the shared data is present."""
import numpy as np
import SimpleITK as sitk

from model import data as D

SERIES = "1.3.6.1.4.1.14519.5.2.1.6279.6001.105756658031515062000744821260"


def test_luna16_mhd_and_annotations(tmp_path):
    arr = np.full((20, 30, 40), -900, np.int16)
    arr[12, 9, 31] = 100
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-150.0, -170.0, -320.0))
    (tmp_path / "subset3").mkdir()
    sitk.WriteImage(img, str(tmp_path / "subset3" / f"{SERIES}.mhd"))  # writes .mhd + .raw
    x, y, z = -150 + 31 * 0.7, -170 + 9 * 0.8, -320 + 12 * 2.5
    (tmp_path / "annotations.csv").write_text(f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{SERIES},{x},{y},{z},5.4\n")
    (tmp_path / "candidates.csv").write_text(f"seriesuid,coordX,coordY,coordZ,class\n{SERIES},{x},{y},{z},1\n{SERIES},0,0,0,0\n")
    ann = D.read_luna16_annotations(tmp_path / "annotations.csv")
    cand = D.read_luna16_annotations(tmp_path / "candidates.csv")
    assert list(ann) == [SERIES] and ann[SERIES][0].diameter_mm == 5.4
    assert len(cand[SERIES]) == 1 and np.isnan(cand[SERIES][0].diameter_mm)
    scan = D.read_luna16_scan(tmp_path, SERIES)
    v = D.world_to_voxel(ann[SERIES][0].center_mm, scan.GetOrigin(), scan.GetSpacing()[::-1], scan.GetDirection())
    np.testing.assert_allclose(v, [12, 9, 31], atol=1e-6)
    assert sitk.GetArrayFromImage(scan)[tuple(np.round(v).astype(int))] == 100


def _roi(z, sop, pts):
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in pts)
    return f"<roi><imageZposition>{z}</imageZposition><imageSOP_UID>{sop}</imageSOP_UID><inclusion>TRUE</inclusion>{edges}</roi>"


def _nodule(nid, mal, rois):
    ch = ("<characteristics><subtlety>5</subtlety><internalStructure>1</internalStructure><calcification>6</calcification>"
          f"<sphericity>3</sphericity><margin>3</margin><lobulation>3</lobulation><spiculation>4</spiculation>"
          f"<texture>5</texture><malignancy>{mal}</malignancy></characteristics>")
    return f"<unblindedReadNodule><noduleID>{nid}</noduleID>{ch}{''.join(rois)}</unblindedReadNodule>"


def test_lidc_xml_groups_readers(tmp_path):
    square = lambda cx, cy, r: [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    r1 = _nodule("Nodule 001", 5, [_roi(-125.0, "1.2.3", square(300, 350, 10)), _roi(-122.5, "1.2.4", square(300, 350, 12))])
    r1_small = ("<unblindedReadNodule><noduleID>Nodule 002</noduleID>"
                + _roi(-200.0, "1.2.5", [(100, 100)]) + "</unblindedReadNodule>")  # < 3 mm: no characteristics
    r2 = _nodule("IL057_1", 4, [_roi(-125.0, "1.2.3", square(302, 351, 11))])
    r2_other = _nodule("IL057_2", 2, [_roi(-50.0, "1.2.9", square(100, 200, 4))])
    non = "<nonNodule><nonNoduleID>x</nonNoduleID><imageZposition>-80</imageZposition><locus><xCoord>1</xCoord><yCoord>2</yCoord></locus></nonNodule>"
    xml = ('<?xml version="1.0" encoding="UTF-8"?>\n<LidcReadMessage uid="1" xmlns="http://www.nih.gov" '
           'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><ResponseHeader><Version>1.8.1</Version>'
           f"<SeriesInstanceUid>{SERIES}</SeriesInstanceUid></ResponseHeader>"
           f"<readingSession><annotationVersion>3.12</annotationVersion><servicingRadiologistID>1</servicingRadiologistID>{r1}{r1_small}{non}</readingSession>"
           f"<readingSession><annotationVersion>3.12</annotationVersion><servicingRadiologistID>2</servicingRadiologistID>{r2}{r2_other}</readingSession>"
           "</LidcReadMessage>")
    path = tmp_path / "069.xml"
    path.write_text(xml)
    nods = D.read_lidc_xml(path, origin_xyz=(-166.0, -171.7, -340.0), spacing_zyx=(2.5, 0.703125, 0.703125))
    nods = sorted(nods, key=lambda n: -n.n_readers)
    assert [n.n_readers for n in nods] == [2, 1]
    big = nods[0]
    assert sorted(big.ratings) == [4, 5]
    # centre: mean of reader centres; x = -166 + 300.x * 0.703125
    assert abs(big.center_mm[0] - (-166 + ((300 + 302) / 2) * 0.703125)) < 0.1
    assert abs(big.center_mm[2] - ((-123.75 + -125.0) / 2)) < 1e-6
    assert nods[1].ratings == [2]


def test_split_by_series_is_deterministic_and_disjoint():
    uids = [f"1.2.{i}" for i in range(500)]
    val = D.split_by_series(uids, 0.2)
    assert val == D.split_by_series(list(reversed(uids)), 0.2)
    assert 60 < len(val) < 140
    assert D.split_by_series(uids[:100], 0.2) == {u for u in val if u in uids[:100]}


def test_paste_nodule_keeps_denser_background():
    bg = np.full((30, 30, 30), -850, np.int16)
    bg[:, 15, :] = 80  # a vessel-like plane denser than the nodule
    cube = np.full((10, 10, 10), -850, np.int16)
    mask = np.zeros((10, 10, 10), bool)
    mask[3:7, 3:7, 3:7] = True
    cube[mask] = 20
    D.paste_nodule(bg, cube, mask, (15, 10, 15))
    assert bg[15, 10, 15] > 0  # nodule inside
    assert bg[15, 15, 15] == 80  # the denser structure is kept
    assert bg[2, 2, 2] == -850  # far away untouched


def test_real_luna_cubes(luna_cubes):
    assert len(luna_cubes) == 906
    c = luna_cubes[0]
    assert c.image.shape == c.mask.shape == (40, 40, 40)
    assert c.mask[tuple(np.round(c.center).astype(int))]  # the centre is inside the nodule mask
    labelled = [c for c in luna_cubes if np.isfinite(c.median_label)]
    assert 400 < len(labelled) < 906


def test_lidc_xml_excluded_marks(tmp_path):
    small = ("<unblindedReadNodule><noduleID>Nodule 002</noduleID>"
             + _roi(-150.0, "1.2.5", [(187, 166)]) + "</unblindedReadNodule>")
    non = ("<nonNodule><nonNoduleID>_Non-nodule 001</nonNoduleID><imageZposition>-185.000000 </imageZposition>"
           "<imageSOP_UID>1.2.6</imageSOP_UID><locus><xCoord>396</xCoord><yCoord>216</yCoord></locus></nonNodule>")
    big = _nodule("Nodule 001", 5, [_roi(-125.0, "1.2.3", [(300, 350), (310, 350), (310, 360)])])
    xml = ('<?xml version="1.0" encoding="UTF-8"?>\n<LidcReadMessage uid="1" xmlns="http://www.nih.gov">'
           f"<readingSession><servicingRadiologistID>1</servicingRadiologistID>{big}{small}{non}</readingSession></LidcReadMessage>")
    (tmp_path / "r.xml").write_text(xml)
    ex = D.read_lidc_excluded(tmp_path / "r.xml", (-166.0, -171.7, -340.0), (2.5, 0.703125, 0.703125))
    centres = sorted(c for c, _ in ex)
    expected = sorted([(-166 + 187 * 0.703125, -171.7 + 166 * 0.703125, -150.0), (-166 + 396 * 0.703125, -171.7 + 216 * 0.703125, -185.0)])
    np.testing.assert_allclose(centres, expected, atol=1e-6)
