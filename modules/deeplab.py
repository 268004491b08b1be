"""DeepLabV3's ASPP head as MiB / PLOP / SATS build it (parameter names included).

    branches  = cat[map_convs.0 (1x1), map_convs.1..3 (3x3, dilation = padding = r_i)](x)   -> 4*hidden
    out       = red_conv(map_bn(branches))                                                   -> out_channels
    pooled    = pool_red_conv(global_pooling_bn(global_pooling_conv(image_pool(x))))         -> out_channels
    result    = red_bn(out + pooled)

with rates r = (6, 12, 18) at output stride 16 and (12, 24, 32) at output stride 8 (32, not the
usual 36: the originals' value).  Every norm layer carries the factory's default activation
(leaky ReLU for the ABN variants, ReLU for ``std``), so the result is post-activation.
"""

from typing import Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.norm_act import ABN, make_norm_act

ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 32)}

PoolingSize = Union[int, Sequence[int], None]


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"pooling_size must be an int or a pair of ints, got {size!r}")


def image_pool(x: torch.Tensor, pooling_size: PoolingSize, global_mean: bool) -> torch.Tensor:
    """Image-level context of ``x`` (N, C, H, W), MiB's ``DeeplabV3._global_pooling``.

    ``global_mean`` (training) or no ``pooling_size``: the mean over H and W, shape (N, C, 1, 1).
    Otherwise (eval with ``--pooling``): a stride-1 average over windows of
    ``k = (min(p_h, H), min(p_w, W))``, replicate-padded back to H x W with ``(k - 1) // 2`` before
    and ``(k - 1) // 2 + (1 if k is even else 0)`` after, per axis.  When the window covers the map
    (e.g. 512 px input at OS16 with the default 32) this equals the global mean everywhere.
    """
    if global_mean or pooling_size is None:
        return x.mean(dim=(2, 3), keepdim=True)
    pool_h, pool_w = _pair(pooling_size)
    if pool_h < 1 or pool_w < 1:
        raise ValueError(f"pooling_size must be positive, got {pooling_size!r}")
    k_h, k_w = min(pool_h, x.size(2)), min(pool_w, x.size(3))
    pooled = F.avg_pool2d(x, (k_h, k_w), stride=1)
    pad_w = ((k_w - 1) // 2, (k_w - 1) // 2 + (1 - k_w % 2))
    pad_h = ((k_h - 1) // 2, (k_h - 1) // 2 + (1 - k_h % 2))
    return F.pad(pooled, pad_w + pad_h, mode="replicate")


class DeeplabV3(nn.Module):
    """ASPP head; ``forward(x (N, in_channels, h, w)) -> (N, out_channels, h, w)``.

    Args:
        in_channels: channels of the body's output (2048 for ResNet-50/101).
        out_channels: channels of the result (256, the classifiers' input).
        hidden_channels: channels of each ASPP branch and of the pooling branch.
        out_stride: the body's output stride, 16 or 8; selects the rates.
        norm_act: factory of :class:`modules.norm_act.ABN` layers; None gives ``make_norm_act("std")``.
        pooling_size: window of the eval-time image pooling (``--pooling``, 32 in the originals),
            an int or (h, w); None pools globally in eval too.

    Convolutions get Xavier-normal weights with the gain of the norm layers' activation
    (``calculate_gain('leaky_relu', 0.01)`` for the ABN variants); norm layers start at weight 1, bias 0.
    """

    def __init__(
        self,
        in_channels: int = 2048,
        out_channels: int = 256,
        hidden_channels: int = 256,
        out_stride: int = 16,
        norm_act=None,
        pooling_size: PoolingSize = None,
    ):
        super().__init__()
        if out_stride not in ASPP_RATES:
            raise ValueError(f"out_stride must be 8 or 16, got {out_stride!r}")
        if pooling_size is not None:
            _pair(pooling_size)
        norm_act = make_norm_act("std") if norm_act is None else norm_act
        self.pooling_size = pooling_size
        self.rates = ASPP_RATES[out_stride]

        self.map_convs = nn.ModuleList(
            [nn.Conv2d(in_channels, hidden_channels, 1, bias=False)]
            + [nn.Conv2d(in_channels, hidden_channels, 3, padding=r, dilation=r, bias=False) for r in self.rates]
        )
        self.map_bn = norm_act(hidden_channels * 4)
        self.global_pooling_conv = nn.Conv2d(in_channels, hidden_channels, 1, bias=False)
        self.global_pooling_bn = norm_act(hidden_channels)
        self.red_conv = nn.Conv2d(hidden_channels * 4, out_channels, 1, bias=False)
        self.pool_red_conv = nn.Conv2d(hidden_channels, out_channels, 1, bias=False)
        self.red_bn = norm_act(out_channels)
        if not isinstance(self.map_bn, ABN):
            raise TypeError(
                f"norm_act must build modules.norm_act.ABN layers (use make_norm_act), got {type(self.map_bn).__name__}"
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        activation = "linear" if self.map_bn.activation == "identity" else self.map_bn.activation
        gain = nn.init.calculate_gain(activation, self.map_bn.activation_param)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight, gain)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = torch.cat([conv(x) for conv in self.map_convs], dim=1)
        out = self.red_conv(self.map_bn(branches))

        global_mean = self.training or self.pooling_size is None
        pooled = image_pool(x, self.pooling_size, global_mean)
        pooled = self.pool_red_conv(self.global_pooling_bn(self.global_pooling_conv(pooled)))
        # (N, C, 1, 1) broadcasts over the map; the windowed eval pooling already has its size.
        return self.red_bn(out + pooled)
