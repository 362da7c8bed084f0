"""Targets, decoding and the joint loss on tiny tensors."""
import math

import numpy as np
import torch

from model.detector import Detection, NoduleTarget, decode, make_targets, suppress
from model.losses import focal_heatmap_loss, joint_loss, mask_loss
from model.network import ResMTNet


def _logit(p):
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def test_decode_round_trips_targets():
    nods = [NoduleTarget((5.3, 20.7, 11.2), 6.0, 1.0), NoduleTarget((25.0, 8.4, 27.9), 12.5, 0.0)]
    t = make_targets((32, 32, 32), nods)
    out = {
        "heatmap": _logit(t["heatmap"] * 0.9)[None],  # peaks 0.9, Gaussian elsewhere
        "offset": t["offset"][None],
        "size": t["size"][None],
        "malignancy": _logit(t["malignancy"])[None],
    }
    dets = decode(out, threshold=0.5)[0]
    assert len(dets) == 2
    for n in nods:
        d = min(dets, key=lambda d: np.linalg.norm(np.subtract(d.center, n.center)))
        np.testing.assert_allclose(d.center, n.center, atol=1e-4)
        assert math.isclose(d.diameter, n.diameter, rel_tol=1e-5)
        assert abs(d.malignancy - n.malignancy) < 0.02


def test_targets_ignore_centres_outside_and_unlabelled_malignancy():
    t = make_targets((16, 16, 16), [NoduleTarget((-3.0, 5.0, 5.0), 5.0, 1.0), NoduleTarget((8.0, 8.0, 8.0), 5.0)])
    assert t["reg_mask"].sum() == 1  # only the inside nodule
    assert t["mal_weight"].sum() == 0  # its malignancy is NaN: no malignancy supervision
    assert t["heatmap"].max() == 1.0


def test_focal_loss_hand_computed():
    # one positive cell predicted p = 0.5, one negative cell with target 0 predicted p = 0.5
    logits = torch.zeros(1, 1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 1, 2)
    expected = (0.5**2) * math.log(2) + (1.0**4) * (0.5**2) * math.log(2)  # / 1 positive
    assert math.isclose(float(focal_heatmap_loss(logits, target)), expected, rel_tol=1e-5)


def test_mask_loss_is_lower_for_the_right_mask():
    t = torch.zeros(1, 1, 8, 8, 8)
    t[..., 2:5, 2:5, 2:5] = 1
    good = (t * 2 - 1) * 6
    assert float(mask_loss(good, t)) < 0.05 < float(mask_loss(-good, t))


def test_joint_loss_decreases_on_a_toy_batch():
    torch.manual_seed(0)
    net = ResMTNet(widths=(4, 8, 8), mask_width=2)
    x = torch.full((2, 1, 16, 16, 16), -1.0)
    nods = [[NoduleTarget((8.0, 8.0, 8.0), 6.0, 1.0)], []]
    x[0, 0, 5:11, 5:11, 5:11] = 0.5
    tg = [make_targets((16, 16, 16), n) for n in nods]
    batch = {k: torch.stack([t[k] for t in tg]) for k in tg[0]}
    batch["mask"] = (x > 0).float()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        terms = joint_loss(net(x), batch)
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        losses.append(float(terms["total"].detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert set(terms) == {"heat", "off", "size", "mal", "mask", "total"}


def test_suppress_keeps_the_best_of_close_detections():
    dets = [Detection((10, 10, 10), 8, 0.6, 0.1), Detection((11, 10, 10), 8, 0.9, 0.1), Detection((40, 10, 10), 8, 0.5, 0.1)]
    kept = suppress(dets)
    assert [d.score for d in kept] == [0.9, 0.5]


def test_suppress_works_in_mm_on_any_objects():
    """Refined findings are suppressed by their LPS centre and diameter in mm: two candidates
    that the refinement pass moved onto the same nodule (3 mm apart, 10 mm across) are one."""
    from model.finding import Finding

    def f(c, d, s):
        return Finding(center_mm=c, center_voxel=(0.0, 0.0, 0.0), diameter_mm=d, volume_mm3=0.0, malignancy=0.5, score=s)

    found = [f((0.0, 0.0, 0.0), 10.0, 0.7), f((3.0, 0.0, 0.0), 10.0, 0.8), f((0.0, 12.0, 0.0), 10.0, 0.4)]
    kept = suppress(found, centre=lambda x: x.center_mm, diameter=lambda x: x.diameter_mm)
    assert [x.score for x in kept] == [0.8, 0.4]
