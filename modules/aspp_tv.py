"""torchvision's DeepLabV3 ASPP followed by a 3×3 conv block: the head DKD is trained with.

    branch_0 = ReLU(BN(conv1x1(x)))
    branch_i = ReLU(BN(conv3x3_dilated(x, rate_i)))                   i = 1, 2, 3
    branch_4 = upsample_bilinear(ReLU(BN(conv1x1(mean_hw(x)))))       image pooling
    y        = Dropout_p(ReLU(BN(conv1x1(cat[branch_0..4]))))          "project"
    out      = ReLU(BN(conv3x3(y)))                                     "last_conv"

with rates (6, 12, 18) at output stride 16 and (12, 24, 36) at output stride 8, every branch
``hidden_channels`` wide, no conv bias, Kaiming-normal convolutions (fan_in, gain √2) and BN weight 1,
bias 0. The output ends in a ReLU, so it is non-negative. Parameter names are torchvision's
(``convs.{0..4}``, ``project``) plus ``last_conv``. Unlike :class:`modules.deeplab.DeeplabV3`
(MiB's head: leaky ReLU, rates 12/24/32 at OS8, no extra conv block), this head has no
windowed eval-time pooling: the image pooling is global in training and in evaluation.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ASPP_TV_RATES", "TorchvisionASPP"]

ASPP_TV_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}

NormLayer = Callable[[int], nn.Module]


def _conv_bn_relu(conv: nn.Conv2d, norm_layer: NormLayer) -> list[nn.Module]:
    return [conv, norm_layer(conv.out_channels), nn.ReLU(inplace=True)]


class _ImagePooling(nn.Sequential):
    """Global average pool, 1×1 conv, BN, ReLU, then bilinear upsampling to the input's size."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer: NormLayer):
        super().__init__(nn.AdaptiveAvgPool2d(1),
                         *_conv_bn_relu(nn.Conv2d(in_channels, out_channels, 1, bias=False), norm_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return F.interpolate(super().forward(x), size=size, mode="bilinear", align_corners=False)


class TorchvisionASPP(nn.Module):
    """``forward(x (N, in_channels, h, w)) -> (N, out_channels, h, w)``, non-negative.

    Args:
        in_channels: channels of the backbone output (2048 for ResNet-50/101).
        out_channels: channels of the result (the classifiers' input).
        hidden_channels: channels of each branch.
        output_stride: 16 or 8, selects the rates.
        norm_layer: ``norm_layer(channels)`` builds a BatchNorm layer without activation
            (``nn.BatchNorm2d``; ``nn.SyncBatchNorm`` under DDP).
        dropout: drop probability after the projection (0.1 in DKD; torchvision uses 0.5).

    Training needs more than one value per channel in the pooling branch's BN, i.e. a batch of at
    least 2 images per process (as every BN head with image pooling).
    """

    def __init__(self, in_channels: int = 2048, out_channels: int = 256, hidden_channels: int = 256,
                 output_stride: int = 16, norm_layer: NormLayer = nn.BatchNorm2d, dropout: float = 0.1):
        super().__init__()
        if output_stride not in ASPP_TV_RATES:
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
        self.rates = ASPP_TV_RATES[output_stride]
        branches = [nn.Sequential(*_conv_bn_relu(nn.Conv2d(in_channels, hidden_channels, 1, bias=False),
                                                 norm_layer))]
        for rate in self.rates:
            conv = nn.Conv2d(in_channels, hidden_channels, 3, padding=rate, dilation=rate, bias=False)
            branches.append(nn.Sequential(*_conv_bn_relu(conv, norm_layer)))
        branches.append(_ImagePooling(in_channels, hidden_channels, norm_layer))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            *_conv_bn_relu(nn.Conv2d(len(branches) * hidden_channels, out_channels, 1, bias=False), norm_layer),
            nn.Dropout(dropout))
        self.last_conv = nn.Sequential(
            *_conv_bn_relu(nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), norm_layer))
        self.out_channels = out_channels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a feature batch (N, C, h, w), got shape {tuple(x.shape)}")
        branches = torch.cat([branch(x) for branch in self.convs], dim=1)
        return self.last_conv(self.project(branches))
