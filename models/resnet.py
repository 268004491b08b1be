"""The dilated bottleneck ResNet that MiB, PLOP and SATS use as DeepLabV3 body.

Layout and parameter names follow the originals (and inplace_abn's ImageNet models):

    mod1:    conv1 (7x7/2, 3->64) - bn1 - pool1 (3x3/2 max pool)
    mod2-5:  block1..blockN, each a bottleneck ``ResidualBlock``:
                 convs.conv1 (1x1) - convs.bn1 - convs.conv2 (3x3, stride, dilation) - convs.bn2
                 - convs.conv3 (1x1) - convs.bn3 (identity)
                 [proj_conv (1x1, stride) - proj_bn (identity)] when the shape changes
             s = convs(x) + shortcut;  out = act(s), act = the activation of convs.bn1

The stride sits on the 3x3 convolution (ResNet "v1.5", as torchvision).  Per output stride the
modules mod2..mod5 use dilations (1, 1, 1, 2) for OS16 and (1, 1, 2, 4) for OS8; block1 of a
module strides by 2 when its dilation is 1 (mod3 onwards), every other block has stride 1, and every
block of a dilated module uses that dilation (no multi-grid).  Conv layers keep PyTorch's default
initialisation, as in the originals (the body is normally loaded from ImageNet weights).

``forward`` returns ``(x_b, [s_mod2, s_mod3, s_mod4, s_mod5])``: the mod5 output (after the
activation) and the pre-activation sums of the last block of each module, the features PLOP's
POD distils (PLOP/SATS ``ResNet.forward``).
"""

import re
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from modules.norm_act import ABN, make_norm_act, uses_abs_weight

STRUCTURES = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
BOTTLENECK_CHANNELS = ((64, 64, 256), (128, 128, 512), (256, 256, 1024), (512, 512, 2048))
MODULE_DILATIONS = {16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}

NormAct = Callable[..., ABN]


class ResidualBlock(nn.Module):
    """Bottleneck block; ``forward(x) -> (act(s), s)`` with ``s = convs(x) + shortcut(x)``."""

    def __init__(self, in_channels: int, channels: Sequence[int], stride: int, dilation: int, norm_act: NormAct):
        super().__init__()
        c1, c2, c3 = channels
        self.convs = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(in_channels, c1, 1, bias=False)),
                    ("bn1", norm_act(c1)),
                    ("conv2", nn.Conv2d(c1, c2, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)),
                    ("bn2", norm_act(c2)),
                    ("conv3", nn.Conv2d(c2, c3, 1, bias=False)),
                    ("bn3", norm_act(c3, activation="identity")),
                ]
            )
        )
        if stride != 1 or in_channels != c3:
            self.proj_conv = nn.Conv2d(in_channels, c3, 1, stride=stride, bias=False)
            self.proj_bn = norm_act(c3, activation="identity")
        else:
            self.proj_conv = None
            self.proj_bn = None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        shortcut = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
        s = self.convs(x) + shortcut
        # Not in place: PLOP distils s itself.
        return self.convs.bn1.activate(s), s


class ResNet(nn.Module):
    """MiB/PLOP's dilated bottleneck ResNet (see the module docstring).

    Args:
        structure: number of blocks of mod2..mod5.
        norm_act: factory of :class:`modules.norm_act.ABN` layers (``make_norm_act(...)``);
            None gives ``make_norm_act("std")`` (BatchNorm + ReLU).
        output_stride: 16 or 8.
        keep_outputs: return the outputs of all five modules instead of mod5's only.

    Attributes:
        out_channels: 2048.
    """

    def __init__(
        self,
        structure: Sequence[int],
        norm_act: Optional[NormAct] = None,
        output_stride: int = 16,
        keep_outputs: bool = False,
    ):
        super().__init__()
        if len(structure) != 4:
            raise ValueError(f"structure needs the block counts of four modules, got {structure!r}")
        if output_stride not in MODULE_DILATIONS:
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
        norm_act = make_norm_act("std") if norm_act is None else norm_act
        self.structure = tuple(structure)
        self.output_stride = output_stride
        self.keep_outputs = keep_outputs

        self.mod1 = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)),
                    ("bn1", norm_act(64)),
                    ("pool1", nn.MaxPool2d(3, stride=2, padding=1)),
                ]
            )
        )
        if not isinstance(self.mod1.bn1, ABN):
            raise TypeError(
                f"norm_act must build modules.norm_act.ABN layers (use make_norm_act), got {type(self.mod1.bn1).__name__}"
            )
        in_channels = 64
        for index, (num_blocks, channels, dilation) in enumerate(
            zip(structure, BOTTLENECK_CHANNELS, MODULE_DILATIONS[output_stride])
        ):
            blocks = []
            for block_index in range(num_blocks):
                stride = 2 if dilation == 1 and block_index == 0 and index > 0 else 1
                blocks.append(
                    (f"block{block_index + 1}", ResidualBlock(in_channels, channels, stride, dilation, norm_act))
                )
                in_channels = channels[-1]
            self.add_module(f"mod{index + 2}", nn.Sequential(OrderedDict(blocks)))
        self.out_channels = in_channels

    def residual_modules(self) -> List[nn.Sequential]:
        return [self.mod2, self.mod3, self.mod4, self.mod5]

    def forward(self, x: torch.Tensor):
        """``(x_b, sums)`` or, with keep_outputs, ``([mod1_out, ..., mod5_out], sums)``.

        ``sums`` = [s_mod2, s_mod3, s_mod4, s_mod5], the pre-activation sums of the last block of each
        module; for a 512x512 input at OS16 they are 128, 64, 32, 32 pixels wide with 256, 512, 1024,
        2048 channels, and x_b = act(s_mod5).
        """
        if x.dim() != 4 or x.size(1) != 3:
            raise ValueError(f"ResNet expects an (N, 3, H, W) image batch, got {tuple(x.shape)}")
        x = self.mod1(x)
        outputs, sums = [x], []
        for module in self.residual_modules():
            for block in module:
                x, s = block(x)
            outputs.append(x)
            sums.append(s)
        return (outputs if self.keep_outputs else x), sums


