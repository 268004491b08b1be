"""NeST (Xie et al., ECCV 2024): the new classifier of a step is generated from the old ones and
pre-tuned before the step's normal training.

At every step t > 0, before the base method trains:

A. **Selection** (:func:`selection_statistics`). The frozen old model runs once over the step's
   training images. For new class ``c`` with pixels ``S_c`` (label map resized to a ``grid``), old
   class ``j`` and channel ``d``::

       M0[c, j, d] = (1 / |S_c|) Σ_{n ∈ S_c} p_n[j] · 1[f_n[d] · W[j, d] > 0]
       P0[c]       = softmax_j( Σ_d M0[c, j, d] )

   ``f_n`` is the old head output (``pre_logits``) and ``p_n`` the old softmax at pixel ``n``,
   both bilinearly resized to the grid; ``W`` (C_old × D) stacks the old classifiers, background
   first. The indicator is strict (a zero product counts 0).

B. **Transformation** (:class:`NestTransform`): learnable ``M`` (N × C_old × D), ``P`` (N × C_old),
   new biases ``b_new`` (N), a background channel mask ``m_bg`` (D) and scale ``s``, starting from
   ``M0``, ``P0``, the loaded background bias, ones and one. The classifier it defines::

       w_c   = Σ_j P[c, j] · (M[c, j] ⊙ W[j])          new rows, bias b_new[c]
       w_bg' = s · (m_bg ⊙ W[0])                        background row
       rows 1..C_old-1 and every old bias as loaded

C. **Pre-tuning** (:func:`pretune_classifier`): only the transformation is trained, for a few
   epochs, with the model in train mode and every model parameter frozen; unbiased (or plain)
   cross-entropy on the step's labels, SGD (momentum 0.9, Nesterov) with its own poly schedule.

D. **Installation** (:func:`install`): ``cls[t] ← w``; ``cls[t].bias ← b_new · ‖b_old‖ / ‖b_new‖``;
   background row ``← v · ‖W[0]‖ / ‖v‖`` with ``v = w_bg'``; then the new rows are rescaled to the
   old rows' mean norm (``align_weight('all')``). The background bias is not changed (no
   ``−log(N+1)`` as in MiB's balanced init, which NeST replaces). The transformation is discarded.

:func:`run_nest` chains A–D; :func:`done_record` / :func:`is_done` keep a resumed step from
pre-tuning a trained classifier again.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils import distributed as dist_utils
from utils.loss import UnbiasedCrossEntropy, UnbiasedKnowledgeDistillationLoss
from utils.scheduler import PolyLR

__all__ = [
    "NEST_STATE_KEY",
    "DATASET_DEFAULTS",
    "LOSSES",
    "BIAS_NORMS",
    "EMPTY_CLASS_RULES",
    "NestSettings",
    "SelectionAccumulator",
    "SelectionStatistics",
    "selection_statistics",
    "NestTransform",
    "pretune_logits",
    "GeneratedClassifier",
    "pretune_classifier",
    "rescaled_bias",
    "install",
    "NestOutcome",
    "run_nest",
    "check_model",
    "done_record",
    "is_done",
    "should_pretune",
]

NEST_STATE_KEY = "nest"
# Per-dataset defaults of the authors' scripts: pre-tuning epochs and lr multiplier.
DATASET_DEFAULTS = {"voc": {"epochs": 5, "lr_scale": 1.0}, "ade": {"epochs": 15, "lr_scale": 500.0}}
LOSSES = ("unce", "ce")
BIAS_NORMS = ("vector", "mean_abs")
EMPTY_CLASS_RULES = ("error", "uniform")
MOMENTUM = 0.9  # fixed in the published pre-tuning optimiser
IGNORE = 255


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
@dataclass
class NestSettings:
    """What the pre-tuning needs; each field is one ``--nest_*`` option (or a shared one).

    ``lr`` is the step's learning rate (``--lr``); the pre-tuning uses ``lr × lr_scale``.
    ``grid`` None: the selection grid is a quarter of each batch's image size (128 for 512 crops).
    """

    epochs: int = DATASET_DEFAULTS["voc"]["epochs"]
    lr_scale: float = DATASET_DEFAULTS["voc"]["lr_scale"]
    lr: float = 0.001
    loss: str = "unce"
    unkd: float = 0.0
    grid: Optional[int] = None
    legacy_bias_init: bool = False
    legacy_schedule: bool = False
    bias_norm: str = "vector"
    empty_class: str = "error"
    weight_decay: float = 1e-4
    lr_power: float = 0.9
    opt_level: str = "O0"
    max_nan_skips: int = 10

    def __post_init__(self):
        if int(self.epochs) != self.epochs or self.epochs < 1:
            raise ValueError(f"--nest_epochs must be a positive integer, got {self.epochs}")
        if not self.lr_scale > 0:
            raise ValueError(f"--nest_lr_scale must be positive, got {self.lr_scale}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive for the NeST pre-tuning, got {self.lr}")
        if self.loss not in LOSSES:
            raise ValueError(f"--nest_loss must be one of {LOSSES}, got {self.loss!r}")
        if self.unkd < 0:
            raise ValueError(f"--nest_unkd must be >= 0 (0 = off), got {self.unkd}")
        if self.grid is not None and (int(self.grid) != self.grid or self.grid < 1):
            raise ValueError(f"--nest_grid must be a positive integer (or unset: crop size / 4), got {self.grid}")
        if self.bias_norm not in BIAS_NORMS:
            raise ValueError(f"--nest_bias_norm must be one of {BIAS_NORMS}, got {self.bias_norm!r}")
        if self.empty_class not in EMPTY_CLASS_RULES:
            raise ValueError(f"--nest_empty_class must be one of {EMPTY_CLASS_RULES}, got {self.empty_class!r}")
        self.epochs = int(self.epochs)

    @property
    def tune_lr(self) -> float:
        return self.lr * self.lr_scale

    @classmethod
    def from_options(cls, opts) -> "NestSettings":
        """Settings from parsed options: ``--nest_*`` values, ``None`` meaning the dataset's
        default (:data:`DATASET_DEFAULTS`), plus ``--lr``, ``--weight_decay``, ``--lr_power``,
        ``--opt_level`` and ``--max_nan_skips``."""
        defaults = DATASET_DEFAULTS.get(getattr(opts, "dataset", "voc"), DATASET_DEFAULTS["voc"])

        def pick(name, fallback):
            value = getattr(opts, name, None)
            return fallback if value is None else value

        return cls(
            epochs=pick("nest_epochs", defaults["epochs"]),
            lr_scale=pick("nest_lr_scale", defaults["lr_scale"]),
            lr=opts.lr,
            loss=pick("nest_loss", "unce"),
            unkd=pick("nest_unkd", 0.0),
            grid=getattr(opts, "nest_grid", None),
            legacy_bias_init=bool(getattr(opts, "nest_legacy_bias_init", False)),
            legacy_schedule=bool(getattr(opts, "nest_legacy_schedule", False)),
            bias_norm=pick("nest_bias_norm", "vector"),
            empty_class=pick("nest_empty_class", "error"),
            weight_decay=pick("weight_decay", 1e-4),
            lr_power=pick("lr_power", 0.9),
            opt_level=pick("opt_level", "O0"),
            max_nan_skips=pick("max_nan_skips", 10),
        )


def check_model(model) -> None:
    """Refuse the layouts NeST's generator is not defined for (raises ``ValueError``)."""
    if len(model.cls) < 2:
        raise ValueError("NeST needs a new classifier: the model has one classifier only (step 0, or "
                         "--base_weights, which NeST does not support)")
    if getattr(model, "use_cosine", False):
        raise ValueError("NeST generates plain 1x1 classifiers: drop --cosine")
    if getattr(model, "nb_background_modes", 1) > 1:
        raise ValueError("NeST needs a single background channel: drop --nb_background_modes")
    if getattr(model, "unknown", False):
        raise ValueError("NeST cannot be combined with SSUL (channel 0 is the unknown class)")


