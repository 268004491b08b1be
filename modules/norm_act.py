"""Activated batch normalisation ("ABN") without a compiled extension.

MiB, PLOP and SATS build every DeepLab normalisation layer through `--norm_act`, using
mapillary/inplace_abn.  This module reproduces those layers in plain PyTorch:

=================  ==============================================  =========================
``--norm_act``     layer                                           scale applied to x_hat
=================  ==============================================  =========================
``std``            BatchNorm2d + ReLU (torchvision's ResNet)        weight
``abn``            BatchNorm2d + LeakyReLU(0.01) (inplace_abn ABN)  weight
``iabn``           InPlaceABN: BatchNorm2d + LeakyReLU(0.01)        abs(weight) + eps
``iabn_sync``      InPlaceABNSync: as ``iabn``, batch statistics    abs(weight) + eps
                   over all processes when the world is > 1
``iabn_sync_test`` as ``iabn`` (single-device use of ``iabn_sync``   abs(weight) + eps
                   weights)
=================  ==============================================  =========================

Every layer computes

    x_hat = (x - mu) / sqrt(sigma^2 + eps)
    y     = act(x_hat * s + bias),   s = weight            (std, abn)
                                     s = |weight| + eps    (iabn, iabn_sync)

where mu and sigma^2 are the biased batch statistics in training and the running statistics in
eval.  The running statistics follow torch.nn.BatchNorm2d (and inplace_abn):
``running = (1 - momentum) * running + momentum * batch`` with the unbiased batch variance.

The ``|weight| + eps`` scale is what inplace_abn's kernels compute for InPlaceABN and
InPlaceABNSync; keeping it lets the ImageNet weights MiB distributes (trained with those layers)
give the same outputs here.  The derivative of ``|weight|`` is taken as +1 at 0, as inplace_abn does.

The state dict of each layer is ``weight``, ``bias``, ``running_mean``, ``running_var`` and
torch's ``num_batches_tracked``; files from inplace_abn < 1.1 (MiB/PLOP era) lack the latter
and load all the same.

:class:`SyncBatchNorm` is ``torch.nn.SyncBatchNorm`` (a plain BatchNorm, used by the SegFormer MLP
head in a world > 1) made to synchronise CPU process groups (gloo) as well.

The original code sets ``layer.activation = "identity"`` after construction for the last
normalisation of a residual branch; here the factory takes ``activation="identity"`` instead.
"""

from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = ("relu", "leaky_relu", "identity")

#: norm_act names whose layers scale by |weight| + eps (inplace_abn's in-place variants).
ABS_WEIGHT_NORM_ACTS = ("iabn", "iabn_sync", "iabn_sync_test")
NORM_ACTS = ("std", "abn") + ABS_WEIGHT_NORM_ACTS

#: activation slope of inplace_abn's leaky ReLU, used by every original.
LEAKY_RELU_SLOPE = 0.01


