"""Res-MTNet: a residual multi-task network for nodule detection, segmentation and malignancy.

Layout (strides are relative to the input grid; for CT the input is resampled to 1 mm isotropic,
so stride ``s`` means ``s`` mm per output cell):

```
 input (B, 1, D, H, W) normalised HU
   stem   conv 3, stride 2                      -> (B, w0, D/2, H/2, W/2)
   enc1   ResBlock                              -> e1  stride 2
   enc2   ResBlock (stride 2) + ResBlock        -> e2  stride 4
   enc3   ResBlock (stride 2) + ResBlock        -> e3  stride 8     [shared backbone]
 detection branch           malignancy branch
   d3 = ResBlock(e3)          m3 = ResBlock(e3)
   d3, m3 += cross-task residual projections (1x1 conv of the other branch)
   d2 = ResBlock(e2 + up(d3))  m2 = ResBlock(e2 + up(m3))
   d2, m2 += cross-task residual projections
   d1 = ResBlock(e1 + up(d2))
   heads on d1 (stride 2):    head on m2 (stride 4):
     heatmap  (B, 1, ...)       malignancy (B, 1, ...) logit map
     offset   (B, 3, ...)
     size     (B, 1, ...)     mask head (stride 1, optional): up(d1) + full-resolution conv of
                                the input, ``mask_blocks`` full-resolution residual blocks
                                -> mask (B, 1, D, H, W) logits
```

Everything is fully convolutional, so the same weights run on a 32 mm training crop, a 40 mm
cube or a large tile of a whole CT. The module is dimension-generic: ``spatial_dims=2`` builds
the same network from 2-D layers (radiographs); ``offset`` then has 2 channels.

The module returns a dict of head outputs (all raw logits / regressions, no activation) and
nothing else; targets, losses and decoding live in :mod:`model.detector` and
:mod:`model.losses`.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

HEATMAP_STRIDE = 2
MALIGNANCY_STRIDE = 4
INPUT_MULTIPLE = 8  # input extents must be multiples of this (the deepest stride)


def _conv(spatial_dims: int):
    return {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


def _norm(spatial_dims: int):
    return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]


class ResBlock(nn.Module):
    """Basic residual block: conv-BN-ReLU-conv-BN + identity (or 1x1 projection), ReLU.

    (B, c_in, *S) -> (B, c_out, *S / stride)
    """

    def __init__(self, spatial_dims: int, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        Conv, Norm = _conv(spatial_dims), _norm(spatial_dims)
        self.conv1 = Conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = Norm(c_out)
        self.conv2 = Conv(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = Norm(c_out)
        self.skip = None
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(Conv(c_in, c_out, 1, stride=stride, bias=False), Norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        s = x if self.skip is None else self.skip(x)
        if not torch.is_grad_enabled():  # inference: the sum in y's buffer (peak memory)
            return F.relu(y.add_(s), inplace=True)
        return F.relu(y + s, inplace=True)


class CrossTask(nn.Module):
    """Cross-task residual connection between two branches at one level.

    ``a' = a + P_ba(b)`` and ``b' = b + P_ab(a)`` where ``P`` are 1x1 conv + BN projections
    (both computed from the inputs, so the exchange is symmetric). Shapes unchanged.
    """

    def __init__(self, spatial_dims: int, c: int):
        super().__init__()
        Conv, Norm = _conv(spatial_dims), _norm(spatial_dims)
        self.b_to_a = nn.Sequential(Conv(c, c, 1, bias=False), Norm(c))
        self.a_to_b = nn.Sequential(Conv(c, c, 1, bias=False), Norm(c))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.relu(a + self.b_to_a(b)), F.relu(b + self.a_to_b(a))


def _head(spatial_dims: int, c: int, k: int, bias: float = 0.0) -> nn.Sequential:
    Conv = _conv(spatial_dims)
    head = nn.Sequential(Conv(c, c, 3, padding=1), nn.ReLU(inplace=True), Conv(c, k, 1))
    nn.init.constant_(head[-1].bias, bias)
    return head


class ResMTNet(nn.Module):
    """Residual multi-task network (see the module docstring for the diagram).

    Args:
      spatial_dims: 3 for CT volumes, 2 for radiographs.
      in_channels: input channels (1: normalised HU).
      widths: channels at strides 2, 4, 8.
      mask_width: channels of the full-resolution mask path.
      mask_blocks: residual blocks at full resolution in the mask path (0 in the first
        released weights; 1 since: it lets the mask follow the 1 mm intensity boundary).
      cross_task: if False the two branches do not exchange features (ablation).

    Input: ``x`` float tensor (B, C, *S), each spatial extent a multiple of 8.
    Output dict (logits unless said otherwise):
      * ``heatmap``: (B, 1, *S/2)  nodule-centre logit per stride-2 cell.
      * ``offset``: (B, dims, *S/2)  sub-cell centre offset in cells, in [0, 1) after decoding.
      * ``size``: (B, 1, *S/2)  log(diameter in input voxels).
      * ``malignancy``: (B, 1, *S/4)  malignancy logit map.
      * ``mask``: (B, 1, *S)  nodule-mask logit (only when ``with_mask``).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (16, 32, 64),
        mask_width: int = 8,
        cross_task: bool = True,
        mask_blocks: int = 0,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims
        self.cross_task = cross_task
        Conv, Norm = _conv(spatial_dims), _norm(spatial_dims)
        w0, w1, w2 = widths
        self.stem = nn.Sequential(Conv(in_channels, w0, 3, stride=2, padding=1, bias=False), Norm(w0), nn.ReLU(inplace=True))
        self.enc1 = ResBlock(spatial_dims, w0, w0)
        self.enc2 = nn.Sequential(ResBlock(spatial_dims, w0, w1, 2), ResBlock(spatial_dims, w1, w1))
        self.enc3 = nn.Sequential(ResBlock(spatial_dims, w1, w2, 2), ResBlock(spatial_dims, w2, w2))
        # detection branch
        self.det3 = ResBlock(spatial_dims, w2, w2)
        self.det_up3 = nn.Sequential(Conv(w2, w1, 1, bias=False), Norm(w1))
        self.det2 = ResBlock(spatial_dims, w1, w1)
        self.det_up2 = nn.Sequential(Conv(w1, w0, 1, bias=False), Norm(w0))
        self.det1 = ResBlock(spatial_dims, w0, w0)
        # malignancy branch
        self.mal3 = ResBlock(spatial_dims, w2, w2)
        self.mal_up3 = nn.Sequential(Conv(w2, w1, 1, bias=False), Norm(w1))
        self.mal2 = ResBlock(spatial_dims, w1, w1)
        # cross-task residual connections
        self.cross3 = CrossTask(spatial_dims, w2)
        self.cross2 = CrossTask(spatial_dims, w1)
        # heads
        self.heatmap = _head(spatial_dims, w0, 1, bias=-4.0)
        self.offset = _head(spatial_dims, w0, spatial_dims)
        self.size = _head(spatial_dims, w0, 1, bias=2.0)
        self.malignancy = _head(spatial_dims, w1, 1)
        # mask path
        self.mask_in = nn.Sequential(Conv(in_channels, mask_width, 3, padding=1, bias=False), Norm(mask_width), nn.ReLU(inplace=True))
        self.mask_up = nn.Sequential(Conv(w0, mask_width, 1, bias=False), Norm(mask_width))
        self.mask_blocks = nn.Sequential(*[ResBlock(spatial_dims, mask_width, mask_width) for _ in range(mask_blocks)])
        self.mask_out = nn.Sequential(
            Conv(mask_width, mask_width, 3, padding=1), nn.ReLU(inplace=True), Conv(mask_width, 1, 1)
        )

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[2:], mode="nearest")

    @staticmethod
    def _skip_sum(skip: torch.Tensor, lifted: torch.Tensor) -> torch.Tensor:
        """``skip + lifted``; in inference written into ``lifted``'s buffer (a fresh tensor),
        the same sum (addition commutes exactly), one tensor less alive (peak memory)."""
        return lifted.add_(skip) if not torch.is_grad_enabled() else skip + lifted

    def _lift(self, proj: nn.Module, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The 1x1 projection ``proj`` of ``x``, nearest-upsampled onto ``like``'s grid (twice
        ``x``'s extents). After :func:`fuse_upsampling` ``proj`` is one transposed convolution
        (kernel 2, stride 2) doing both."""
        if isinstance(proj, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
            return proj(x)
        return self._up(proj(x), like)

    def forward(self, x: torch.Tensor, with_mask: bool = True, detect_only: bool = False) -> dict[str, torch.Tensor]:
        """Head outputs (see the class docstring). ``detect_only``: only ``heatmap`` and
        ``features`` (the detection branch's stride-2 features ``d1``, (B, w0, *S/2)) from which
        :meth:`heads_at` gives the offset and size at chosen cells (a whole-CT tile needs them
        only at its heatmap peaks); no malignancy head, no mask."""
        for n in x.shape[2:]:
            if n % INPUT_MULTIPLE:
                raise ValueError(f"input spatial extents must be multiples of {INPUT_MULTIPLE}, got {tuple(x.shape[2:])}")
        e1 = self.enc1(self.stem(x))
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d3, m3 = self.det3(e3), self.mal3(e3)
        if self.cross_task:
            d3, m3 = self.cross3(d3, m3)
        d2 = self.det2(self._skip_sum(e2, self._lift(self.det_up3, d3, e2)))
        m2 = self.mal2(self._skip_sum(e2, self._lift(self.mal_up3, m3, e2)))
        if self.cross_task:
            d2, m2 = self.cross2(d2, m2)
        d1 = self._skip_sum(e1, self._lift(self.det_up2, d2, e1))
        del e1, e2, e3, d2, d3, m3  # stride-2 tensors of a whole-CT tile are ~100 MB each
        d1 = self.det1(d1)
        if detect_only:
            return {"heatmap": self.heatmap(d1), "features": d1}
        out = {
            "heatmap": self.heatmap(d1),
            "offset": self.offset(d1),
            "size": self.size(d1),
            "malignancy": self.malignancy(m2),
        }
        if with_mask:
            up = F.interpolate(self.mask_up(d1), size=x.shape[2:], mode="trilinear" if self.spatial_dims == 3 else "bilinear", align_corners=False)
            out["mask"] = self.mask_out(self.mask_blocks(F.relu(self.mask_in(x) + up)))
        return out

    def heads_at(self, features: torch.Tensor, cells: torch.Tensor) -> dict[str, torch.Tensor]:
        """The offset and size heads at ``cells`` only: ``features`` (1, w0, *G) from
        ``forward(..., detect_only=True)``, ``cells`` (K, dims) integer stride-2 cell indices.
        Returns ``offset`` (K, dims) and ``size`` (K,), equal to the dense heads' outputs at those
        cells (each head's 3-wide convolution sees the same zero-padded neighbourhood)."""
        dims = self.spatial_dims
        k = cells.shape[0]
        if k == 0:
            return {"offset": features.new_zeros((0, dims)), "size": features.new_zeros((0,))}
        # the 3^dims neighbourhood of each cell; positions outside the grid read 0, as the
        # head's zero padding (no padded copy of the features: a whole-CT tile's are ~100 MB)
        grid = torch.tensor(features.shape[2:], device=cells.device)
        steps = torch.arange(-1, 2, device=cells.device)
        offs = torch.stack([g.reshape(-1) for g in torch.meshgrid(*([steps] * dims), indexing="ij")], 1)
        pos = cells[:, None, :] + offs[None]  # (K, 3^dims, dims)
        valid = ((pos >= 0) & (pos < grid)).all(-1)  # (K, 3^dims)
        pos = torch.minimum(pos.clamp(min=0), grid - 1)
        patches = features[0][(slice(None),) + tuple(pos[..., i] for i in range(dims))] * valid  # (C, K, 3^dims)
        patches = patches.permute(1, 0, 2).reshape(k, -1, *([3] * dims))
        conv = F.conv3d if dims == 3 else F.conv2d

        def head(h: nn.Sequential) -> torch.Tensor:  # the 3-wide conv without padding: one cell
            return h[2](F.relu(conv(patches, h[0].weight, h[0].bias)))

        return {"offset": head(self.offset).reshape(k, dims), "size": head(self.size).reshape(k)}


def _fold_conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    w = conv.weight
    b = conv.bias if conv.bias is not None else torch.zeros(w.shape[0], device=w.device)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True).to(w.device)
    fused.weight.data = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    fused.bias.data = (b - bn.running_mean) * scale + bn.bias
    return fused


@torch.no_grad()
def fold_batchnorm(net: ResMTNet) -> ResMTNet:
    """Fold every BatchNorm into the convolution before it (inference only: same outputs in
    eval mode, ~25 % faster on CPU). Modifies and returns ``net``, which must be in eval mode."""
    if net.training:
        raise ValueError("fold_batchnorm needs a network in eval mode")
    norms = (nn.BatchNorm2d, nn.BatchNorm3d)
    convs = (nn.Conv2d, nn.Conv3d)
    for m in net.modules():
        if isinstance(m, ResBlock):
            if isinstance(m.bn1, norms):
                m.conv1, m.bn1 = _fold_conv_bn(m.conv1, m.bn1), nn.Identity()
                m.conv2, m.bn2 = _fold_conv_bn(m.conv2, m.bn2), nn.Identity()
        elif isinstance(m, nn.Sequential):
            for i in range(len(m) - 1):
                if isinstance(m[i], convs) and isinstance(m[i + 1], norms):
                    m[i], m[i + 1] = _fold_conv_bn(m[i], m[i + 1]), nn.Identity()
    return net


@torch.no_grad()
def fuse_upsampling(net: ResMTNet) -> ResMTNet:
    """Replace each up-projection of the decoder (a 1x1 convolution, BatchNorm folded, then a
    nearest-neighbour x2 upsampling) by one transposed convolution with kernel 2 and stride 2
    whose four (eight in 3-D) taps all carry the 1x1 weights: the same outputs (inputs are
    multiples of :data:`INPUT_MULTIPLE`, so every upsampling is exactly x2), without the
    upsampled intermediate, which ONNX Runtime's Resize fills slowly (measured: 0.31 s against
    0.06 s on a whole-CT tile's stride-4 -> stride-2 step). Inference only; call after
    :func:`fold_batchnorm`. Modifies and returns ``net``."""
    ConvT = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[net.spatial_dims]
    for name in ("det_up3", "mal_up3", "det_up2"):
        proj = getattr(net, name)
        if isinstance(proj, ConvT):
            continue
        convs = [m for m in proj.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
        norms = [m for m in proj.modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d))]
        if len(convs) != 1 or norms:
            raise ValueError(f"fuse_upsampling needs BatchNorm folded first ({name})")
        conv = convs[0]
        w = conv.weight  # (out, in, 1, ..., 1)
        fused = ConvT(conv.in_channels, conv.out_channels, 2, stride=2, bias=True).to(w.device)
        fused.weight.data = w.transpose(0, 1).expand(-1, -1, *([2] * net.spatial_dims)).contiguous()
        fused.bias.data = conv.bias.data.clone() if conv.bias is not None else torch.zeros(conv.out_channels, device=w.device)
        setattr(net, name, fused)
    return net
