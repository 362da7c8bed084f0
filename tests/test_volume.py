"""dicom_node.volume: series eligibility from headers, and series -> HU volume with LPS geometry.

Synthetic series (tests/results/synthetic_ct.py) store at each voxel a value computed from the
voxel's own patient position, so comparing the loaded array with that function checks the
whole geometry (slice order, orientation, spacing, origin) at once. Real data: LIDC-IDRI-0001
and small public samples from ../shared/data, skipped when absent.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom import config as pydicom_config

from dicom_node.volume import (
    NOT_ELIGIBLE_ENHANCED_CT,
    NOT_ELIGIBLE_RADIOGRAPH,
    Volume,
    VolumeError,
    load_series,
    series_problem,
)

_spec = importlib.util.spec_from_file_location(
    "synthetic_ct", Path(__file__).parent / "results" / "synthetic_ct.py"
)
synthetic_ct = sys.modules.setdefault("synthetic_ct", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(synthetic_ct)
SeriesSpec = synthetic_ct.SeriesSpec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LIDC_SERIES = DATA / "lidc-idri" / "LIDC-IDRI-0001"
SAMPLES = DATA / "dicom-samples"


@pytest.fixture(autouse=True)
def _strict(strict_pydicom):
    """Every test here runs pydicom in strict mode (``tests/conftest.py: strict_pydicom``)."""
    yield


def _check_geometry(volume: Volume, spec: SeriesSpec) -> None:
    """Every voxel holds the value of the patient position that voxel_to_lps gives it."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in volume.array.shape), indexing="ij")
    zyx = np.stack([z, y, x], axis=-1).reshape(-1, 3)
    points = volume.voxel_to_lps(zyx)
    expected = synthetic_ct.expected_hu(spec, points).reshape(volume.array.shape)
    np.testing.assert_array_equal(volume.array, expected.astype(np.float32))
    np.testing.assert_allclose(volume.lps_to_voxel(points), zyx, atol=1e-6)


def test_shuffled_axial_series_maps_voxels_to_patient_positions(tmp_path):
    spec = SeriesSpec()
    paths = synthetic_ct.write_series(tmp_path, spec)
    assert series_problem(synthetic_ct.headers(paths)) is None

    volume = load_series(paths)

    assert volume.array.dtype == np.float32
    assert volume.shape == (20, 24, 20)
    assert volume.spacing == pytest.approx((2.0, 0.8, 0.7))
    assert volume.origin == pytest.approx((-8.0, -10.0, -30.0))
    np.testing.assert_allclose(volume.direction, np.eye(3))
    # A known voxel: slice 5, row 3, column 2 -> x = -8 + 2 * 0.7, y = -10 + 3 * 0.8, z = -30 + 5 * 2.
    np.testing.assert_allclose(volume.voxel_to_lps((5, 3, 2)), (-6.6, -7.6, -20.0))
    np.testing.assert_allclose(volume.lps_to_voxel((-6.6, -7.6, -20.0)), (5, 3, 2), atol=1e-9)
    # HU round trip: stored = HU + 1024 with intercept -1024.
    assert volume.array[5, 3, 2] == synthetic_ct.hu_at(np.array([-6.6, -7.6, -20.0]))
    _check_geometry(volume, spec)
    # Headers in the same order as the slices, without pixel data.
    along = [float(ds.ImagePositionPatient[2]) for ds in volume.datasets]
    assert along == sorted(along)
    assert all("PixelData" not in ds for ds in volume.datasets)
    assert volume.series_instance_uid == spec.series_uid
    assert volume.study_instance_uid == spec.study_uid
    assert volume.frame_of_reference_uid == spec.frame_uid


COS30, SIN30 = math.cos(math.radians(30)), math.sin(math.radians(30))


