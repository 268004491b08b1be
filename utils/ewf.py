"""EWF, endpoints weight fusion (Xiao et al., CVPR 2023): at the end of every step t > 0 the trained
weights θ_t are averaged with the weights θ*_{t−1} the step started from::

    θ*_t = (1 − α_t) · θ*_{t−1} + α_t · θ_t,      α_t = sqrt(N_new / (N_old + N_new))

with one scalar for the whole network. ``N_old`` counts every class of the earlier steps,
background included, ``N_new`` the classes of step t (the task table's counts, not channels).
Every floating-point state entry the old endpoint has is fused, BatchNorm running statistics
included (linearly: the fused variance is the mean of the two variances). Integer buffers
(``num_batches_tracked``) keep the new endpoint's value; the newest classifier, which only the new
endpoint has, is kept as trained. The fused weights replace the step's checkpoint: they are what
is tested and what the next step loads (its old endpoint is then the fused file).

The fusion is usually combined with ``--fix_pre_cls`` (:func:`freeze_old_classifiers`): the old
classifiers stay as loaded during the step, so fusing them changes only what the base method's
initialisation moved (MiB's background bias).
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from utils.checkpoint import load_checkpoint, save_atomic, strip_prefix

__all__ = [
    "EWF_STATE_KEY",
    "ORIGINAL_THRESHOLD_FRACTION",
    "ewf_alpha",
    "check_alpha",
    "fuse_state_dicts",
    "FusionReport",
    "fuse_checkpoint",
    "is_fused",
    "unfused_path",
    "old_classifier_names",
    "freeze_old_classifiers",
]

EWF_STATE_KEY = "ewf"
ORIGINAL_THRESHOLD_FRACTION = 0.45  # the published ``--threshold_choice`` variant
PREFIX = "module."


def ewf_alpha(classes: Sequence[int]) -> float:
    """α = sqrt(classes[-1] / Σ classes) for the per-step class counts of the step (step 0's count
    including background), e.g. ``[16, 1]`` → sqrt(1/17) = 0.242536."""
    counts = [int(c) for c in classes]
    if len(counts) < 2 or any(c < 1 for c in counts):
        raise ValueError(f"EWF needs the class counts of a step > 0 (at least two positive counts), got {counts}")
    return math.sqrt(counts[-1] / sum(counts))


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--ewf_alpha must be in [0, 1] (the new endpoint's weight), got {alpha}")
    return alpha


def _check_fraction(fraction: Optional[float]) -> Optional[float]:
    if fraction is None:
        return None
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--ewf_threshold_fraction must be in (0, 1], got {fraction}")
    return fraction


def _pairs(old: Mapping, new: Mapping) -> tuple[list, list]:
    """``(fused, kept)``: fused = [(new key, old tensor, new tensor)] for the floating-point
    entries both endpoints hold; kept = new keys whose value is the new endpoint's. Keys are
    matched without the DDP ``module.`` prefix, so either side may carry it."""
    new_keys = {key[len(PREFIX):] if key.startswith(PREFIX) else key: key for key in new}
    old = strip_prefix(old, PREFIX)
    missing = [key for key in old if key not in new_keys]
    if missing:
        raise ValueError(f"EWF: {len(missing)} entries of the old endpoint are missing from the new one "
                         f"(e.g. {missing[:4]}); both must come from the same model")
    fused, matched = [], set()
    for key, old_value in old.items():
        new_key = new_keys[key]
        new_value = new[new_key]
        if tuple(old_value.shape) != tuple(new_value.shape):
            raise ValueError(f"EWF: {key} has shape {tuple(old_value.shape)} in the old endpoint and "
                             f"{tuple(new_value.shape)} in the new one")
        if old_value.is_floating_point() and new_value.is_floating_point():
            fused.append((new_key, old_value, new_value))
            matched.add(new_key)
    kept = [key for key in new if key not in matched]
    return fused, kept


def _threshold(fused: list, fraction: float) -> float:
    """The k-th largest |old − new| over every fused element, k = int(fraction · #elements)
    (exact ``kthvalue`` on the concatenation); +inf when k = 0 (nothing is fused)."""
    deltas = torch.cat([(n.float() - o.float()).abs().flatten().cpu() for _, o, n in fused])
    k = int(fraction * deltas.numel())
    if k == 0:
        return math.inf
    return float(torch.kthvalue(deltas, deltas.numel() - k + 1).values)


def fuse_state_dicts(old: Mapping, new: Mapping, alpha: float,
                     threshold_fraction: Optional[float] = None) -> OrderedDict:
    """``(1 − α)·old + α·new`` for every floating-point entry of ``old``, in the new endpoint's key
    order and naming, computed in fp32 (fp64 entries in fp64) and stored in the new entry's dtype.

    - entries only in ``new`` (the newest classifier) and non-floating entries (integer buffers
      such as ``num_batches_tracked``) keep the new value;
    - an entry only in ``old`` or with another shape is an error (``ValueError``);
    - ``threshold_fraction`` f: only the elements whose |old − new| is at least the k-th largest
      over the whole model (k = int(f · #elements)) are fused, the others keep the new value.
    """
    alpha = check_alpha(alpha)
    fraction = _check_fraction(threshold_fraction)
    fused, _ = _pairs(old, new)
    tau = _threshold(fused, fraction) if fraction is not None and fused else None
    result = OrderedDict((key, value) for key, value in new.items())
    for key, old_value, new_value in fused:
        compute = torch.float64 if new_value.dtype == torch.float64 else torch.float32
        o, n = old_value.to(new_value.device, compute), new_value.to(compute)
        mixed = (1.0 - alpha) * o + alpha * n
        if tau is not None:
            mixed = torch.where((n - o).abs() < tau, n, mixed)
        result[key] = mixed.to(new_value.dtype)
    return result


def _mean_abs_delta(old: Mapping, new: Mapping) -> dict:
    """Mean |new − old| per top-level module (``body``, ``head``, ``cls``) over the fused entries."""
    fused, _ = _pairs(old, new)
    sums: dict = {}
    for key, o, n in fused:
        top = (key[len(PREFIX):] if key.startswith(PREFIX) else key).split(".")[0]
        total, count = sums.get(top, (0.0, 0))
        sums[top] = (total + float((n.double() - o.double()).abs().sum()), count + n.numel())
    return {top: total / max(count, 1) for top, (total, count) in sums.items()}


@dataclass
class FusionReport:
    """``fused``: whether this call fused (False: the checkpoint was fused already)."""

    fused: bool
    alpha: float
    old_checkpoint: str
    threshold_fraction: Optional[float] = None
    mean_abs_delta: dict = field(default_factory=dict)


def is_fused(checkpoint: Optional[Mapping]) -> bool:
    record = (checkpoint or {}).get(EWF_STATE_KEY)
    return isinstance(record, Mapping) and record.get("fused") is True


def unfused_path(path: str) -> str:
    """``…/name_3.pth`` → ``…/name_3_unfused.pth``."""
    root, ext = os.path.splitext(path)
    return f"{root}_unfused{ext or '.pth'}"


def _model_state(checkpoint: Mapping, path: str) -> Mapping:
    state = checkpoint.get("model_state", checkpoint)
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path} holds no model weights (expected a checkpoint with 'model_state')")
    return state


def fuse_checkpoint(new_path: str, old_path: str, alpha: float, threshold_fraction: Optional[float] = None,
                    keep_unfused: bool = False) -> FusionReport:
    """Fuse the step checkpoint ``new_path`` with the old endpoint ``old_path`` in place.

    ``old_path`` must be the file the step's old model was loaded from (``--step_ckpt`` when given,
    else the previous step's checkpoint). The whole checkpoint dict is kept (optimizer, scheduler
    and trainer states unchanged), its ``model_state`` replaced by :func:`fuse_state_dicts`, and
    ``checkpoint['ewf'] = {'fused': True, 'alpha', 'old_checkpoint', 'threshold_fraction'}`` added;
    the file is replaced atomically. A checkpoint already marked fused is left untouched (the call
    is idempotent: a resumed step never fuses twice). ``keep_unfused`` first writes the unfused
    checkpoint to :func:`unfused_path`. Call it on one process (rank 0), then a barrier.
    """
    alpha = check_alpha(alpha)
    fraction = _check_fraction(threshold_fraction)
    checkpoint = load_checkpoint(new_path)
    if is_fused(checkpoint):
        record = checkpoint[EWF_STATE_KEY]
        return FusionReport(False, float(record.get("alpha", alpha)), str(record.get("old_checkpoint", old_path)),
                            record.get("threshold_fraction"))
    old_state = _model_state(load_checkpoint(old_path), old_path)
    new_state = _model_state(checkpoint, new_path)
    if keep_unfused:
        save_atomic(checkpoint, unfused_path(new_path))
    delta = _mean_abs_delta(old_state, new_state)
    fused_state = fuse_state_dicts(old_state, new_state, alpha, fraction)
    if "model_state" in checkpoint:
        checkpoint["model_state"] = fused_state
    else:  # a bare state dict: the record needs a checkpoint around it
        checkpoint = {"model_state": fused_state}
    checkpoint[EWF_STATE_KEY] = {"fused": True, "alpha": alpha, "old_checkpoint": os.fspath(old_path),
                                 "threshold_fraction": fraction}
    save_atomic(checkpoint, new_path)
    return FusionReport(True, alpha, os.fspath(old_path), fraction, delta)


def old_classifier_names(model) -> list:
    """Parameter names of the old classifiers ``cls.0 … cls.{t−1}`` (what ``--fix_pre_cls`` freezes)."""
    newest = len(model.cls) - 1
    old = tuple(f"cls.{i}." for i in range(newest))
    return [name for name, _ in model.named_parameters() if name.startswith(old)]


def freeze_old_classifiers(model) -> list:
    """``--fix_pre_cls``: ``requires_grad=False`` on every old classifier (background row included),
    before the optimiser is built, so they get no update, weight decay or momentum; returns the
    frozen names. Nothing to freeze at step 0."""
    names = set(old_classifier_names(model))
    for name, parameter in model.named_parameters():
        if name in names:
            parameter.requires_grad_(False)
    return sorted(names)
