"""SSUL (Cha et al., NeurIPS 2021) as clovaai/SSUL computes it, as pure tensor functions.

Channel layout (the one place it is defined; the model is built with per-task class counts
``[1, 1, n0 - 1, n1, n2, ...]``)::

    channel 0      unknown      (cls[0])
    channel 1      background   (cls[1])
    channel k + 1  class k      (k >= 1; old foreground classes in cls[2], step t's in cls[t + 2])

Label spaces: the datasets give targets in the usual step space (0 background, k class k,
255 ignore). :func:`ssul_targets` moves them to the channel space above, marking unknown pixels;
:func:`ssul_fold_unknown` brings predictions back (argmax 0 = background, k = class k).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from utils.reduce import channel_max

__all__ = [
    "UNKNOWN_CHANNEL",
    "BACKGROUND_CHANNEL",
    "UNKNOWN_HEAD",
    "BACKGROUND_HEAD",
    "SSUL_BACKGROUND_LR_FACTOR",
    "SSUL_DATASETS_WITHOUT_SALIENCY",
    "ssul_classes",
    "ssul_targets",
    "ssul_pseudo_label",
    "ssul_fold_unknown",
    "ssul_bce_loss",
    "ssul_trainable_parameters",
]

UNKNOWN_CHANNEL = 0
BACKGROUND_CHANNEL = 1
# Classifier modules (entries of model.cls) holding those single channels.
UNKNOWN_HEAD = 0
BACKGROUND_HEAD = 1
# SSUL trains the background classifier at step > 0 with lr * 1e-4.
SSUL_BACKGROUND_LR_FACTOR = 1e-4
# SSUL has no saliency maps for ADE20K: every background pixel of a training image is unknown.
SSUL_DATASETS_WITHOUT_SALIENCY = ("ade",)
_SSUL_DATASETS_WITH_SALIENCY = ("voc",)


def ssul_classes(per_task_classes: list[int]) -> list[int]:
    """Per-task class counts of the SSUL model: ``[n0, n1, ...]`` -> ``[1, 1, n0 - 1, n1, ...]``
    (``n0`` includes background)."""
    if not per_task_classes or per_task_classes[0] < 2:
        raise ValueError(
            f"per-task classes must start with the step-0 count including background (>= 2), got {per_task_classes}"
        )
    return [1, 1, per_task_classes[0] - 1] + list(per_task_classes[1:])


def ssul_targets(labels: torch.Tensor, saliency: Optional[torch.Tensor], dataset: str,
                 ignore_index: int = 255) -> torch.Tensor:
    """Step labels -> SSUL training targets (new tensor, same shape).

    ``ignore`` stays ``ignore``; every other label ``y`` becomes ``y + 1`` (background -> 1,
    class k -> k + 1); then background pixels that are salient (``saliency > 0``, VOC) become 0
    (unknown). For ADE20K (no saliency maps in SSUL) every background pixel becomes unknown and
    ``saliency`` is not used. Applied to train and memory samples alike, at every step.
    """
    dataset = dataset.lower()
    if dataset not in _SSUL_DATASETS_WITH_SALIENCY + SSUL_DATASETS_WITHOUT_SALIENCY:
        raise ValueError(f"SSUL targets are defined for voc and ade, got dataset {dataset!r}")
    targets = torch.where(labels == ignore_index, labels, labels + 1)
    background = targets == BACKGROUND_CHANNEL
    if dataset in SSUL_DATASETS_WITHOUT_SALIENCY:
        unknown = background
    else:
        if saliency is None:
            raise ValueError(f"SSUL on {dataset!r} needs the saliency maps (dataset built with saliency=True)")
        if saliency.shape != labels.shape:
            raise ValueError(f"saliency shape {tuple(saliency.shape)} differs from labels shape {tuple(labels.shape)}")
        unknown = background & (saliency.to(labels.device) > 0)
    return targets.masked_fill(unknown, UNKNOWN_CHANNEL)


def ssul_pseudo_label(targets: torch.Tensor, logits_old: torch.Tensor, threshold: float = 0.7) -> torch.Tensor:
    """SSUL pseudo-labels (step > 0), on targets already in the SSUL channel space.

    ``s = sigmoid(z_old)``; ``score, pred = max_c s_c, argmax_c s_c``; where
    ``target <= 1`` (unknown or background) and ``pred > 1`` (an old foreground class) and
    ``score >= threshold``: ``target := pred``. Ignore pixels are never changed (255 > 1).
    Returns a new tensor.
    """
    if logits_old.dim() != 4 or targets.shape != (logits_old.shape[0],) + tuple(logits_old.shape[2:]):
        raise ValueError(
            f"targets {tuple(targets.shape)} and logits_old {tuple(logits_old.shape)} must be (B, H, W) and (B, C, H, W)"
        )
    scores, predicted = channel_max(torch.sigmoid(logits_old.float()))
    relabel = (targets <= BACKGROUND_CHANNEL) & (predicted > BACKGROUND_CHANNEL) & (scores >= threshold)
    return torch.where(relabel, predicted, targets)


def ssul_fold_unknown(logits: torch.Tensor) -> torch.Tensor:
    """SSUL's evaluation: ``s = sigmoid(z)``; ``s_bg += s_unknown``; drop the unknown channel.

    ``(B, C, H, W)`` logits in the SSUL space -> ``(B, C - 1, H, W)`` scores in the usual label
    space (channel 0 background, k class k); ``argmax`` gives the prediction.
    """
    if logits.dim() < 2 or logits.shape[1] < 2:
        raise ValueError(f"SSUL logits need the unknown and background channels, got shape {tuple(logits.shape)}")
    scores = torch.sigmoid(logits.float())
    background = scores[:, BACKGROUND_CHANNEL:BACKGROUND_CHANNEL + 1] + scores[:, UNKNOWN_CHANNEL:UNKNOWN_CHANNEL + 1]
    return torch.cat([background, scores[:, BACKGROUND_CHANNEL + 1:]], dim=1)


def ssul_bce_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """SSUL's BCE with ignore index (its ``BCEWithLogitsLossWithIgnoreIndex``, reduction 'mean').

    ``L = (1 / |V|) * sum_{pixels in V} sum_c BCE(z_c, onehot(y)_c)`` with ``V`` the pixels whose
    target is not ``ignore_index``: channels are summed, pixels averaged over non-ignored ones
    only (unlike MiB's pixel mean). With no valid pixel the loss is 0 (SSUL gives nan).
    """
    if logits.dim() != 4 or targets.shape != (logits.shape[0],) + tuple(logits.shape[2:]):
        raise ValueError(
            f"targets {tuple(targets.shape)} and logits {tuple(logits.shape)} must be (B, H, W) and (B, C, H, W)"
        )
    channels = logits.shape[1]
    valid = targets != ignore_index
    if bool(((targets < 0) | (targets >= channels))[valid].any()):
        raise ValueError(f"targets must lie in [0, {channels}) or equal {ignore_index}")
    one_hot = F.one_hot(torch.where(valid, targets, 0), channels).permute(0, 3, 1, 2).to(logits.dtype)
    per_pixel = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none").sum(dim=1)
    if not bool(valid.any()):
        return per_pixel.sum() * 0.0
    return per_pixel[valid].mean()


def ssul_trainable_parameters(model: torch.nn.Module, lr: float,
                              background_lr_factor: float = SSUL_BACKGROUND_LR_FACTOR) -> list[dict]:
    """Freeze the model except what SSUL trains at step > 0 and return the optimiser groups.

    Trained (``requires_grad=True``): the classifier of the current step ``cls[-1]`` (lr), the
    unknown classifier ``cls[0]`` (lr) and the background classifier ``cls[1]``
    (``lr * background_lr_factor``, 1e-4 in SSUL). Everything else (body, head, old classifiers)
    gets ``requires_grad=False``; keeping BatchNorm in eval mode is the trainer's job
    (``model.fix_bn()`` after every ``train()``). ``model`` may be wrapped in DDP.
    """
    module = getattr(model, "module", model)
    classifiers = getattr(module, "cls", None)
    if classifiers is None or not hasattr(module, "classes"):
        raise ValueError("ssul_trainable_parameters expects an IncrementalSegmentationModule (attributes cls, classes)")
    classes = list(module.classes)
    if len(classes) < 4 or classes[UNKNOWN_HEAD] != 1 or classes[BACKGROUND_HEAD] != 1:
        raise ValueError(
            f"SSUL step > 0 needs classes laid out as [1, 1, n0 - 1, n1, ...], got {classes}"
        )
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    groups = [
        {"name": "ssul_new", "params": list(classifiers[-1].parameters()), "lr": lr},
        {"name": "ssul_unknown", "params": list(classifiers[UNKNOWN_HEAD].parameters()), "lr": lr},
        {"name": "ssul_background", "params": list(classifiers[BACKGROUND_HEAD].parameters()),
         "lr": lr * background_lr_factor},
    ]
    for group in groups:
        for parameter in group["params"]:
            parameter.requires_grad_(True)
    return groups