@pytest.mark.parametrize(
    ("row", "column"),
    [
        ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),  # rotated 180 degrees in plane (normal +z)
        ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0)),  # transposed: normal -z, slices stored head first
        ((COS30, SIN30, 0.0), (-SIN30, COS30, 0.0)),  # oblique in plane
        ((1.0, 0.0, 0.0), (0.0, COS30, -SIN30)),  # tilted 30 degrees (not axial)
    ],
    ids=["rotated-180", "transposed", "oblique-in-plane", "tilted-30"],
)
def test_any_orientation_loads_with_the_same_geometry_as_simpleitk(tmp_path, row, column):
    spec = SeriesSpec(row_cosine=row, column_cosine=column, seed=7)
    paths = synthetic_ct.write_series(tmp_path, spec)

    volume = load_series(paths)

    _check_geometry(volume, spec)
    np.testing.assert_allclose(volume.direction[:, 0], row, atol=1e-6)
    np.testing.assert_allclose(volume.direction[:, 1], column, atol=1e-6)
    np.testing.assert_allclose(volume.direction[:, 2], np.cross(row, column), atol=1e-6)
    # Independent reader: SimpleITK/GDCM agrees on voxels, origin, spacing and direction.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).astype(np.float32), volume.array)
    ours = volume.to_sitk()
    np.testing.assert_allclose(ours.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ours.GetSpacing(), image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(ours.GetDirection(), image.GetDirection(), atol=1e-4)
    index_xyz = (3, 5, 7)
    np.testing.assert_allclose(
        volume.voxel_to_lps(index_xyz[::-1]),
        image.TransformIndexToPhysicalPoint(index_xyz),
        atol=1e-4,
    )


def test_tilted_series_loads_but_is_not_eligible(tmp_path):
    spec = SeriesSpec(row_cosine=(1.0, 0.0, 0.0), column_cosine=(0.0, COS30, -SIN30))
    problem = series_problem(synthetic_ct.headers(synthetic_ct.write_series(tmp_path, spec)))
    assert problem is not None and problem.startswith("not axial: slice normal 30.0 degrees")


def test_compressed_series_is_decoded(tmp_path):
    spec = SeriesSpec(n_slices=4)
    paths = synthetic_ct.write_series(tmp_path, spec, compress=pydicom.uid.RLELossless)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless

    _check_geometry(load_series(paths), spec)


def test_folder_stands_for_its_files(tmp_path):
    spec = SeriesSpec(n_slices=3)
    synthetic_ct.write_series(tmp_path, spec)
    assert load_series([tmp_path]).shape == (3, 24, 20)


def test_missing_slice_is_named_with_its_position(tmp_path):
    spec = SeriesSpec(drop=[7])  # z = -30 + 2 k: slice 7 at z = -16 is missing
    paths = synthetic_ct.write_series(tmp_path, spec)
    message = "missing slice: gap of 4.00 mm between z=-18.00 and z=-14.00 (expected 2.00 mm)"

    assert series_problem(synthetic_ct.headers(paths)) == message
    with pytest.raises(VolumeError, match=r"^missing slice: gap of 4\.00 mm between z=-18\.00"):
        load_series(paths)


def test_mixed_spacing_is_not_uniform(tmp_path):
    along = [2.0 * k for k in range(10)] + [18.0 + 3.0 * k for k in range(1, 11)]
    spec = SeriesSpec(positions_along_normal=along)
    paths = synthetic_ct.write_series(tmp_path, spec)

    problem = series_problem(synthetic_ct.headers(paths))

    # Half the steps are 2 mm, half 3 mm: the median (3 mm) is taken as nominal.
    assert problem == (
        "non-uniform slice spacing: 2.00 mm between z=-30.00 and z=-28.00 (expected 3.00 mm)"
    )
    with pytest.raises(VolumeError, match="non-uniform slice spacing"):
        load_series(paths)


def test_duplicate_position(tmp_path):
    along = [2.0 * k for k in range(18)] + [10.0]
    paths = synthetic_ct.write_series(tmp_path, SeriesSpec(positions_along_normal=along))

    problem = series_problem(synthetic_ct.headers(paths))

    assert problem is not None and problem.startswith(
        "duplicate slice position: 2 instances at z=-20.00 mm"
    )


def test_gantry_tilt_shear_is_refused(tmp_path):
    spec = SeriesSpec(in_plane_shift_per_slice=(0.0, 0.5, 0.0))
    paths = synthetic_ct.write_series(tmp_path, spec)
    with pytest.raises(VolumeError, match="not stacked along the slice normal"):
        load_series(paths)


def test_inconsistent_headers(tmp_path):
    paths = synthetic_ct.write_series(tmp_path, SeriesSpec())
    headers = synthetic_ct.headers(paths)
    headers[3].PixelSpacing = [0.9, 0.7]
    assert series_problem(headers).startswith("inconsistent PixelSpacing: [0.9, 0.7] mm")
    headers = synthetic_ct.headers(paths)
    headers[4].ImageOrientationPatient = [0, 1, 0, 1, 0, 0]
    assert series_problem(headers).startswith("inconsistent ImageOrientationPatient")
    headers = synthetic_ct.headers(paths)
    headers[5].Rows = 30
    assert series_problem(headers).startswith("inconsistent image size: 30x20")
    headers = synthetic_ct.headers(paths)
    del headers[6].ImagePositionPatient
    assert series_problem(headers).startswith("missing ImagePositionPatient in instance")


@pytest.mark.parametrize(
    ("spec_kwargs", "kwargs", "expected"),
    [
        ({"n_slices": 10}, {}, "too few slices: 10 (at least 16 needed)"),
        ({"n_slices": 10}, {"min_slices": 8}, None),
        ({"slice_spacing": 5.0}, {}, "slice spacing too large: 5.00 mm (at most 3 mm)"),
        (
            {"slice_spacing": 5.0},
            {"max_slice_spacing_mm": 6.0, "max_slice_thickness_mm": 6.0},
            None,
        ),
        ({"slice_thickness": 5.0}, {}, "slice thickness too large: 5.00 mm (at most 3 mm)"),
        ({"modality": "MR"}, {}, "not a CT series: Modality MR"),
        (
            {"modality": "CR", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1"},
            {},
            NOT_ELIGIBLE_RADIOGRAPH,
        ),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2.1"}, {}, NOT_ELIGIBLE_ENHANCED_CT),
    ],
    ids=["few", "few-allowed", "thick", "thick-allowed", "thickness", "mr", "cr", "enhanced"],
)
def test_eligibility_rules(tmp_path, spec_kwargs, kwargs, expected):
    paths = synthetic_ct.write_series(tmp_path, SeriesSpec(**spec_kwargs))
    assert series_problem(synthetic_ct.headers(paths), **kwargs) == expected


def test_single_slice(tmp_path):
    paths = synthetic_ct.write_series(tmp_path, SeriesSpec(n_slices=1, slice_thickness=1.25))
    assert series_problem(synthetic_ct.headers(paths)) == "too few slices: 1 (at least 16 needed)"
    assert series_problem(synthetic_ct.headers(paths), min_slices=1) is None
    volume = load_series(paths)
    assert volume.shape == (1, 24, 20)
    assert volume.spacing == pytest.approx((1.25, 0.8, 0.7))  # SliceThickness stands in


def test_empty_and_mixed_series(tmp_path):
    assert series_problem([]) == "empty series: no instances"
    a = synthetic_ct.write_series(tmp_path / "a", SeriesSpec(n_slices=10))
    b = synthetic_ct.write_series(tmp_path / "b", SeriesSpec(n_slices=10))
    assert series_problem(synthetic_ct.headers(a + b)).startswith("instances of 2 series")
    with pytest.raises(VolumeError, match="instances of 2 series"):
        load_series(a + b)


def test_real_radiograph_and_enhanced_ct_are_not_eligible_yet():
    cr = SAMPLES / "pydicom-data" / "RG1_J2KR.dcm"
    enhanced = SAMPLES / "pydicom-data" / "eCT_Supplemental.dcm"
    if not cr.exists() or not enhanced.exists():
        pytest.skip(f"sample DICOM files absent under {SAMPLES}")
    assert series_problem([pydicom.dcmread(cr, stop_before_pixels=True)]) == NOT_ELIGIBLE_RADIOGRAPH
    with pytest.raises(VolumeError, match=r"chest radiographs \(CR/DX\)"):
        load_series([cr])
    with _lenient():  # the sample has values that strict reading refuses
        header = pydicom.dcmread(enhanced, stop_before_pixels=True)
    assert series_problem([header]) == NOT_ELIGIBLE_ENHANCED_CT


class _lenient:
    def __enter__(self):
        self.old = pydicom_config.settings.reading_validation_mode
        pydicom_config.settings.reading_validation_mode = pydicom_config.WARN

    def __exit__(self, *exc):
        pydicom_config.settings.reading_validation_mode = self.old


@pytest.fixture(scope="module")
def lidc_volume() -> Volume:
    if not LIDC_SERIES.is_dir():
        pytest.skip(f"LIDC-IDRI-0001 series absent: expected it in {LIDC_SERIES}")
    with _lenient():  # real-world headers: keep reading even where a value is non-conformant
        return load_series(sorted(LIDC_SERIES.glob("*.dcm")))


def test_lidc_series_is_eligible_and_loads_with_its_geometry(lidc_volume):
    with _lenient():
        headers = [
            pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(LIDC_SERIES.glob("*.dcm"))
        ]
    assert series_problem(headers) is None

    assert lidc_volume.shape == (133, 512, 512)
    assert lidc_volume.spacing == pytest.approx((2.5, 0.703125, 0.703125))
    assert lidc_volume.origin == pytest.approx((-166.0, -171.7, -340.0), abs=1e-3)
    nodule = lidc_volume.lps_to_voxel((56.2, 86.2, -115.9))
    assert lidc_volume.contains_voxel(nodule)
    np.testing.assert_allclose(nodule, (89.64, 366.79, 316.02), atol=0.01)
    np.testing.assert_allclose(lidc_volume.voxel_to_lps(nodule), (56.2, 86.2, -115.9), atol=1e-9)
    # The reference nodule is solid: soft tissue at its centre, aerated lung 20 mm anterior.
    z, y, x = np.round(nodule).astype(int)
    assert lidc_volume.array[z - 1 : z + 2, y - 2 : y + 3, x - 2 : x + 3].mean() > -100
    assert lidc_volume.array[z, y - 28, x] < -700


def test_real_jpeg2000_ct_slice_is_decoded():
    path = SAMPLES / "pydicom-data" / "explicit_VR-UN.dcm"
    if not path.exists():
        pytest.skip(f"sample DICOM file absent: {path}")
    with _lenient():  # most elements of this sample have VR UN
        reference = pydicom.dcmread(path)
        volume = load_series([path])
    assert reference.file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    assert volume.shape == (1, 512, 512)
    expected = reference.pixel_array * float(reference.RescaleSlope) + float(
        reference.RescaleIntercept
    )
    np.testing.assert_array_equal(volume.array[0], expected.astype(np.float32))
    assert volume.array.min() == -1024.0  # air outside the body, in HU