def net_resnet50(**kwargs) -> ResNet:
    """ResNet-50 body, blocks (3, 4, 6, 3); keyword arguments as :class:`ResNet`."""
    return ResNet(STRUCTURES["resnet50"], **kwargs)


def net_resnet101(**kwargs) -> ResNet:
    """ResNet-101 body, blocks (3, 4, 23, 3); keyword arguments as :class:`ResNet`."""
    return ResNet(STRUCTURES["resnet101"], **kwargs)


# ------------------------------------------------------------------------------------------------
# ImageNet weights

WEIGHTS_HELP = (
    "MiB/PLOP use the ImageNet models of inplace_abn, saved as pretrained/{backbone}_{norm_act}.pth.tar "
    "(e.g. resnet101_iabn_sync.pth.tar; https://github.com/mapillary/inplace_abn#training-on-imagenet-1k); "
    "a torchvision ResNet checkpoint (resnet101-*.pth) also loads; or pass --no_pretrained to start from random weights"
)

_TORCHVISION_RENAMES = (
    (re.compile(r"^conv1\."), "mod1.conv1."),
    (re.compile(r"^bn1\."), "mod1.bn1."),
    (re.compile(r"^layer(\d)\.(\d+)\.(conv|bn)(\d)\."), lambda m: f"mod{int(m[1]) + 1}.block{int(m[2]) + 1}.convs.{m[3]}{m[4]}."),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.0\."), lambda m: f"mod{int(m[1]) + 1}.block{int(m[2]) + 1}.proj_conv."),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.1\."), lambda m: f"mod{int(m[1]) + 1}.block{int(m[2]) + 1}.proj_bn."),
)


