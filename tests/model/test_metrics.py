"""LUNA16 FROC / CPM, AUC, accuracy and Dice against hand-computed cases."""
import math

import numpy as np

from model.metrics import ScanResult, accuracy, dice, froc, match_scan, roc_auc, threshold_at_fp_rate


def test_match_scan_one_hit_per_nodule_and_exclusions():
    scan = ScanResult(
        cand_xyz=np.array([[0, 0, 0], [1, 0, 0], [50, 0, 0], [100, 0, 0], [0, 40, 0]], float),
        cand_score=np.array([0.9, 0.95, 0.3, 0.8, 0.7]),
        nod_xyz=np.array([[0, 0, 0], [0, 100, 0]], float), nod_radius=np.array([5.0, 5.0]),
        excl_xyz=np.array([[100, 0, 0]], float), excl_radius=np.array([3.0]),
    )
    best, fps = match_scan(scan)
    np.testing.assert_allclose(best, [0.95, -np.inf])  # two hits on nodule 0 count once, no FP
    np.testing.assert_allclose(sorted(fps), [0.3, 0.7])  # the excluded finding counts neither way


def test_froc_and_cpm_hand_computed():
    # 2 scans, 4 nodules. Scan A: hits at 0.9, 0.6; FPs at 0.8, 0.3. Scan B: hit at 0.7; FP at 0.5.
    a = ScanResult(np.array([[0, 0, 0], [0, 20, 0], [50, 50, 50], [60, 60, 60]], float), np.array([0.9, 0.6, 0.8, 0.3]),
                   np.array([[0, 0, 0], [0, 20, 0]], float), np.array([3.0, 3.0]))
    b = ScanResult(np.array([[0, 0, 0], [70, 70, 70]], float), np.array([0.7, 0.5]),
                   np.array([[0, 0, 0], [30, 30, 30]], float), np.array([3.0, 3.0]))
    f = froc([a, b])
    # thresholds 0.9: sens 1/4, fp 0 | 0.8: 1/4, 0.5 | 0.7: 2/4, 0.5 | 0.6: 3/4, 0.5 | 0.5: 3/4, 1 | 0.3: 3/4, 1.5
    expected = {0.125: 0.25, 0.25: 0.25, 0.5: 0.75, 1.0: 0.75, 2.0: 0.75, 4.0: 0.75, 8.0: 0.75}
    assert f.at_rates == expected
    assert math.isclose(f.cpm, np.mean(list(expected.values())))
    assert threshold_at_fp_rate(f, 1.0) == 0.5
    assert threshold_at_fp_rate(f, 0.0) == 0.9


def test_auc_and_accuracy_hand_computed():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert roc_auc([0.5, 0.5], [0, 1]) == 0.5
    assert math.isnan(roc_auc([0.5, 0.6], [1, 1]))
    assert accuracy([0.2, 0.7, 0.6, 0.4], [0, 1, 0, 0]) == 0.75


def test_dice_hand_computed():
    a = np.zeros((4, 4), bool); a[:2] = True  # 8 voxels
    b = np.zeros((4, 4), bool); b[1:3] = True  # 8 voxels, 4 shared
    assert dice(a, b) == 0.5
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
