"""Losses of the continual-segmentation baselines: LwF, LwF-MC (iCaRL), ILT, MiB and PLOP.

Every loss here computes what the original repositories compute (MiB ``utils/loss.py`` at
``1c58983``, PLOP ``utils/loss.py`` and ``train.py`` at ``4b4a060``; SATS copies PLOP), with the
same names, constructor and ``forward`` signatures, and the same scale conventions, because the
method presets' weights were tuned for them:

* label-255 ("ignore") pixels count in the denominator of the trainer's pixel mean (it builds the
  criteria with ``reduction='none'`` and calls ``.mean()`` on the ``B x H x W`` map);
* KD and unbiased KD average over the old channels (divide by ``C_o``) and include ignored pixels;
* PLOP's POD (``utils.pod``, re-exported here) ignores its ``normalize`` argument (always
  ``False``).

What is *not* copied: in-place edits of the caller's tensors, crashes
(unbiased KD without new classes, ``prepro="abs"``, masked POD with ``normalize_per_scale="spm"``)
and options that the original reads but ignores (they raise a ``ValueError`` here).

All computations run in float32 (inputs are cast with ``.float()``), so AMP runs keep the
distillation terms exact.

Shapes: logits are ``B x C x H x W`` (any number of trailing spatial dims where noted), labels
``B x H x W`` integers. ``C_o`` is the number of channels of the old model (background and all
classes of past steps), ``C`` the number of channels of the current model.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "UnbiasedCrossEntropy",
    "KnowledgeDistillationLoss",
    "UnbiasedKnowledgeDistillationLoss",
    "BCEWithLogitsLossWithIgnoreIndex",
    "IcarlLoss",
    "icarl_distillation",
    "features_l2",
    "PodMapOptions",
    "resolve_pod_options",
    "spatial_pod",
    "global_pod",
    "local_pod",
    "features_distillation",
]

REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# argument checks and small shared pieces
# --------------------------------------------------------------------------------------------

def _check_reduction(reduction: str) -> str:
    # The originals treat any unknown string as 'none'; a typo should not silently change the loss.
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _mean_over_valid(loss: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``loss`` over ``valid`` positions; 0 (kept in the graph) when none is valid.

    The originals take the mean of an empty selection there, i.e. NaN, which would poison the
    weights of a batch whose pixels are all ignored.
    """
    count = valid.sum()
    total = (loss * valid).sum()
    return torch.where(count > 0, total / count.clamp(min=1), total * 0.0)


def _check_logits(name: str, x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or x.dim() < 2:
        raise ValueError(f"{name} must be a tensor of shape B x C x ..., got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")


def _check_labels(name: str, labels: torch.Tensor, logits: torch.Tensor) -> None:
    if not torch.is_tensor(labels) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer label tensor, got "
                         f"{labels.dtype if torch.is_tensor(labels) else type(labels).__name__}")
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(labels.shape)}, expected {expected} "
                         f"(the logits' shape {tuple(logits.shape)} without the channel axis)")


def _check_label_range(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    valid = labels != ignore_index
    out_of_range = valid & ((labels < 0) | (labels >= num_classes))
    if bool(out_of_range.any()):
        bad = labels[out_of_range].unique()[:5].tolist()
        raise ValueError(f"labels {bad} are outside [0, {num_classes}) and are not the ignore "
                         f"index {ignore_index}")


def _check_teacher(inputs: torch.Tensor, targets: torch.Tensor) -> None:
    _check_logits("inputs", inputs)
    _check_logits("targets", targets)
    if inputs.shape[0] != targets.shape[0] or inputs.shape[2:] != targets.shape[2:]:
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must "
                         "share batch and spatial sizes")
    if targets.shape[1] > inputs.shape[1]:
        raise ValueError(f"the old model has {targets.shape[1]} channels, more than the new "
                         f"model's {inputs.shape[1]}")


