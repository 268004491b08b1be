"""Decoders that turn the four MiT stage outputs into a stride-4 feature map.

``SATSHead`` is the decoder SATS trains (default ``--segformer_head sats``);
``SegFormerMLPHead`` is the official all-MLP decoder of SegFormer without its final class
projection (``--segformer_head mlp``). Both return ``(B, channels, H/4, W/4)``; the
per-step 1×1 classifiers of ``IncrementalSegmentationModule`` produce the logits.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from utils.reduce import sum_groups

__all__ = ["SATSHead", "SegFormerMLPHead", "MLP_DECODER_DIMS"]

# Official decoder widths (SegFormer configs): 256 for B0/B1, 768 for B2-B5.
MLP_DECODER_DIMS = {"mit_b0": 256, "mit_b1": 256, "mit_b2": 768, "mit_b3": 768, "mit_b4": 768, "mit_b5": 768}


def _check_stages(features: Sequence[torch.Tensor], in_channels: Sequence[int]) -> None:
    if len(features) != len(in_channels):
        raise ValueError(f"expected {len(in_channels)} stage outputs, got {len(features)}")
    for i, (feature, channels) in enumerate(zip(features, in_channels)):
        if feature.dim() != 4 or feature.shape[1] != channels:
            raise ValueError(f"stage {i} output must be (B, {channels}, H, W), got {tuple(feature.shape)}")


class SATSHead(nn.Module):
    """SATS's SegFormer decoder:

        out = to_segmentation( concat_{i=0..3} up_i(to_fused[i](stage_i)) )

    ``to_fused[i]`` is a 1×1 conv (C_i → channels, with bias) followed by nearest-neighbour
    upsampling to the stage-1 grid (×2^i for inputs divisible by 32, which is SATS's
    ``nn.Upsample(scale_factor=2**i)``); the concatenation is in stage order 1..4 and
    ``to_segmentation`` is a 1×1 conv (4·channels → channels, with bias). No normalisation,
    activation or dropout. Parameter names equal SATS's ``head.*`` keys
    (``to_fused.{i}.0.weight``, ``to_segmentation.weight``).

    Upsampling to the stage-1 size (instead of a fixed factor) also accepts input sizes that
    are not multiples of 32 (e.g. full-image evaluation); for multiples of 32 it is identical.

    The whole head is linear and nearest upsampling commutes with 1×1 convolutions, so it is
    evaluated as the same map in a cheaper order::

        out = b_seg + sum_i up_i( (S_i W_i) x_i + S_i b_i )

    with ``S_i`` the block of ``to_segmentation``'s weight that reads stage i. Each product runs
    at its stage's resolution, instead of fusing the 4·channels concatenation at stage-1
    resolution: about 16x fewer multiply-adds (the head cost more than the MiT-B0 encoder).
    Gradients reach ``W_i``, ``b_i``, ``S_i`` and ``b_seg`` through the small weight products.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 256):
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.channels = channels
        # A one-element Sequential keeps SATS's parameter index ".0"; its second element was a
        # parameter-free nn.Upsample, done in forward here so the target size can be exact.
        self.to_fused = nn.ModuleList(nn.Sequential(nn.Conv2d(c, channels, 1)) for c in self.in_channels)
        self.to_segmentation = nn.Conv2d(len(self.in_channels) * channels, channels, 1)

    def forward(self, features: Sequence[torch.Tensor], project=None) -> torch.Tensor:
        """``project = (P, p)`` (``P``: O × channels) appends a 1×1 conv to the head and folds it
        into the per-stage maps (``S_i`` → ``P S_i``): returns ``P · out + p`` with O channels,
        without materialising the ``channels``-wide map (used for the classifiers)."""
        _check_stages(features, self.in_channels)
        size = features[0].shape[-2:]
        fuse = self.to_segmentation.weight.flatten(1).split(self.channels, dim=1)  # S_i blocks
        out_bias = self.to_segmentation.bias
        if project is not None:
            weight, bias = project
            fuse = [weight @ block for block in fuse]
            out_bias = weight @ out_bias + bias
        out = None
        for proj, block, x in zip(self.to_fused, fuse, features):
            conv = proj[0]
            bias = block @ conv.bias
            if out is None:
                bias = bias + out_bias
            stage = F.conv2d(x, (block @ conv.weight.flatten(1))[:, :, None, None].to(x.dtype), bias.to(x.dtype))
            out = stage if out is None else _add_nearest_upsampled(out, stage, size)
        return out

    def forward_reference(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The published evaluation order (upsample, concatenate, fuse); same values as forward."""
        size = features[0].shape[-2:]
        fused = [F.interpolate(proj(x), size=size, mode="nearest") for proj, x in zip(self.to_fused, features)]
        return self.to_segmentation(torch.cat(fused, dim=1))


def _add_nearest_upsampled(out: torch.Tensor, x: torch.Tensor, size) -> torch.Tensor:
    """``out + interpolate(x, size, 'nearest')``; for integer ratios without materialising the
    upsampled map (each low-resolution value is added to its block)."""
    (height, width), (h, w) = size, x.shape[-2:]
    if height % h or width % w:
        return out + F.interpolate(x, size=size, mode="nearest")
    if out.device.type == "cpu":
        return _AddNearestUpsampled.apply(out, x)
    batch, channels = out.shape[:2]
    blocks = out.view(batch, channels, h, height // h, w, width // w)
    return (blocks + x[:, :, :, None, :, None]).view_as(out)


class _AddNearestUpsampled(torch.autograd.Function):
    """``out + nearest-upsampled x`` for integer ratios ``kh × kw`` (CPU).

    Forward: ``x`` repeated ``kw`` times along the width, added to each of the ``kh`` rows of its
    block (the same single addition per element as the broadcast form). Backward: ``x``'s gradient
    is the sum of each ``kh × kw`` block of the incoming gradient, taken row by row (each row's
    ``kw`` values in order, then the ``kh`` row sums in order), as strided additions. That is the
    order of torch's CPU reduction over the two short block axes (the head's shapes give the same
    bits, tested), which takes 12.5 ms where this takes 0.5 ms (4×256×64² map, 2×2 blocks).
    Half-precision gradients are summed in float32."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = out.shape
        h, w = x.shape[-2:]
        ctx.ratio = (height // h, width // w)
        rows = x.repeat_interleave(width // w, dim=-1) if width != w else x
        return (out.view(batch, channels, h, height // h, width) + rows[:, :, :, None, :]).view_as(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        kh, kw = ctx.ratio
        return grad, _block_sums(grad, kh, kw)


def _block_sums(grad: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, C, H/kh, W/kw)``: the sum of each block, row by row."""
    g = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
    height, width = g.shape[-2:]
    rows = sum_groups(g, width // kw, kw, dim=-1)
    return sum_groups(rows, height // kh, kh, dim=-2).to(grad.dtype)


class MLPProjection(nn.Module):
    """Per-token linear projection of a (B, C, H, W) map: (B, C, H, W) → (B, E, H, W)."""

    def __init__(self, in_channels: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        tokens = self.proj(x.flatten(2).transpose(1, 2))
        return tokens.transpose(1, 2).reshape(batch, -1, height, width)


class ConvBNReLU(nn.Module):
    """1×1 conv without bias, BatchNorm, ReLU (mmcv ``ConvModule``: names ``conv``, ``bn``)."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = norm_layer(out_channels)
        self.activate = nn.ReLU(inplace=True)
        # mmcv's ConvModule init: Kaiming normal (fan_out, ReLU) for the conv, BN weight 1 / bias 0.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class SegFormerMLPHead(nn.Module):
    """Official SegFormer all-MLP decoder (without ``linear_pred``):

        c_i' = resize_bilinear(linear_c{i}(stage_i), size of stage 1)     (align_corners=False)
        out  = Dropout2d_0.1( ReLU(BN(Conv1x1([c_4', c_3', c_2', c_1']))) )

    Names follow the official ``decode_head.*`` keys: ``linear_c{1..4}.proj``,
    ``linear_fuse.conv``, ``linear_fuse.bn``. ``norm_layer`` is BatchNorm2d on one process and
    SyncBatchNorm under DDP (the official configs use SyncBN).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        embed_dim: int,
        dropout: float = 0.1,
        norm_layer=nn.BatchNorm2d,
    ):
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.channels = embed_dim
        for i, c in enumerate(self.in_channels):
            self.add_module(f"linear_c{i + 1}", MLPProjection(c, embed_dim))
        self.linear_fuse = ConvBNReLU(len(self.in_channels) * embed_dim, embed_dim, norm_layer)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        _check_stages(features, self.in_channels)
        size = features[0].shape[-2:]
        projected = []
        for i in reversed(range(len(features))):
            x = getattr(self, f"linear_c{i + 1}")(features[i])
            if i > 0:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            projected.append(x)
        return self.dropout(self.linear_fuse(torch.cat(projected, dim=1)))