def apply_activation(x: torch.Tensor, activation: str, slope: float, inplace: bool = False) -> torch.Tensor:
    """Return ``relu(x)``, ``leaky_relu(x, slope)`` or ``x`` for ``activation``."""
    if activation == "relu":
        return F.relu(x, inplace=inplace)
    if activation == "leaky_relu":
        return F.leaky_relu(x, negative_slope=slope, inplace=inplace)
    if activation == "identity":
        return x
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def abs_plus_eps(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``|weight| + eps``, with derivative sign(weight) and +1 at weight == 0 (inplace_abn's backward)."""
    return torch.where(weight < 0, -weight, weight) + eps


class ABN(nn.BatchNorm2d):
    """BatchNorm2d followed by an activation: ``y = act(x_hat * s + bias)``.

    ``s = weight`` or, with ``abs_weight=True`` (inplace_abn's InPlaceABN), ``s = |weight| + eps``.

    Args:
        num_features: channels C of the (N, C, H, W) input.
        activation: ``"relu"``, ``"leaky_relu"`` or ``"identity"``.
        activation_param: negative slope of the leaky ReLU.
        abs_weight: use ``|weight| + eps`` as the scale.
        eps, momentum: as torch.nn.BatchNorm2d (1e-5, 0.1, the originals' values).
    """

    def __init__(
        self,
        num_features: int,
        activation: str = "leaky_relu",
        activation_param: float = LEAKY_RELU_SLOPE,
        abs_weight: bool = False,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.activation = activation
        self.activation_param = activation_param
        self.abs_weight = abs_weight

    def scale(self) -> torch.Tensor:
        """The per-channel factor applied to x_hat."""
        return abs_plus_eps(self.weight, self.eps) if self.abs_weight else self.weight

    def activate(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """This layer's activation function alone (residual blocks apply it after the sum)."""
        return apply_activation(x, self.activation, self.activation_param, inplace=inplace)

    def _momentum(self) -> float:
        """Count the batch and return the running-average factor (1/n for momentum None)."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``x_hat * s + bias`` with batch statistics (training) or running statistics (eval)."""
        momentum = self._momentum() if self.training else 0.0
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.scale(), self.bias, self.training, momentum, self.eps
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.size(1) != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expects (N, {self.num_features}, H, W), got {tuple(x.shape)}")
        # batch_norm returns a fresh tensor and its backward does not need it: activating in place is safe.
        return self.activate(self.normalize(x), inplace=True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # inplace_abn < 1.1 saved no num_batches_tracked; torch only fills it in for old metadata versions.
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = self.num_batches_tracked.clone() if not self.num_batches_tracked.is_meta else torch.tensor(0)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        scale = "abs(weight)+eps" if self.abs_weight else "weight"
        slope = f"({self.activation_param})" if self.activation == "leaky_relu" else ""
        return f"{super().extra_repr()}, activation={self.activation}{slope}, scale={scale}"


class SyncABN(ABN):
    """:class:`ABN` whose training statistics are those of the batch of all processes (InPlaceABNSync).

    Each process computes its per-channel count n_r, mean m_r and biased variance v_r (in float32,
    or in the input's precision when higher: float64 inputs stay float64);
    the statistics of all processes are exchanged with a differentiable all-reduce and combined as

        mu      = sum_r n_r m_r / N,             N = sum_r n_r
        sigma^2 = sum_r n_r (v_r + (m_r - mu)^2) / N

    so the gradients also flow across processes, as in inplace_abn's synchronised backward.
    Processes may hold different batch or spatial sizes.  Eval mode uses the running statistics
    and needs no process group.

    Args:
        group: the process group to synchronise over (None: the default group).
        other arguments: as :class:`ABN`.
    """

    def __init__(self, num_features: int, *args, group=None, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self.group = group

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().normalize(x)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "SyncABN (norm_act 'iabn_sync' with world_size > 1) is training but torch.distributed "
                "is not initialised; initialise the process group or build the model with world_size=1"
            )
        mean, var, count = self._global_statistics(x)
        with torch.no_grad():
            momentum = self._momentum()
            unbiased_var = var * count / (count - 1).clamp_min(1)
            self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
            self.running_var.mul_(1 - momentum).add_(momentum * unbiased_var.to(self.running_var.dtype))
        factor = self.scale().to(var.dtype) * torch.rsqrt(var + self.eps)
        shift = self.bias.to(var.dtype) - mean * factor
        y = x.to(var.dtype) * factor.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        return y.to(x.dtype)

    def _global_statistics(self, x: torch.Tensor):
        """(mean, biased variance, count) per channel over the inputs of every process."""
        return global_batch_statistics(x, self.group, type(self).__name__)


def global_batch_statistics(x: torch.Tensor, group=None, layer: str = "SyncABN"):
    """Per-channel ``(mean, biased variance, count)`` of ``x`` (N, C, ...) over every process of
    ``group`` (None: the default group), differentiable with respect to ``x``.

    Each process contributes its count n_r, mean m_r and biased variance v_r; they are combined as
    mu = sum_r n_r m_r / N and sigma^2 = sum_r n_r (v_r + (m_r - mu)^2) / N, N = sum_r n_r, so
    processes may hold different batch or spatial sizes. fp16/bf16 inputs are reduced in float32,
    float64 ones keep their precision. The exchange is one all-reduce of zero-padded per-rank slots
    (an all-gather that is differentiable on every backend, gloo included).
    """
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    dims = [0] + list(range(2, x.dim()))
    local_count = torch.full((x.size(1),), float(x.numel() // x.size(1)), device=x.device, dtype=xf.dtype)
    local_mean = xf.mean(dim=dims)
    local_var = xf.var(dim=dims, unbiased=False)
    local = torch.stack([local_count, local_mean, local_var])
    slots = [torch.zeros_like(local) for _ in range(world_size)]
    slots[rank] = local
    counts, means, variances = dist_fn.all_reduce(torch.stack(slots), group=group).unbind(1)
    count = counts.sum(0)
    mean = (counts * means).sum(0) / count
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / count
    if bool((count < 2).any()):
        raise ValueError(f"{layer} needs more than one value per channel over all processes, got input {tuple(x.shape)}")
    return mean, var, count


class SyncBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d whose training statistics are those of the batch of all processes, on any
    process group -- gloo on the CPU included, which ``torch.nn.SyncBatchNorm`` refuses (both its
    forward and DistributedDataParallel raise for CPU modules).

    In training, in a group of more than one process, the statistics come from
    :func:`global_batch_statistics`:

        y = (x - mu) / sqrt(sigma^2 + eps) * weight + bias          (mu, sigma^2 over all processes)
        running = (1 - momentum) * running + momentum * batch       (the unbiased global variance;
                                                                     momentum None: 1 / batches seen)

    with gradients flowing to every process's input through mu and sigma^2 -- the forward and
    backward of ``torch.nn.SyncBatchNorm``. Otherwise (eval mode, no group, a group of one) it is
    BatchNorm2d. The state dict is BatchNorm2d's. :func:`batch_norm_layer` picks this layer for
    CPU runs and keeps ``torch.nn.SyncBatchNorm`` (its CUDA kernels) for CUDA ones.

    Args:
        process_group: the group to synchronise over (None: the default group).
        other arguments: as torch.nn.BatchNorm2d.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.process_group = process_group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._synchronises():
            return super().forward(input)
        self._check_input_dim(input)
        mean, var, count = global_batch_statistics(input, self.process_group, type(self).__name__)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased_var = var * count / (count - 1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased_var.to(self.running_var.dtype))
        shape = (1, -1, 1, 1)
        y = (input.to(var.dtype) - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.to(var.dtype).view(shape) + self.bias.to(var.dtype).view(shape)
        return y.to(input.dtype)

    def _synchronises(self) -> bool:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.process_group) > 1


def batch_norm_layer(world_size: int, device_type: str) -> type:
    """The plain BatchNorm layer class for a model trained by ``world_size`` processes on
    ``device_type`` ("cuda" or "cpu"): BatchNorm2d for one process, torch.nn.SyncBatchNorm on CUDA
    (NCCL), :class:`SyncBatchNorm` on the CPU (gloo)."""
    if world_size <= 1:
        return nn.BatchNorm2d
    return nn.SyncBatchNorm if device_type == "cuda" else SyncBatchNorm


def make_norm_act(name: str, world_size: int = 1, activation: Optional[str] = None) -> Callable[..., ABN]:
    """Factory of normalisation + activation layers for ``--norm_act name``.

    Returns ``norm_act(num_features, activation=default, activation_param=0.01, ...) -> ABN``;
    residual blocks and the ASPP head call it with ``activation="identity"`` where the originals
    mark a layer as identity.  ``default`` is ``activation`` if given, else ``"relu"`` for ``std``
    and ``"leaky_relu"`` for the others.  ``iabn_sync`` gives :class:`SyncABN` only when
    ``world_size > 1``; with one process it is the same computation as ``iabn``.
    """
    if name not in NORM_ACTS:
        raise ValueError(f"unknown norm_act {name!r}; expected one of {NORM_ACTS}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    default_activation = activation or ("relu" if name == "std" else "leaky_relu")
    if default_activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {default_activation!r}; expected one of {ACTIVATIONS}")
    layer = SyncABN if name == "iabn_sync" and world_size > 1 else ABN
    return partial(layer, activation=default_activation, abs_weight=name in ABS_WEIGHT_NORM_ACTS)


def uses_abs_weight(norm_act: str) -> bool:
    """Whether layers trained with ``--norm_act norm_act`` store their scale as |weight| + eps."""
    if norm_act not in NORM_ACTS:
        raise ValueError(f"unknown norm_act {norm_act!r}; expected one of {NORM_ACTS}")
    return norm_act in ABS_WEIGHT_NORM_ACTS