def _apply_pixel_mask(loss: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return loss
    if tuple(mask.shape) != tuple(loss.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the per-pixel shape "
                         f"{tuple(loss.shape)}")
    return loss * mask.float()


def _one_hot_ignoring(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """``B x C x ...`` float one-hot of ``labels``; ignored pixels get an all-zero row."""
    _check_label_range(labels, num_classes, ignore_index)
    labels = labels.long()
    # Send ignored pixels to an extra class and drop its column: their row is then all zeros.
    parked = torch.where(labels != ignore_index, labels, torch.full_like(labels, num_classes))
    one_hot = F.one_hot(parked, num_classes + 1)[..., :num_classes]
    return one_hot.movedim(-1, 1).float()


# --------------------------------------------------------------------------------------------
# classification criteria
# --------------------------------------------------------------------------------------------

class UnbiasedCrossEntropy(nn.Module):
    """MiB's unbiased cross-entropy (MiB/PLOP ``UnbiasedCrossEntropy``).

    With ``D = logsumexp_{c<C} z_c`` per pixel, the log-probabilities are

    * ``o_0 = logsumexp_{c<C_o} z_c - D``: background *and every old class* merged (the old model
      labelled them all background);
    * ``o_c = z_c - D`` for the new classes ``c >= C_o``;

    and every label ``< C_o`` is read as 0. The loss is ``-o_y`` per pixel, 0 at ``ignore_index``
    (and at ``mask``, whose pixels are ignored: PLOP's ``ce_on_pseudo``). Reductions: ``'none'``
    gives the ``B x H x W`` map (the trainers take its mean over *all* pixels, ignored ones
    included); ``'mean'`` averages over non-ignored pixels only (``F.nll_loss``); ``'sum'``.

    Reproduces MiB's fixed version (commit ``1c58983``): the caller's label tensor is never
    modified (the earlier code relabelled it in place). ``old_cl = 0`` gives the plain
    cross-entropy, as in the original.
    """

    def __init__(self, old_cl: Optional[int] = None, reduction: str = "mean",
                 ignore_index: int = 255):
        super().__init__()
        if old_cl is None or int(old_cl) != old_cl or old_cl < 0:
            raise ValueError(f"old_cl must be the number of old channels (an int >= 0), got "
                             f"{old_cl!r}")
        self.old_cl = int(old_cl)
        self.reduction = _check_reduction(reduction)
        self.ignore_index = ignore_index

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_logits("inputs", inputs)
        _check_labels("targets", targets, inputs)
        num_channels = inputs.shape[1]
        if self.old_cl > num_channels:
            raise ValueError(f"old_cl={self.old_cl} exceeds the {num_channels} channels of inputs")
        _check_label_range(targets, num_channels, self.ignore_index)

        log_probs = self._unbiased_log_probs(inputs.float())
        labels = torch.where(targets < self.old_cl, torch.zeros_like(targets), targets).long()
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != targets.shape:
                raise ValueError(f"mask must be a bool tensor of shape {tuple(targets.shape)}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
            labels = torch.where(mask, torch.full_like(labels, self.ignore_index), labels)

        loss = F.nll_loss(log_probs, labels, ignore_index=self.ignore_index, reduction="none")
        if self.reduction == "mean":
            return _mean_over_valid(loss, labels != self.ignore_index)
        return _reduce(loss, self.reduction)

    def _unbiased_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        old_cl = self.old_cl
        den = torch.logsumexp(logits, dim=1, keepdim=True)
        new = logits[:, old_cl:] - den
        if old_cl == 0:
            return new
        merged_old = torch.logsumexp(logits[:, :old_cl], dim=1, keepdim=True) - den
        # Channels 1..C_o-1 are never addressed (their labels were mapped to 0).
        unused = torch.zeros_like(logits[:, 1:old_cl])
        return torch.cat([merged_old, unused, new], dim=1)


class BCEWithLogitsLossWithIgnoreIndex(nn.Module):
    """Binary cross-entropy on one-hot targets, summed over channels (MiB/PLOP/SSUL).

    Per pixel ``l = sum_c BCEWithLogits(z_c, [y = c])``; a pixel labelled ``ignore_index`` has an
    all-zero one-hot row and counts as *not valid*. ``weight`` (SSUL's optional per-pixel weight)
    multiplies ``l``. Reductions, exactly as MiB and SSUL (they agree):

    * ``'mean'``: mean of ``l`` over valid pixels only (0 when there is none; the originals give
      NaN there);
    * ``'sum'``: sum over valid pixels;
    * ``'none'``: ``l`` times 1 (valid) or 0 (ignored), ``B x H x W``; MiB/PLOP's trainer then
      averages over *all* pixels, which SATS's SSUL also does.

    So SSUL (``reduction='mean'``) averages over non-ignored pixels while LwF-MC through MiB's
    trainer (``'none'`` + ``.mean()``) counts ignored pixels in the denominator.
    """

    def __init__(self, reduction: str = "mean", ignore_index: int = 255):
        super().__init__()
        self.reduction = _check_reduction(reduction)
        self.ignore_index = ignore_index

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_logits("inputs", inputs)
        _check_labels("targets", targets, inputs)
        one_hot = _one_hot_ignoring(targets, inputs.shape[1], self.ignore_index)
        loss = F.binary_cross_entropy_with_logits(inputs.float(), one_hot, reduction="none")
        loss = loss.sum(dim=1)
        if weight is not None:
            loss = loss * weight.float()
        valid = one_hot.sum(dim=1)
        if self.reduction == "mean":
            return _mean_over_valid(loss, valid)
        return _reduce(loss * valid, self.reduction)


# --------------------------------------------------------------------------------------------
# output distillation
# --------------------------------------------------------------------------------------------

class _OutputDistillation(nn.Module):
    """Shared by the two KD losses: ``reduction``, the teacher temperature ``alpha`` and
    ``q = softmax(alpha * z_old)``."""

    def __init__(self, reduction: str = "mean", alpha: float = 1.):
        super().__init__()
        self.reduction = _check_reduction(reduction)
        self.alpha = alpha

    def teacher(self, targets: torch.Tensor, probs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``probs``, when given, is this softmax already computed by the caller."""
        if probs is not None:
            if probs.shape != targets.shape:
                raise ValueError(f"teacher probabilities {tuple(probs.shape)} must have the old logits' "
                                 f"shape {tuple(targets.shape)}")
            return probs.float()
        targets = targets.float()
        return torch.softmax(targets if self.alpha == 1 else targets * self.alpha, dim=1)


class KnowledgeDistillationLoss(_OutputDistillation):
    """LwF / ILT knowledge distillation on the old channels (MiB/PLOP, same name).

    ``inputs`` = new logits ``z`` (``C`` channels), ``targets`` = old logits ``z_old`` (``C_o``).
    Per pixel::

        l = -(1 / C_o) * sum_{c < C_o} softmax(alpha * z_old)_c * log_softmax(z[:, :C_o])_c

    i.e. the student's softmax runs over its first ``C_o`` channels only, ``alpha`` scales the
    teacher logits only, and the cross-entropy is *averaged* over the old channels (a convention of
    the original that sets the loss scale; reproduced). ``mask`` multiplies the per-pixel loss;
    ``'mean'`` still divides by every pixel, ignored (label 255) pixels included.
    """

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                mask: Optional[torch.Tensor] = None, teacher: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_teacher(inputs, targets)
        old_channels = targets.shape[1]
        log_student = torch.log_softmax(inputs.float()[:, :old_channels], dim=1)
        teacher = self.teacher(targets, teacher)
        loss = -(log_student * teacher).mean(dim=1)
        return _reduce(_apply_pixel_mask(loss, mask), self.reduction)


class UnbiasedKnowledgeDistillationLoss(_OutputDistillation):
    """MiB's unbiased knowledge distillation (MiB/PLOP ``UnbiasedKnowledgeDistillationLoss``).

    With ``D = logsumexp_{c<C} z_c`` over all new channels and ``q = softmax(alpha * z_old)``::

        log p_bg = logsumexp_{c in {0} U [C_o, C)} z_c - D    (new background + all new classes)
        log p_c  = z_c - D                                       for c = 1 .. C_o - 1
        l = -(1 / C_o) * (q_0 * log p_bg + sum_{c=1}^{C_o-1} q_c * log p_c)

    The division by ``C_o`` (background included) and the mean over all pixels (label-255 pixels
    included) are the original's scale, reproduced. ``mask`` multiplies the per-pixel loss.
    The original slices the old classes as ``1:-N`` (``N`` new classes), which is empty when a step
    adds no class; this slices ``1:C_o``, the same channels whenever ``N > 0``.

    The per-pixel loss is one autograd node on ``log_softmax(z)`` with its closed-form gradient
    (see ``_UnbiasedKDMap``), instead of the dozen slicing nodes of the written-out formula;
    ``log_probs`` takes that log-softmax when the caller already has it (the trainer shares it
    with the cross-entropy criterion).
    """

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                mask: Optional[torch.Tensor] = None, teacher: Optional[torch.Tensor] = None,
                log_probs: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_teacher(inputs, targets)
        if log_probs is None:
            log_probs = torch.log_softmax(inputs.float(), dim=1)
        elif log_probs.shape != inputs.shape:
            raise ValueError(f"log_probs {tuple(log_probs.shape)} must have the logits' shape {tuple(inputs.shape)}")
        loss = _UnbiasedKDMap.apply(log_probs, self.teacher(targets, teacher))
        return _reduce(_apply_pixel_mask(loss, mask), self.reduction)


class _UnbiasedKDMap(torch.autograd.Function):
    """Per-pixel unbiased KD from ``log p = log_softmax(z)`` and the teacher ``q``, shape (B, ...)::

        l = -(1 / C_o) * (q_0 * log p_bg + sum_{c=1}^{C_o-1} q_c * log p_c),
        log p_bg = logsumexp_{j in {0} U [C_o, C)} log p_j

    Gradient with respect to ``log p`` (``q`` is a constant)::

        dl/dlog p_j = -q_j / C_o                 for 1 <= j < C_o
                      -q_0 * r_j / C_o,  r_j = exp(log p_j - log p_bg) <= 1, for j = 0 and j >= C_o

    Through the log-softmax this gives ``dl/dz_j = (p_j - t_j) / C_o`` with ``t`` the above
    targets: a soft cross-entropy whose target splits ``q_0`` over the background group in
    proportion to the student's own probabilities.
    """

    @staticmethod
    def forward(ctx, log_p: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        old_channels = teacher.shape[1]
        log_bg = log_p[:, 0]
        if log_p.shape[1] > old_channels:
            log_bg = torch.logaddexp(log_bg, torch.logsumexp(log_p[:, old_channels:], dim=1))
        # sum_{c < C_o} q_c log p_c, then swap the background term: q_0 (log p_bg - log p_0)
        cross = torch.linalg.vecdot(teacher, log_p[:, :old_channels], dim=1)
        loss = (cross + teacher[:, 0] * (log_bg - log_p[:, 0])).div_(-old_channels)
        ctx.save_for_backward(log_p, teacher, log_bg)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        log_p, teacher, log_bg = ctx.saved_tensors
        old_channels = teacher.shape[1]
        q0, log_bg = teacher[:, :1], log_bg.unsqueeze(1)
        grad = torch.empty_like(log_p)
        grad[:, 1:old_channels] = teacher[:, 1:]
        torch.mul((log_p[:, :1] - log_bg).exp_(), q0, out=grad[:, :1])
        if grad.shape[1] > old_channels:
            torch.mul((log_p[:, old_channels:] - log_bg).exp_(), q0, out=grad[:, old_channels:])
        grad *= grad_loss.unsqueeze(1) / -old_channels
        return grad, None


class IcarlLoss(nn.Module):
    """Disjoint iCaRL criterion (``--icarl_disjoint``; MiB/PLOP ``IcarlLoss``).

    ``output_old`` are the old model's *probabilities* ``sigmoid(z_old)`` (``C_o`` channels), as the
    trainers pass them. Target ``t``: the one-hot labels over ``C`` channels (all-zero row at
    ``ignore_index``), with channels ``[0, C_o)`` replaced by ``output_old`` (``bkg=True``: only
    ``[1, C_o)``, the ground-truth background is kept). Per pixel
    ``l = sum_c BCEWithLogits(z_c, t_c)``; ``'mean'`` averages over *all* pixels (ignored pixels
    included: their old channels still carry the old model's probabilities), ``'sum'``, ``'none'``.
    """

    def __init__(self, reduction: str = "mean", ignore_index: int = 255, bkg: bool = False):
        super().__init__()
        self.reduction = _check_reduction(reduction)
        self.ignore_index = ignore_index
        self.bkg = bkg

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                output_old: torch.Tensor) -> torch.Tensor:
        _check_logits("inputs", inputs)
        _check_labels("targets", targets, inputs)
        _check_teacher(inputs, output_old)
        one_hot = _one_hot_ignoring(targets, inputs.shape[1], self.ignore_index)
        old_channels = output_old.shape[1]
        first_replaced = 1 if self.bkg else 0
        soft_targets = torch.cat([one_hot[:, :first_replaced],
                                  output_old.float()[:, first_replaced:],
                                  one_hot[:, old_channels:]], dim=1)
        loss = F.binary_cross_entropy_with_logits(inputs.float(), soft_targets, reduction="none")
        return _reduce(loss.sum(dim=1), self.reduction)


def icarl_distillation(inputs: torch.Tensor, outputs_old: torch.Tensor) -> torch.Tensor:
    """The distillation term of the combined LwF-MC (iCaRL) loss, without its importance weight.

    ``inputs`` = new logits ``z`` (``C`` channels), ``outputs_old`` = old *logits* ``z_old``
    (``C_o`` channels)::

        C_o * mean_{B, C_o, H, W} BCEWithLogits(z[:, :C_o], sigmoid(z_old))

    ``nn.BCEWithLogitsLoss(reduction='mean')`` times ``C_o``, as the trainers write it: a sum over
    the old classes averaged over all pixels (ignored pixels included). The trainer multiplies it
    by ``icarl_importance``.
    """
    _check_teacher(inputs, outputs_old)
    old_channels = outputs_old.shape[1]
    bce = F.binary_cross_entropy_with_logits(inputs.float()[:, :old_channels],
                                             torch.sigmoid(outputs_old.float()), reduction="mean")
    return old_channels * bce


def features_l2(features_new: torch.Tensor, features_old: torch.Tensor) -> torch.Tensor:
    """ILT's feature distillation: ``mean((f_new - f_old)^2)`` over all elements (``nn.MSELoss()``).

    The trainer multiplies it by ``loss_de``; ``f`` is the backbone output ``features['body']``.
    """
    if features_new.shape != features_old.shape:
        raise ValueError(f"new features {tuple(features_new.shape)} and old features "
                         f"{tuple(features_old.shape)} must have the same shape")
    return F.mse_loss(features_new.float(), features_old.float())


# PLOP's POD lives in its own module; re-exported so every loss imports from here.
from utils.pod import (PodMapOptions, features_distillation, global_pod, local_pod,  # noqa: E402,F401
                       resolve_pod_options, spatial_pod)
# SATS's attention-transfer loss lives in its own module; re-exported so every loss imports from here.
from utils.sats import sats_loss  # noqa: E402,F401
