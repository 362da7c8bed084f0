"""Res-MTNet shapes (3-D and 2-D), the input-size check, and the cross-task ablation switch."""
import pytest
import torch

from model.network import HEATMAP_STRIDE, MALIGNANCY_STRIDE, ResMTNet


def test_3d_head_shapes():
    net = ResMTNet(widths=(4, 8, 8), mask_width=2).eval()
    with torch.no_grad():
        out = net(torch.zeros(2, 1, 16, 24, 32))
    assert set(out) == {"heatmap", "offset", "size", "malignancy", "mask"}
    g = (16 // HEATMAP_STRIDE, 24 // HEATMAP_STRIDE, 32 // HEATMAP_STRIDE)
    assert out["heatmap"].shape == (2, 1) + g
    assert out["offset"].shape == (2, 3) + g
    assert out["size"].shape == (2, 1) + g
    assert out["malignancy"].shape == (2, 1, 16 // MALIGNANCY_STRIDE, 24 // MALIGNANCY_STRIDE, 32 // MALIGNANCY_STRIDE)
    assert out["mask"].shape == (2, 1, 16, 24, 32)


def test_mask_head_optional():
    net = ResMTNet(widths=(4, 8, 8), mask_width=2).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 1, 16, 16, 16), with_mask=False)
    assert "mask" not in out


def test_2d_network_for_radiographs():
    net = ResMTNet(spatial_dims=2, widths=(4, 8, 8), mask_width=2).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 1, 32, 48))
    assert out["offset"].shape == (1, 2, 16, 24)
    assert out["malignancy"].shape == (1, 1, 8, 12)
    assert out["mask"].shape == (1, 1, 32, 48)


def test_rejects_extent_not_multiple_of_8():
    net = ResMTNet(widths=(4, 8, 8), mask_width=2)
    with pytest.raises(ValueError, match="multiples of 8"):
        net(torch.zeros(1, 1, 16, 16, 20))


def test_cross_task_connections_couple_the_branches():
    """With cross-task connections the detection heatmap depends on the malignancy branch;
    without them it does not."""
    torch.manual_seed(0)
    for cross in (True, False):
        net = ResMTNet(widths=(4, 8, 8), mask_width=2, cross_task=cross).eval()
        x = torch.randn(1, 1, 16, 16, 16)
        with torch.no_grad():
            before = net(x)["heatmap"].clone()
            for p in net.mal3.parameters():
                p.add_(torch.randn_like(p))
            after = net(x)["heatmap"]
        assert (not torch.allclose(before, after)) == cross


def test_fold_batchnorm_keeps_outputs():
    import copy

    from model.network import fold_batchnorm

    torch.manual_seed(1)
    net = ResMTNet(widths=(4, 8, 8), mask_width=2)
    with torch.no_grad():  # non-trivial running statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-1, 1); m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-1, 1)
    net.eval()
    folded = fold_batchnorm(copy.deepcopy(net))
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        a, b = net(x), folded(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(ResMTNet(widths=(4, 8, 8), mask_width=2))


@pytest.mark.parametrize("dims", [2, 3])
def test_fuse_upsampling_keeps_outputs(dims):
    """The decoder's up-projections as transposed convolutions give the outputs of 1x1 conv +
    nearest upsampling (the inference graph's speed-up must not move a finding)."""
    import copy

    from model.network import fold_batchnorm, fuse_upsampling

    torch.manual_seed(2)
    net = fold_batchnorm(ResMTNet(spatial_dims=dims, widths=(4, 8, 8), mask_width=2).eval())
    fused = fuse_upsampling(copy.deepcopy(net))
    convt = torch.nn.ConvTranspose3d if dims == 3 else torch.nn.ConvTranspose2d
    assert all(isinstance(getattr(fused, n), convt) for n in ("det_up3", "mal_up3", "det_up2"))
    x = torch.randn((2, 1) + (16, 24, 8)[:dims])
    with torch.no_grad():
        a, b = net(x), fused(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="BatchNorm"):
        fuse_upsampling(ResMTNet(spatial_dims=dims, widths=(4, 8, 8), mask_width=2).eval())


@pytest.mark.parametrize("dims", [2, 3])
def test_heads_at_equals_the_dense_heads_at_those_cells(dims):
    """The detection pass's sparse offset/size heads equal the dense heads at every cell asked
    for, the grid's corners and faces (zero padding) included."""
    torch.manual_seed(3)
    net = ResMTNet(spatial_dims=dims, widths=(4, 8, 8), mask_width=2).eval()
    x = torch.randn((1, 1) + (16, 24, 32)[:dims])
    with torch.no_grad():
        dense = net(x, with_mask=False)
        sparse = net(x, detect_only=True)
        assert set(sparse) == {"heatmap", "features"}
        torch.testing.assert_close(sparse["heatmap"], dense["heatmap"])
        grid = torch.tensor(dense["heatmap"].shape[2:])
        cells = torch.stack([torch.zeros(dims, dtype=torch.long), grid - 1, grid // 2,
                             torch.tensor([0, *(grid[1:] - 1).tolist()])])
        got = net.heads_at(sparse["features"], cells)
        torch.testing.assert_close(got["offset"], dense["offset"][0][(slice(None),) + tuple(cells.T)].T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["size"], dense["size"][0, 0][tuple(cells.T)], atol=1e-5, rtol=1e-5)
        empty = net.heads_at(sparse["features"], cells[:0])
        assert empty["offset"].shape == (0, dims) and empty["size"].shape == (0,)