def _old_rows(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The old classifiers as (C_old × D) weights and (C_old,) biases, detached, background first."""
    weight = torch.cat([conv.weight.detach().flatten(1) for conv in model.cls[:-1]])
    bias = torch.cat([conv.bias.detach() for conv in model.cls[:-1]])
    return weight.float(), bias.float()


# --------------------------------------------------------------------------------------------
# Stage A: selection statistics
# --------------------------------------------------------------------------------------------
@dataclass
class SelectionStatistics:
    """``mask`` = M0 (N × C_old × D), ``mix`` = P0 (N × C_old), ``counts`` = pixels per new class,
    ``empty`` = the new classes (0-based) without any pixel (filled by the ``uniform`` rule)."""

    mask: torch.Tensor
    mix: torch.Tensor
    counts: torch.Tensor
    empty: list = field(default_factory=list)


class SelectionAccumulator:
    """Running sums of the selection statistics, in the memory-light form

        Σ_n p_n[j] 1[f_n[d] W[j,d] > 0] = (Pᵀ F⁺)[j,d] · 1[W[j,d] > 0] + (Pᵀ F⁻)[j,d] · 1[W[j,d] < 0]

    with ``F⁺ = 1[f > 0]``, ``F⁻ = 1[f < 0]`` (pixels × D) and ``P`` the pixels' old
    probabilities (pixels × C_old): two (C_old × D) fp32 matrices per new class instead of a
    (pixels × C_old × D) product. Exact, including the strict indicator (zeros count 0).
    """

    def __init__(self, old_weight: torch.Tensor, n_new: int):
        self.old_weight = old_weight.detach().float()
        n_old, channels = self.old_weight.shape
        self.n_old, self.n_new = n_old, int(n_new)
        device = self.old_weight.device
        self.positive = torch.zeros(self.n_new, n_old, channels, device=device)
        self.negative = torch.zeros(self.n_new, n_old, channels, device=device)
        self.counts = torch.zeros(self.n_new, dtype=torch.long, device=device)

    def add(self, probs: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> None:
        """One set of pixels: ``probs`` (P × C_old), ``features`` (P × D), ``labels`` (P,) with the
        new classes at ids ``C_old .. C_old + N − 1`` (other ids are skipped)."""
        probs, features = probs.float(), features.float()
        local = labels.long() - self.n_old
        for k in torch.unique(local[(local >= 0) & (local < self.n_new)]).tolist():
            pixels = local == k
            p = probs[pixels]
            f = features[pixels]
            self.positive[k] += p.t() @ (f > 0).float()
            self.negative[k] += p.t() @ (f < 0).float()
            self.counts[k] += int(pixels.sum())

    def reduce_across_ranks(self) -> None:
        """Sum the three accumulators over the ranks (each rank saw its shard of the images)."""
        self.positive = dist_utils.all_reduce_sum(self.positive)
        self.negative = dist_utils.all_reduce_sum(self.negative)
        self.counts = dist_utils.all_reduce_sum(self.counts)

    def statistics(self, empty_class: str = "error") -> SelectionStatistics:
        """M0 = bucket / count, P0 = softmax of M0's row sums. A new class without pixels is an
        error (``empty_class='error'``) or gets M = 1, P = 1/C_old (``'uniform'``)."""
        if empty_class not in EMPTY_CLASS_RULES:
            raise ValueError(f"--nest_empty_class must be one of {EMPTY_CLASS_RULES}, got {empty_class!r}")
        bucket = (self.positive * (self.old_weight > 0) + self.negative * (self.old_weight < 0))
        empty = [k for k in range(self.n_new) if int(self.counts[k]) == 0]
        if empty and empty_class == "error":
            ids = ", ".join(str(self.n_old + k) for k in empty)
            raise ValueError(
                f"NeST selection: new class id(s) {ids} have no pixel in the step's training images at the "
                f"selection grid, so their statistics are undefined. Check the step's data, set a finer "
                f"--nest_grid, or pass --nest_empty_class uniform to start them from a uniform mix.")
        mask = bucket / self.counts.clamp_min(1).to(bucket.dtype)[:, None, None]
        for k in empty:
            mask[k] = 1.0
        mix = torch.softmax(mask.sum(dim=2), dim=1)
        for k in empty:
            mix[k] = 1.0 / self.n_old
        return SelectionStatistics(mask=mask, mix=mix, counts=self.counts.clone(), empty=empty)


def _grid_size(images: torch.Tensor, grid: Optional[int]) -> tuple[int, int]:
    if grid is not None:
        return int(grid), int(grid)
    height, width = images.shape[-2:]
    return max(height // 4, 1), max(width // 4, 1)


@torch.no_grad()
def selection_statistics(model_old, loader, device, classes: Sequence[int], grid: Optional[int] = None,
                         amp_dtype=None, empty_class: str = "error") -> SelectionStatistics:
    """Stage A over ``loader`` (this rank's shard of the step's training set), summed over ranks.

    ``classes``: the new model's per-step class counts (C_old = Σ classes[:-1], N = classes[-1]).
    Per batch: labels resized to the grid (nearest), the old model's logits (at input size) and
    head output resized to the grid (bilinear, align_corners=False), softmax over the C_old
    channels; then :class:`SelectionAccumulator`. The old model must be in eval mode (it runs no
    collective, so the ranks' shards may differ in length). ``amp_dtype``: the forward's autocast
    dtype (None = fp32); the statistics are accumulated in fp32.
    """
    n_old, n_new = sum(int(c) for c in classes[:-1]), int(classes[-1])
    old_weight = torch.cat([conv.weight.detach().flatten(1) for conv in model_old.cls]).to(device)
    if old_weight.shape[0] != n_old:
        raise ValueError(f"the old model has {old_weight.shape[0]} classifier rows but classes {list(classes)} "
                         f"give {n_old} old classes")
    accumulator = SelectionAccumulator(old_weight, n_new)
    for batch in loader:
        images = batch[0].to(device, torch.float32)
        labels = batch[1].to(device)
        size = _grid_size(images, grid)
        with _autocast(device, amp_dtype):
            logits, extras = model_old(images, wants=["pre_logits"])
        probs = torch.softmax(F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False), dim=1)
        features = F.interpolate(extras["pre_logits"].float(), size=size, mode="bilinear", align_corners=False)
        small_labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        accumulator.add(probs.permute(0, 2, 3, 1).reshape(-1, n_old),
                        features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]),
                        small_labels.reshape(-1))
    accumulator.reduce_across_ranks()
    return accumulator.statistics(empty_class)


# --------------------------------------------------------------------------------------------
# Stage B: the transformation
# --------------------------------------------------------------------------------------------
class NestTransform(nn.Module):
    """The learnable generator of the new classifier (see the module docstring, stage B).

    Parameters: ``mask`` M (N × C_old × D), ``mix`` P (N × C_old), ``new_bias`` b_new (N),
    ``bg_mask`` m_bg (D), ``bg_scale`` s (scalar).
    """

    def __init__(self, mask: torch.Tensor, mix: torch.Tensor, new_bias: torch.Tensor):
        super().__init__()
        n_new, n_old, channels = mask.shape
        if mix.shape != (n_new, n_old) or new_bias.shape != (n_new,):
            raise ValueError(f"mix {tuple(mix.shape)} and new_bias {tuple(new_bias.shape)} do not fit "
                             f"mask {tuple(mask.shape)}")
        self.mask = nn.Parameter(mask.detach().clone().float())
        self.mix = nn.Parameter(mix.detach().clone().float())
        self.new_bias = nn.Parameter(new_bias.detach().clone().float())
        self.bg_mask = nn.Parameter(torch.ones(channels, device=mask.device))
        self.bg_scale = nn.Parameter(torch.ones((), device=mask.device))

    @classmethod
    def initial(cls, statistics: SelectionStatistics, old_bias: torch.Tensor,
                legacy_bias_init: bool = False) -> "NestTransform":
        """M = M0, P = P0, m_bg = 1, s = 1; b_new = the loaded background bias for every new class,
        or (``legacy_bias_init``) one draw of PyTorch's conv-bias init U(−1/√D, 1/√D) shared by
        the new classes, as the published code's freshly built model gave."""
        n_new, _, channels = statistics.mask.shape
        if legacy_bias_init:
            bound = 1.0 / math.sqrt(channels)
            start = torch.empty((), device=statistics.mask.device).uniform_(-bound, bound)
        else:
            start = old_bias[0].detach().float().to(statistics.mask.device)
        return cls(statistics.mask, statistics.mix, start.expand(n_new))

    def new_weight(self, old_weight: torch.Tensor) -> torch.Tensor:
        """w_c = Σ_j P[c, j] · (M[c, j] ⊙ W[j]), shape (N × D)."""
        return torch.einsum("cj,cjd,jd->cd", self.mix, self.mask, old_weight)

    def background_weight(self, old_weight: torch.Tensor) -> torch.Tensor:
        """w_bg' = s · (m_bg ⊙ W[0]), shape (D,)."""
        return self.bg_scale * (self.bg_mask * old_weight[0])

    def classifier(self, old_weight: torch.Tensor, old_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The full stacked classifier used during pre-tuning: ((C_old + N) × D, (C_old + N,))."""
        weight = torch.cat([self.background_weight(old_weight)[None], old_weight[1:], self.new_weight(old_weight)])
        return weight, torch.cat([old_bias, self.new_bias])


def pretune_logits(model, images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   fold: Optional[bool] = None) -> torch.Tensor:
    """Logits of ``model`` with its classifiers replaced by ``(weight, bias)``, upsampled to the
    input size (bilinear, align_corners=False), as the model's own forward does.

    ``fold`` (default: when the head supports it) passes the classifier to the head as a
    projection folded into its linear maps, so the head output is never materialised; otherwise
    the head output is computed and a 1×1 convolution applied. Both give the same logits.
    """
    if fold is None:
        fold = _head_folds(model)
    if fold:
        small = model._features(images, with_attn_maps=False, project=(weight, bias), plain=False)["projected"]
    else:
        pre_logits = model._features(images, with_attn_maps=False)["pre_logits"]
        small = F.conv2d(pre_logits, weight[:, :, None, None], bias)
    return F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)


def _head_folds(model) -> bool:
    from modules.segformer_head import SATSHead

    return isinstance(model.head, SATSHead)


# --------------------------------------------------------------------------------------------
# Stage C: pre-tuning
# --------------------------------------------------------------------------------------------
@dataclass
class GeneratedClassifier:
    """The pre-tuned transformation's output, before installation (detached tensors).

    ``new_weight`` (N × D), ``new_bias`` (N,), ``background_weight`` v = s·(m_bg ⊙ W[0]) (D,);
    ``lrs``: the learning rate of every update; ``history``: per-epoch loss and lr; ``nan_skips``:
    updates skipped because the loss was not finite on some rank.
    """

    new_weight: torch.Tensor
    new_bias: torch.Tensor
    background_weight: torch.Tensor
    lrs: list = field(default_factory=list)
    history: list = field(default_factory=list)
    nan_skips: int = 0

    @classmethod
    def from_transform(cls, transform: NestTransform, old_weight: torch.Tensor, **extra) -> "GeneratedClassifier":
        with torch.no_grad():
            return cls(new_weight=transform.new_weight(old_weight).detach().clone(),
                       new_bias=transform.new_bias.detach().clone(),
                       background_weight=transform.background_weight(old_weight).detach().clone(), **extra)


@contextlib.contextmanager
def _frozen_in_train_mode(model):
    """Train mode (batch statistics, dropout) with every model parameter frozen; the previous
    ``requires_grad`` flags and mode are restored afterwards (so ``--fix_bn``/``--fix_pre_cls``
    freezing done before survives)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.train()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _iterations_per_epoch(loader, device) -> int:
    """``len(loader)``, the smallest over the ranks: in train mode a synchronised BatchNorm makes
    every forward a collective, so all ranks must run the same number of iterations."""
    n = len(loader)
    if dist_utils.get_world_size() > 1:
        value = torch.tensor([float(n)], device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        n = int(value.item())
    if n < 1:
        raise ValueError("NeST pre-tuning: the step's training loader yields no batch; lower --batch_size")
    return n


def _average_gradients(parameters) -> None:
    """Mean of the gradients over the ranks (one all-reduce of the flattened gradients)."""
    if dist_utils.get_world_size() <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    mean = dist_utils.all_reduce_mean(torch.cat([g.flatten() for g in grads]))
    for p, chunk in zip(parameters, mean.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).to(p.dtype)


def _all_finite(loss: torch.Tensor, device) -> bool:
    flag = torch.tensor([0.0 if torch.isfinite(loss.detach()) else 1.0], device=device)
    return float(dist_utils.all_reduce_sum(flag).item()) == 0


class _PretuneLoss:
    """Per-pixel UNCE (``old_cl = C_old``) or CE averaged over *all* pixels (ignored ones count as
    zeros, the repository's convention), plus ``unkd ×`` MiB's unbiased KD to the old logits."""

    def __init__(self, settings: NestSettings, n_old: int):
        self.criterion = UnbiasedCrossEntropy(old_cl=n_old if settings.loss == "unce" else 0, reduction="none")
        self.unkd = float(settings.unkd)
        self.distillation = UnbiasedKnowledgeDistillationLoss(reduction="mean") if self.unkd > 0 else None

    def __call__(self, logits, labels, old_logits=None) -> torch.Tensor:
        loss = self.criterion(logits.float(), labels).mean()
        if self.distillation is not None:
            loss = loss + self.unkd * self.distillation(logits.float(), old_logits.float())
        return loss


class _Pretuner:
    """One pre-tuning run: the transformation, its optimiser, schedule and loss scaler."""

    def __init__(self, settings: NestSettings, model, model_old, device, statistics, iterations: int):
        from train import amp_settings  # the project's opt_level mapping (imported late: train imports methods)

        self.settings, self.model, self.model_old, self.device = settings, model, model_old, device
        self.old_weight, self.old_bias = (t.to(device) for t in _old_rows(model))
        self.transform = NestTransform.initial(statistics, self.old_bias, settings.legacy_bias_init).to(device)
        self.parameters = list(self.transform.parameters())
        self.optimizer = torch.optim.SGD(self.parameters, lr=settings.tune_lr, momentum=MOMENTUM, nesterov=True,
                                         weight_decay=settings.weight_decay)
        self.scheduler = PolyLR(self.optimizer, settings.epochs * iterations, power=settings.lr_power)
        self.amp_dtype, use_scaler = amp_settings(settings.opt_level, device)
        self.scaler = torch.amp.GradScaler(device.type) if use_scaler else None
        self.loss = _PretuneLoss(settings, self.old_weight.shape[0])
        if settings.unkd > 0 and model_old is None:
            raise ValueError("--nest_unkd needs the old model")
        self.fold = _head_folds(model)
        self.lrs: list = []
        self.nan_skips = 0

    def iteration(self, batch) -> Optional[float]:
        images = batch[0].to(self.device, torch.float32, non_blocking=True)
        labels = batch[1].to(self.device, non_blocking=True).long()
        self.optimizer.zero_grad(set_to_none=True)
        old_logits = None
        if self.loss.distillation is not None:
            with torch.no_grad(), _autocast(self.device, self.amp_dtype):
                old_logits = self.model_old(images)[0]
        with _autocast(self.device, self.amp_dtype):
            weight, bias = self.transform.classifier(self.old_weight, self.old_bias)
            logits = pretune_logits(self.model, images, weight, bias, fold=self.fold)
        with torch.autocast(device_type=self.device.type, enabled=False):
            loss = self.loss(logits, labels, old_logits)
        if not _all_finite(loss, self.device):
            return self._skip()
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        _average_gradients(self.parameters)
        self._step()
        return float(loss.detach())

    def _step(self) -> None:
        # The published loop advanced the schedule before the update (its first update already
        # decayed, its last at lr 0); by default the order of the main training loop is used.
        if self.settings.legacy_schedule:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                self.scheduler.step()
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if not self.settings.legacy_schedule:
            self.scheduler.step()

    def _skip(self) -> None:
        self.nan_skips += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.nan_skips > self.settings.max_nan_skips:
            raise FloatingPointError(
                f"NeST pre-tuning: {self.nan_skips} updates skipped because the loss was NaN/Inf (limit "
                f"--max_nan_skips {self.settings.max_nan_skips}); lower --nest_lr_scale or use --opt_level O0")
        return None


def pretune_classifier(settings: NestSettings, model, model_old, loader, device, statistics: SelectionStatistics,
                       logger=None) -> GeneratedClassifier:
    """Stage C: train the transformation for ``settings.epochs`` epochs over ``loader``.

    ``model`` is the unwrapped new model with the previous step's weights loaded (not wrapped in
    DDP: the transformation's gradients are averaged over the ranks here). During the run the
    model is in train mode with every parameter frozen (batch statistics are used and BatchNorm's
    running statistics updated, as in the published runs); afterwards its mode and ``requires_grad``
    flags are restored. SGD (momentum 0.9, Nesterov, ``weight_decay``) at ``lr × lr_scale`` with
    poly decay over ``epochs × iterations``; autocast and loss scaling follow ``opt_level`` as in
    the main training. Every rank runs the same number of iterations. ``model_old`` is read only
    with ``unkd > 0``.
    """
    check_model(model)
    iterations = _iterations_per_epoch(loader, device)
    tuner = _Pretuner(settings, model, model_old, device, statistics, iterations)
    history = []
    with _frozen_in_train_mode(model):
        for epoch in range(settings.epochs):
            if hasattr(getattr(loader, "sampler", None), "set_epoch"):
                loader.sampler.set_epoch(epoch)
            losses = [tuner.iteration(batch) for batch in itertools.islice(loader, iterations)]
            history.append(_epoch_summary(tuner, epoch, [v for v in losses if v is not None], device))
            _log_epoch(logger, history[-1], settings.epochs)
    return GeneratedClassifier.from_transform(tuner.transform, tuner.old_weight, lrs=tuner.lrs, history=history,
                                              nan_skips=tuner.nan_skips)


def _epoch_summary(tuner: _Pretuner, epoch: int, losses: list, device) -> dict:
    mean = torch.tensor([sum(losses) / max(len(losses), 1)], device=device, dtype=torch.float64)
    with torch.no_grad():
        transform = tuner.transform
        return {"epoch": epoch, "loss": float(dist_utils.all_reduce_mean(mean).item()),
                "lr": tuner.optimizer.param_groups[0]["lr"],
                "new_weight_norm": float(transform.new_weight(tuner.old_weight).norm()),
                "new_bias_norm": float(transform.new_bias.norm()),
                "background_norm": float(transform.background_weight(tuner.old_weight).norm())}


def _log_epoch(logger, summary: dict, epochs: int) -> None:
    if logger is None:
        return
    logger.info(f"NeST pre-tuning epoch {summary['epoch'] + 1}/{epochs}: loss {summary['loss']:.4f}, "
                f"lr {summary['lr']:.6g}, |w_new| {summary['new_weight_norm']:.4f}, "
                f"|b_new| {summary['new_bias_norm']:.4f}, |w_bg| {summary['background_norm']:.4f}")
    if hasattr(logger, "add_scalar"):
        for name in ("loss", "lr", "new_weight_norm", "new_bias_norm", "background_norm"):
            logger.add_scalar(f"NeST/{name}", summary[name], summary["epoch"])


# --------------------------------------------------------------------------------------------
# Stage D: installation
# --------------------------------------------------------------------------------------------
def rescaled_bias(new_bias: torch.Tensor, old_bias: torch.Tensor, bias_norm: str = "vector") -> torch.Tensor:
    """``b_new · ‖b_old‖₂ / ‖b_new‖₂`` over the whole vectors (``vector``, the published rule: the
    installed magnitude grows like √C_old), or the ratio of mean absolute values (``mean_abs``).
    An all-zero ``b_new`` has no direction and is returned unchanged."""
    if bias_norm not in BIAS_NORMS:
        raise ValueError(f"--nest_bias_norm must be one of {BIAS_NORMS}, got {bias_norm!r}")
    if bias_norm == "vector":
        target, current = old_bias.norm(), new_bias.norm()
    else:
        target, current = old_bias.abs().mean(), new_bias.abs().mean()
    if float(current) == 0.0:
        return new_bias.clone()
    return new_bias * (target / current)


@torch.no_grad()
def install(model, generated: GeneratedClassifier, bias_norm: str = "vector") -> dict:
    """Stage D: write the generated classifier into ``model`` (unwrapped), in place.

    1. ``cls[t].weight ← w_new``;
    2. ``cls[t].bias ← rescaled_bias(b_new, old biases)`` (all C_old old biases, background included);
    3. background row ``← v · ‖W[0]‖ / ‖v‖``: the tuned direction (sign included) at the loaded norm
       (a zero ``v`` leaves the row as loaded); the background bias is kept;
    4. ``align_weight('all')``: the new rows scaled by mean‖old rows‖ / mean‖new rows‖, the old
       rows including the new background row.

    Returns the installed norms (for the logs).
    """
    check_model(model)
    new, background = model.cls[-1], model.cls[0]
    old_bias = torch.cat([conv.bias for conv in model.cls[:-1]]).float()
    device = new.weight.device
    n_new = new.weight.shape[0]
    if generated.new_weight.shape != new.weight.shape[:2]:
        raise ValueError(f"generated weights {tuple(generated.new_weight.shape)} do not fit cls[{len(model.cls) - 1}] "
                         f"{tuple(new.weight.shape[:2])}")
    new.weight.copy_(generated.new_weight.to(device).view_as(new.weight))
    new.bias.copy_(rescaled_bias(generated.new_bias.to(device).float(), old_bias, bias_norm).view(n_new))
    row = background.weight[0, :, 0, 0]
    v = generated.background_weight.to(device).float()
    if float(v.norm()) > 0:
        row.copy_(v * (row.float().norm() / v.norm()))
    model.align_weight("all")
    return {"new_weight_norm": float(new.weight.norm()), "new_bias": new.bias.detach().cpu().tolist(),
            "background_norm": float(row.norm())}


# --------------------------------------------------------------------------------------------
# The whole step, and its checkpoint record
# --------------------------------------------------------------------------------------------
@dataclass
class NestOutcome:
    statistics: SelectionStatistics
    generated: GeneratedClassifier
    installed: dict
    record: dict


def run_nest(settings: NestSettings, model, model_old, loader, device, selection_loader=None,
             logger=None) -> NestOutcome:
    """Stages A–D for one step > 0: selection over ``selection_loader`` (default ``loader``),
    pre-tuning over ``loader``, installation into ``model``. Call it on every rank, after the
    previous step's weights are loaded and before the optimiser and DDP wrapper are built.
    Returns the statistics, the generated classifier, the installed norms and :func:`done_record`.
    """
    check_model(model)
    amp_dtype = _selection_amp_dtype(settings, device)
    model_old.eval()
    statistics = selection_statistics(model_old, selection_loader if selection_loader is not None else loader,
                                      device, model.classes, settings.grid, amp_dtype, settings.empty_class)
    if logger is not None:
        logger.info(f"NeST selection: pixels per new class {statistics.counts.tolist()}"
                    + (f"; empty (uniform start): {statistics.empty}" if statistics.empty else ""))
    generated = pretune_classifier(settings, model, model_old, loader, device, statistics, logger)
    installed = install(model, generated, settings.bias_norm)
    if logger is not None:
        logger.info(f"NeST installed the new classifier: |w_new| {installed['new_weight_norm']:.4f}, "
                    f"b_new {[round(b, 4) for b in installed['new_bias']]}, |w_bg| {installed['background_norm']:.4f}")
    return NestOutcome(statistics, generated, installed, done_record(settings, statistics, generated))


def _selection_amp_dtype(settings: NestSettings, device):
    from train import amp_settings

    return amp_settings(settings.opt_level, device)[0]


def done_record(settings: NestSettings, statistics: SelectionStatistics,
                generated: Optional[GeneratedClassifier] = None) -> dict:
    """What a step's checkpoint stores under :data:`NEST_STATE_KEY` once the pre-tuning ran
    (plain Python values, ``weights_only``-loadable)."""
    record = {"done": True, "epochs": settings.epochs, "lr": settings.tune_lr, "lr_scale": settings.lr_scale,
              "loss": settings.loss, "unkd": settings.unkd, "bias_norm": settings.bias_norm,
              "counts": [int(c) for c in statistics.counts.tolist()], "empty": list(statistics.empty),
              "legacy": {"bias_init": settings.legacy_bias_init, "schedule": settings.legacy_schedule}}
    if generated is not None:
        record["nan_skips"] = generated.nan_skips
        record["final_loss"] = generated.history[-1]["loss"] if generated.history else None
    return record


def is_done(state: Optional[Mapping]) -> bool:
    """Whether a checkpoint (or the dict a plug-in stored its state in) records a finished
    pre-tuning: ``state['nest']['done']``, also looked up under ``state['trainer_state']``."""
    if not state:
        return False
    for holder in (state, state.get("trainer_state") or {}):
        record = holder.get(NEST_STATE_KEY) if isinstance(holder, Mapping) else None
        if isinstance(record, Mapping) and record.get("done") is True:
            return True
    return False


def should_pretune(step: int, resumed: Optional[Mapping] = None) -> bool:
    """NeST runs at steps > 0, unless the step is resumed from a checkpoint whose classifier was
    already pre-tuned and trained (``resumed`` = that checkpoint)."""
    return step > 0 and not is_done(resumed)