def torchvision_to_mib_names(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a torchvision ResNet state dict to this body's names; drops the ``fc`` classifier.

    ``layer{L}.{i}.conv{k}`` -> ``mod{L+1}.block{i+1}.convs.conv{k}``, ``downsample.0/1`` -> ``proj_conv/proj_bn``,
    ``conv1``/``bn1`` -> ``mod1.conv1``/``mod1.bn1``.  Keys matching no rule are kept (and then reported
    as unexpected by the strict load).
    """
    renamed = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        for pattern, replacement in _TORCHVISION_RENAMES:
            new_key, hits = pattern.subn(replacement, key)
            if hits:
                key = new_key
                break
        renamed[key] = value
    return renamed


def _conv_before(norm_name: str) -> str:
    """Name of the convolution feeding norm layer ``norm_name`` (bnK <- convK, proj_bn <- proj_conv)."""
    head, _, leaf = norm_name.rpartition(".")
    conv_leaf = "proj_conv" if leaf == "proj_bn" else leaf.replace("bn", "conv", 1)
    return f"{head}.{conv_leaf}" if head else conv_leaf


def _plain_to_abs_scale(state: Dict[str, torch.Tensor], norm_name: str, eps: float) -> None:
    """Rewrite a layer trained with scale ``w`` for layers scaling by ``|w'| + eps``.

    A negative scale cannot be written as ``|w'| + eps``; it is folded into the (bias-free)
    convolution before it: negating output channel c of the conv negates the input of the norm,
    its batch or running mean and so x_hat, so ``w x_hat = (-w)(-x_hat)`` exactly.  Then
    ``w' = |w| - eps``; the rare ``|w| < eps`` becomes scale eps (an error below eps * |x_hat|).
    """
    weight_key, mean_key, conv_key = f"{norm_name}.weight", f"{norm_name}.running_mean", f"{_conv_before(norm_name)}.weight"
    if not all(k in state for k in (weight_key, mean_key, conv_key)):
        return  # the strict load reports what is missing
    weight = state[weight_key]
    negative = weight < 0
    state[conv_key] = torch.where(negative.view(-1, 1, 1, 1), -state[conv_key], state[conv_key])
    state[mean_key] = torch.where(negative, -state[mean_key], state[mean_key])
    state[weight_key] = (weight.abs() - eps).clamp_min(0)


def _abs_to_plain_scale(state: Dict[str, torch.Tensor], norm_name: str, eps: float) -> None:
    """Rewrite a layer trained with scale ``|w| + eps`` for layers scaling by ``w'``: ``w' = |w| + eps`` (exact)."""
    weight_key = f"{norm_name}.weight"
    if weight_key in state:
        state[weight_key] = state[weight_key].abs() + eps


def _convert_scales(body: ResNet, state: Dict[str, torch.Tensor], checkpoint_abs: Optional[bool]) -> None:
    """Convert every norm layer whose stored parameterisation differs from the body's layer."""
    for name, layer in body.named_modules():
        if not isinstance(layer, ABN):
            continue
        source_abs = layer.abs_weight if checkpoint_abs is None else checkpoint_abs
        if source_abs and not layer.abs_weight:
            _abs_to_plain_scale(state, name, layer.eps)
        elif layer.abs_weight and not source_abs:
            _plain_to_abs_scale(state, name, layer.eps)


def read_imagenet_state(path) -> Tuple[Dict[str, torch.Tensor], str]:
    """Read a backbone checkpoint; returns (state dict with this body's names, "mib" | "torchvision").

    MiB's file is ``{"state_dict": {"module.mod1.conv1.weight": ..., "module.classifier.fc.weight": ...}, ...}``
    (a DataParallel ImageNet checkpoint of inplace_abn); the outer dict, the ``module.`` prefix and
    ``classifier.*`` are removed.  A flat state dict is accepted too.  A torchvision file (``layer1.0.conv1.weight``
    ...) is renamed by :func:`torchvision_to_mib_names`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet weights for the DeepLab backbone not found: {path}. {WEIGHTS_HELP}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in several types; name the file in every case
        raise ValueError(f"cannot read backbone weights {path} with torch.load(weights_only=True): {error}") from error
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict (expected a dict of tensors, or one under 'state_dict')")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    if "layer1.0.conv1.weight" in state:
        return torchvision_to_mib_names(state), "torchvision"
    return {k: v for k, v in state.items() if not k.startswith("classifier.")}, "mib"


def load_resnet_imagenet(body: ResNet, path, checkpoint_norm_act: Optional[str] = None) -> str:
    """Load the ImageNet weights file ``path`` into ``body`` (strictly); returns "mib" or "torchvision".

    Reads with :func:`read_imagenet_state`, then :func:`load_imagenet_state` (conversions described there).
    """
    state, source = read_imagenet_state(path)
    load_imagenet_state(body, state, source, checkpoint_norm_act, origin=str(path))
    return source


def load_imagenet_state(
    body: ResNet, state: Dict[str, torch.Tensor], source: str, checkpoint_norm_act: Optional[str] = None, origin: str = "state dict"
) -> None:
    """Load a state dict with this body's names (as :func:`read_imagenet_state` returns it) strictly.

    Norm layers are converted where the stored parameterisation differs from the body's
    (``|w| + eps`` for iabn/iabn_sync, ``w`` otherwise): ``source="torchvision"`` is always ``w``; a
    ``"mib"`` state is assumed to match the body's layers (the originals pick ``{backbone}_{norm_act}.pth.tar``)
    unless ``checkpoint_norm_act`` names the ``--norm_act`` it was trained with.  Converted weights give
    the same normalisation outputs; the activations still follow the body (ReLU for std, leaky ReLU
    otherwise), so e.g. torchvision weights in an ``abn`` body are a starting point, not torchvision's network.
    ``num_batches_tracked`` may be present or absent.  ``origin`` names the source in error messages.
    """
    if not isinstance(body, ResNet):
        raise TypeError(f"expected a models.resnet.ResNet body, got {type(body).__name__}")
    if source not in ("mib", "torchvision"):
        raise ValueError(f"source must be 'mib' or 'torchvision', got {source!r}")
    if source == "torchvision":
        checkpoint_abs = False
    else:
        checkpoint_abs = None if checkpoint_norm_act is None else uses_abs_weight(checkpoint_norm_act)
    state = dict(state)
    _convert_scales(body, state, checkpoint_abs)
    try:
        body.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{origin} ({source} format) does not fit the {type(body).__name__} body: {error}") from error
