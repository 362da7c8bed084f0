"""The Predictor with the shipped default weights: interface, geometry, a validation cube, the
real LIDC-IDRI-0001 reference nodule, and the ``predict`` command."""
import argparse
import json
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from model import data as D
from model.finding import Finding


def test_import_model_does_not_import_torch():
    import subprocess

    code = "import sys, model; from model import Finding; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _val_cubes(luna_cubes, n=6):
    """``n`` validation cubes spread over the diameter range (never seen in training)."""
    val = D.split_by_series([c.seriesuid for c in luna_cubes])
    cubes = sorted((c for c in luna_cubes if c.seriesuid in val and c.matched), key=lambda c: c.diameter_mm)
    return [cubes[int(i)] for i in np.linspace(0, len(cubes) - 1, n)]


def _every_16th_val_cube(luna_cubes):
    """A representative sample: every 16th validation cube in diameter order (12 cubes)."""
    val = D.split_by_series([c.seriesuid for c in luna_cubes])
    cubes = sorted((c for c in luna_cubes if c.seriesuid in val and c.matched), key=lambda c: c.diameter_mm)
    return cubes[8::16]


def _paste_mask(f, shape):
    m = np.zeros(shape, bool)
    o = f.mask_offset
    m[o[0]:o[0] + f.mask.shape[0], o[1]:o[1] + f.mask.shape[1], o[2]:o[2] + f.mask.shape[2]] = f.mask
    return m


def test_finds_validation_nodules_in_40mm_crops(predictor, luna_cubes):
    """Small crops work: at the default operating point most validation nodules (a
    representative 12) are found in their bare 40 mm cube, with real masks."""
    found = 0
    for cube in _every_16th_val_cube(luna_cubes):
        findings = predictor(cube.image, (1.0, 1.0, 1.0), origin=(10.0, 20.0, 30.0))
        assert all(isinstance(f, Finding) for f in findings)
        hits = [f for f in findings if np.linalg.norm(np.subtract(f.center_voxel, cube.center)) <= cube.diameter_mm / 2]
        if not hits:
            continue
        found += 1
        f = hits[0]
        # LPS: identity direction, 1 mm -> origin + (x, y, z) index
        np.testing.assert_allclose(f.center_mm, np.add((10.0, 20.0, 30.0), f.center_voxel[::-1]), atol=1e-6)
        assert 0 <= f.malignancy <= 1 and 0 <= f.score <= 1
        m = _paste_mask(f, cube.mask.shape)
        assert 2 * (m & cube.mask).sum() / (m.sum() + cube.mask.sum()) > 0.4  # a real nodule mask
        assert abs(f.volume_mm3 - m.sum()) < 1e-6
    assert found >= 9  # measured: 163 of all 194 validation cubes (0.84, MODEL_CARD.md)


def test_geometry_follows_spacing_and_direction(luna_cubes):
    """A nodule given on a 2x-coarser z grid with a flipped x axis: voxel and LPS centres
    follow the stated geometry, and the mask lies on the input grid."""
    from model.inference import Predictor

    low = Predictor(threshold=0.1)
    cube = _val_cubes(luna_cubes)[3]
    img = sitk.GetImageFromArray(cube.image)
    ref = sitk.ResampleImageFilter()
    ref.SetOutputSpacing((1.0, 1.0, 2.0))
    ref.SetSize((40, 40, 20))
    ref.SetInterpolator(sitk.sitkLinear)
    arr = sitk.GetArrayFromImage(ref.Execute(img))
    direction = np.diag([-1.0, 1.0, 1.0])
    fs = low(arr, (2.0, 1.0, 1.0), origin=(100.0, -50.0, 7.0), direction=direction)
    expected_vox = np.divide(cube.center, (2.0, 1.0, 1.0))
    f = min(fs, key=lambda f: np.linalg.norm((np.asarray(f.center_voxel) - expected_vox) * (2, 1, 1)))
    assert np.linalg.norm((np.asarray(f.center_voxel) - expected_vox) * (2, 1, 1)) <= cube.diameter_mm / 2
    z, y, x = f.center_voxel
    np.testing.assert_allclose(f.center_mm, (100.0 - x * 1.0, -50.0 + y * 1.0, 7.0 + z * 2.0), atol=1e-6)
    assert f.mask_offset[0] + f.mask.shape[0] <= 20
    # the mask, on the coarse grid, covers the reference mask's voxels there
    coarse_ref = cube.mask[::2]
    m = _paste_mask(f, coarse_ref.shape)
    assert (m & coarse_ref).sum() / coarse_ref.sum() > 0.4


def test_rejects_bad_input(predictor):
    with pytest.raises(ValueError, match="3-D"):
        predictor(np.zeros((4, 4)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        predictor(np.zeros((8, 8, 8)), (1, 0, 1))


def test_lidc_0001_reference_nodule_end_to_end(predictor, lidc_dir):
    img = D.read_image(lidc_dir)
    findings = predictor.predict_image(img)
    ref = np.asarray(D.LIDC_0001_NODULE_MM)
    hits = [f for f in findings if np.linalg.norm(np.subtract(f.center_mm, ref)) <= 33.0 / 2]
    assert hits, f"reference nodule not found; findings: {[f.to_json() for f in findings]}"
    assert hits[0].malignancy > 0.5
    assert hits[0].mask is not None and hits[0].mask.sum() * np.prod(img.GetSpacing()) > 1000  # a ~25 mm nodule
    # speed and memory are measured by benchmarks/bench_predict.py, not asserted here


def _cli(argv):
    from dicom_node.commands import predict

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    predict.register(sub)
    args = parser.parse_args(["predict", *argv])
    return args.func(args)


def test_predict_command_json_and_masks(predictor, luna_cubes, tmp_path, capsys):
    cube = _val_cubes(luna_cubes)[3]
    img = sitk.GetImageFromArray(cube.image)
    img.SetOrigin((-12.5, 30.0, -200.0))
    path = tmp_path / "nodule crop.nii.gz"
    sitk.WriteImage(img, str(path))
    rc = _cli([str(path), str(tmp_path / "missing.mha"), "--json", "--masks", str(tmp_path / "masks"), "--threshold", "0.1",
               "--threads", "1"])
    import torch

    assert torch.get_num_threads() == 1  # --threads applied
    torch.set_num_threads(2)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 1  # one input could not be read
    ok, bad = lines
    assert ok["input"] == str(path) and ok["findings"] and ok["seconds"] >= 0 and ok["cpu_seconds"] >= 0
    assert set(ok["findings"][0]) == {"center_mm", "diameter_mm", "volume_mm3", "malignancy", "score"}
    assert "error" in bad and bad["input"].endswith("missing.mha")
    mask = sitk.ReadImage(str(tmp_path / "masks" / "nodule_crop_mask.nii.gz"))
    assert mask.GetSize() == img.GetSize() and mask.GetOrigin() == img.GetOrigin()
    assert sitk.GetArrayFromImage(mask)[tuple(np.round(cube.center).astype(int))] == 1
    # a threshold above every score gives no findings
    _cli([str(path), "--json", "--threshold", "1.01", "--threads", "2"])
    assert json.loads(capsys.readouterr().out)["findings"] == []
