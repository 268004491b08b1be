"""PLOP pseudo-labelling of the background with the old model (Douillard et al., CVPR 2021).

At step t > 0 the ground truth only carries the classes of the current step: every pixel of an old
class is labelled background. PLOP replaces those labels with the old model's prediction where the
old model is confident. Notation (per pixel, ``C_o`` = old classes incl. background, ``C`` = all
classes seen so far)::

    p = softmax(z_old)        (C_o channels)
    y_hat = argmax_c p_c      m = max_c p_c
    u = entropy(p) / log(C)   with PLOP's entropy, see :func:`plop_entropy`

Modes (``--pseudo``):

* ``naive``: background pixels get ``y_hat``.
* ``threshold_X``: background pixels get ``y_hat``, or 255 where ``m < X``.
* ``confidence``: background pixels get ``y_hat``; per-pixel loss weights ``w = m`` on them, 1 elsewhere.
* ``median`` / ``median_X``: background pixels get ``y_hat``, or 255 where ``m < tau[y_hat]``;
  ``tau`` = per-class median of ``m`` clamped to at most the base threshold (``X`` when given,
  else ``--threshold``), see :func:`find_thresholds`.
* ``entropy`` / ``entropy_X`` (PLOP preset): ``valid = u < tau[y_hat]`` with ``tau`` the per-class
  median of ``u`` clamped to at least the base threshold; valid background pixels get ``y_hat``,
  the others 255. Optionally the per-image factor
  ``f_b = |bg & valid|_b / (|bg|_b + 1e-6)`` (clamped below by ``adaptive_min_factor`` when non-zero)
  multiplies the image's whole classification-loss map.

"Background pixels" are ``labels < C_o`` as in PLOP (under the default ``current`` data masking
these are exactly the pixels labelled 0). ``keep_old_gt=True`` restricts them to ``labels == 0``
so that old-class ground truth (exemplar-memory samples, ``current+old`` masking) is kept.

Thresholds: one pass of the old model over the training set fills a per-class histogram of
``u`` (100 bins) or ``m`` (20 bins) over background pixels; histograms are summed over ranks; the
per-class median is read from it. Which pixels are "background": label 0 of the step's mapped
labels (PLOP; old- and future-class pixels are 0 there), or with ``raw_labels=True`` raw class id
0 of the unmapped masks (the SATS repository, whose dataset returned raw labels: pixels of old,
new and future classes never enter a histogram).

The published median adds the bin *index* instead of the bin *count* to its running sum (it can
return -inf, nan or a number outside the bin range). ``legacy`` reproduces one of the published
versions bit for bit, histogram per rank (no all-reduce):

* ``"sats"`` (also ``True``, what ``--pseudo_median_legacy`` selects): float32 histograms and
  totals (see :func:`histogram_dtype`), and every infinite threshold replaced by 0.005 after the
  clamp;
* ``"plop"``: int64 histograms; infinite thresholds are kept.

The default (``legacy=False``) computes the true median of histograms summed over all ranks.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple, Optional

import torch
import torch.distributed as dist

from utils.io import atomic_write
from utils.reduce import channel_max

__all__ = [
    "PSEUDO_KINDS",
    "LEGACY_MEDIANS",
    "SATS_INFINITE_THRESHOLD",
    "legacy_median_flavour",
    "histogram_dtype",
    "PseudoLabels",
    "Thresholds",
    "ThresholdKey",
    "ThresholdCache",
    "parse_pseudo_mode",
    "threshold_statistic",
    "plop_entropy",
    "pseudo_label",
    "default_nb_bins",
    "accumulate_histogram",
    "all_reduce_histogram",
    "median_from_histogram",
    "thresholds_from_histograms",
    "find_thresholds",
    "weights_fingerprint",
]

PSEUDO_KINDS = ("naive", "threshold", "confidence", "median", "entropy")

# Bins used by PLOP when --pseudo_nb_bins is not given.
_DEFAULT_NB_BINS = {"entropy": 100, "probability": 20}

# The published median computations ``legacy`` can select, and the value the SATS repository
# writes over an infinite threshold.
LEGACY_MEDIANS = ("sats", "plop")
SATS_INFINITE_THRESHOLD = 0.005
_THRESHOLD_CACHE_FORMAT = 2


# --------------------------------------------------------------------------------------------
# Mode parsing
# --------------------------------------------------------------------------------------------

def parse_pseudo_mode(mode: str) -> tuple[str, Optional[float]]:
    """Split a ``--pseudo`` value into ``(kind, value)``.

    ``"naive"`` -> ``("naive", None)``; ``"threshold_0.7"`` -> ``("threshold", 0.7)`` (value
    required); ``"median"``/``"median_0.5"`` and ``"entropy"``/``"entropy_0.01"`` -> the optional
    value replaces the base threshold (``--threshold``) used to clamp the per-class medians.
    """
    if not isinstance(mode, str) or not mode:
        raise ValueError(f"pseudo-labelling mode must be a non-empty string, got {mode!r}")
    kind, sep, value_text = mode.partition("_")
    if kind not in PSEUDO_KINDS:
        raise ValueError(
            f"unknown pseudo-labelling mode {mode!r}; expected one of naive, confidence, "
            "threshold_X, median, median_X, entropy, entropy_X"
        )
    if kind in ("naive", "confidence"):
        if sep:
            raise ValueError(f"pseudo-labelling mode {mode!r}: {kind!r} takes no value")
        return kind, None
    if not sep:
        if kind == "threshold":
            raise ValueError(f"pseudo-labelling mode {mode!r} needs a value, e.g. 'threshold_0.7'")
        return kind, None
    try:
        value = float(value_text)
    except ValueError:
        raise ValueError(
            f"pseudo-labelling mode {mode!r}: {value_text!r} after '{kind}_' is not a number"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"pseudo-labelling mode {mode!r}: the value must be finite")
    return kind, value


def threshold_statistic(mode: str) -> Optional[str]:
    """Which per-class thresholds ``mode`` needs: ``"probability"`` (median modes),
    ``"entropy"`` (entropy modes) or ``None`` (no thresholds)."""
    kind, _ = parse_pseudo_mode(mode)
    return {"median": "probability", "entropy": "entropy"}.get(kind)


# --------------------------------------------------------------------------------------------
# Pseudo-labels
# --------------------------------------------------------------------------------------------

def plop_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """PLOP's normalised entropy, ``(B, K, H, W) -> (B, H, W)``.

    ``e = -(1 / log(K + 1e-8)) * mean_{c<K} p_c * log(p_c + 1e-8)``: a channel *mean*, so
    ``e ~= H(p) / (K log K)``, not ``H(p) / log K``. PLOP divides it once more by ``log(C)``
    before comparing with thresholds; both scalings are kept because the preset thresholds
    (0.001) live on that scale.
    """
    if probabilities.dim() < 2:
        raise ValueError(f"entropy expects (B, K, ...) probabilities, got shape {tuple(probabilities.shape)}")
    factor = 1.0 / math.log(probabilities.shape[1] + 1e-8)
    return -factor * torch.mean(probabilities * torch.log(probabilities + 1e-8), dim=1)


class PseudoLabels(NamedTuple):
    """Result of :func:`pseudo_label`.

    ``labels``: (B, H, W) int64, a new tensor. ``pixel_weights``: (B, H, W) float32 per-pixel loss
    weights (``confidence`` mode) or None. ``adaptive_factor``: (B, 1, 1) float32 per-image factor
    for the classification-loss map (``entropy`` mode with ``adaptive_factor=True``) or None.
    """

    labels: torch.Tensor
    pixel_weights: Optional[torch.Tensor]
    adaptive_factor: Optional[torch.Tensor]


def _max_entropy_value(nb_current_classes: int) -> float:
    """``log(C)`` computed in float32, as PLOP stores it."""
    return float(torch.log(torch.tensor(float(nb_current_classes), dtype=torch.float32)))


def _check_label_logits(labels: torch.Tensor, logits_old: torch.Tensor, nb_old_classes: int) -> None:
    if logits_old.dim() != 4:
        raise ValueError(f"logits_old must be (B, C_old, H, W), got shape {tuple(logits_old.shape)}")
    if labels.shape != (logits_old.shape[0],) + tuple(logits_old.shape[2:]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits_old shape {tuple(logits_old.shape)} "
            "(expected (B, H, W))"
        )
    if logits_old.shape[1] != nb_old_classes:
        raise ValueError(
            f"logits_old has {logits_old.shape[1]} channels but nb_old_classes={nb_old_classes}"
        )


def pseudo_label(
    labels: torch.Tensor,
    logits_old: torch.Tensor,
    mode: str,
    nb_old_classes: int,
    nb_current_classes: Optional[int] = None,
    thresholds: Optional[torch.Tensor] = None,
    max_entropy: Optional[float] = None,
    adaptive_factor: bool = False,
    adaptive_min_factor: float = 0.0,
    keep_old_gt: bool = False,
    probs_old: Optional[torch.Tensor] = None,
) -> PseudoLabels:
    """PLOP pseudo-labels for one batch (call only at step > 0). See the module docstring.

    Args:
        labels: (B, H, W) int64 targets in the step's label space; not modified.
        logits_old: (B, C_o, H, W) old-model logits at the labels' resolution.
        mode: ``naive``, ``threshold_X``, ``confidence``, ``median[_X]`` or ``entropy[_X]``.
        nb_old_classes: ``C_o``, old classes including background.
        nb_current_classes: ``C``; gives ``max_entropy = log(C)`` when ``max_entropy`` is None.
        thresholds: per-class thresholds indexed by old class (median/entropy modes), from
            :func:`find_thresholds`.
        max_entropy: the entropy normaliser returned by :func:`find_thresholds`.
        adaptive_factor: return PLOP's ``classif_adaptive_factor`` (entropy modes only).
        adaptive_min_factor: lower clamp of that factor when non-zero.
        keep_old_gt: relabel only pixels labelled 0 instead of all ``labels < C_o``.
        probs_old: ``softmax(logits_old)`` if the caller already has it (not recomputed).
    """
    kind, value = parse_pseudo_mode(mode)
    _check_label_logits(labels, logits_old, nb_old_classes)
    if adaptive_factor and kind != "entropy":
        raise ValueError(
            f"the classification adaptive factor is defined for the entropy pseudo-labelling only, "
            f"not for mode {mode!r}"
        )

    new_labels = labels.clone()
    background = (labels == 0) if keep_old_gt else (labels < nb_old_classes)
    probs = probs_old if probs_old is not None else torch.softmax(logits_old.float(), dim=1)
    max_probs, predicted = channel_max(probs)

    pixel_weights = None
    factor = None
    if kind == "naive":
        new_labels[background] = predicted[background]
    elif kind == "threshold":
        candidate = predicted.masked_fill(max_probs < value, 255)
        new_labels[background] = candidate[background]
    elif kind == "confidence":
        new_labels[background] = predicted[background]
        pixel_weights = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
        pixel_weights[background] = max_probs[background]
    else:
        per_class = _checked_thresholds(thresholds, nb_old_classes, mode).to(probs.device)
        if kind == "median":
            candidate = predicted.masked_fill(max_probs < per_class[predicted], 255)
            new_labels[background] = candidate[background]
        else:
            if max_entropy is None:
                if nb_current_classes is None:
                    raise ValueError("entropy pseudo-labelling needs max_entropy or nb_current_classes")
                max_entropy = _max_entropy_value(nb_current_classes)
            valid = (plop_entropy(probs) / max_entropy) < per_class[predicted]
            # background pixels: the old prediction where certain, ignore (255) where not
            new_labels = torch.where(background, torch.where(valid, predicted, 255), labels)
            if adaptive_factor:
                factor = adaptive_classification_factor(background, valid, adaptive_min_factor)
    return PseudoLabels(new_labels, pixel_weights, factor)


def adaptive_classification_factor(
    background: torch.Tensor, valid: torch.Tensor, min_factor: float = 0.0
) -> torch.Tensor:
    """PLOP's per-image ``f_b = |bg & valid|_b / (|bg|_b + 1e-6)``, shape (B, 1, 1).

    Clamped below by ``min_factor`` when it is non-zero. An image without background pixels gets
    0 (its classification loss vanishes), as in PLOP.
    """
    certain = (background & valid).float().sum(dim=(1, 2))
    total = background.float().sum(dim=(1, 2))
    factor = (certain / (total + 1e-6))[:, None, None]
    if min_factor:
        factor = factor.clamp(min=min_factor)
    return factor


def _checked_thresholds(thresholds: Optional[torch.Tensor], nb_old_classes: int, mode: str) -> torch.Tensor:
    if thresholds is None:
        raise ValueError(f"pseudo-labelling mode {mode!r} needs per-class thresholds (see find_thresholds)")
    if thresholds.dim() != 1 or thresholds.numel() < nb_old_classes:
        raise ValueError(
            f"thresholds must be a 1-D tensor with at least {nb_old_classes} entries, "
            f"got shape {tuple(thresholds.shape)}"
        )
    return thresholds


# --------------------------------------------------------------------------------------------
# Thresholds: histograms -> per-class medians
# --------------------------------------------------------------------------------------------

class Thresholds(NamedTuple):
    """Per-class thresholds (float32, length ``C``) and the entropy normaliser ``log(C)``
    (entropy statistic) or None (probability statistic)."""

    thresholds: torch.Tensor
    max_entropy: Optional[float]


def default_nb_bins(statistic: str) -> int:
    """PLOP's bin counts: 100 for entropy, 20 (width 0.05) for max-probability."""
    try:
        return _DEFAULT_NB_BINS[statistic]
    except KeyError:
        raise ValueError(f"statistic must be 'entropy' or 'probability', got {statistic!r}") from None


def legacy_median_flavour(legacy) -> Optional[str]:
    """``None`` (true median), ``"sats"`` or ``"plop"`` from a ``legacy`` argument.

    ``False``/``None`` -> ``None``; ``True`` -> ``"sats"`` (what ``--pseudo_median_legacy`` means:
    this project's presets are the SATS repository's); a string must be one of
    :data:`LEGACY_MEDIANS`.
    """
    if legacy is None or legacy is False:
        return None
    if legacy is True:
        return "sats"
    if isinstance(legacy, str) and legacy in LEGACY_MEDIANS:
        return legacy
    raise ValueError(f"legacy median {legacy!r}: expected False, True or one of {LEGACY_MEDIANS}")


def histogram_dtype(legacy=False) -> torch.dtype:
    """float32 for the SATS repository's histograms, int64 otherwise.

    float32 counts are exact up to 2**24 pixels per bin; above, they are rounded the way the
    device's ``index_put_`` rounds them, as in the published code: on the CPU every pixel is added
    on its own, so a bin stops at 2**24; on CUDA a batch's pixels of one bin are summed first and
    the sum is added with float32 rounding.
    """
    return torch.float32 if legacy_median_flavour(legacy) == "sats" else torch.long


def accumulate_histogram(
    histogram: torch.Tensor,
    logits_old: torch.Tensor,
    labels: torch.Tensor,
    statistic: str,
    max_entropy: Optional[float] = None,
    background: Optional[torch.Tensor] = None,
) -> None:
    """Add one batch to ``histogram`` (C x nb_bins; int64, or float32 for the SATS legacy) in place.

    Only ``background`` pixels count (default ``labels == 0``). Row = old argmax; column =
    ``min(floor(v * nb_bins), nb_bins - 1)`` with ``v = m`` (probability) or
    ``v = plop_entropy(p) / max_entropy`` (entropy). Ones are added in the histogram's dtype with
    ``index_put_(accumulate=True)``, as published (float32 rounding: :func:`histogram_dtype`).
    """
    nb_bins = histogram.shape[1]
    probs = torch.softmax(logits_old.float(), dim=1)
    max_probs, predicted = channel_max(probs)
    if background is None:
        background = labels == 0
    elif background.shape != labels.shape:
        raise ValueError(f"background mask shape {tuple(background.shape)} differs from the labels' "
                         f"{tuple(labels.shape)}")
    if statistic == "entropy":
        if max_entropy is None:
            raise ValueError("the entropy histogram needs max_entropy = log(C)")
        values = plop_entropy(probs)[background] / max_entropy
    elif statistic == "probability":
        values = max_probs[background]
    else:
        raise ValueError(f"statistic must be 'entropy' or 'probability', got {statistic!r}")
    rows = predicted[background]
    # .long() truncates toward zero like PLOP; the lower clamp only guards rounding below 0.
    columns = (values * nb_bins).long().clamp(min=0, max=nb_bins - 1)
    ones = torch.ones_like(rows, dtype=histogram.dtype)
    histogram.index_put_((rows.to(histogram.device), columns.to(histogram.device)),
                         ones.to(histogram.device), accumulate=True)


def all_reduce_histogram(histogram: torch.Tensor) -> torch.Tensor:
    """Sum ``histogram`` over all ranks in place when torch.distributed is initialised
    (the published code kept one histogram per rank). Returns it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(histogram, op=dist.ReduceOp.SUM)
    return histogram


def median_from_histogram(counts: torch.Tensor, legacy=False) -> float:
    """Median of one class's histogram (``nb_bins`` counts over [0, 1]), linearly interpolated
    inside its bin. Returns 0.0 for an empty histogram.

    True median (default): ``j`` = first bin with ``S_j >= n/2`` where ``S_j`` is the inclusive
    cumulative count; ``median = j/nb + (n/2 - S_{j-1}) / h_j / nb``.

    ``legacy`` (``"sats"``/``True`` or ``"plop"``) reproduces the published loop bit for bit: the
    running sum grows by the bin index ``j`` (as the float ``(j / nb) * nb``, which is
    28.999999999999996 for j=29, nb=100) instead of ``h_j``; the bin read is
    ``int((j / nb) * nb)``; the loop stops at the first ``j`` with ``run <= n/2 <= run + h``;
    without a stop it ends on the last bin; the result is computed in float32 and may be
    -inf/+inf/nan or lie outside [0, 1]. The counts keep their dtype and device (the total of a
    float32 histogram is a float32 sum, as published).
    """
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D, got shape {tuple(counts.shape)}")
    nb_bins = counts.numel()
    counts = counts.detach()
    if legacy_median_flavour(legacy) is not None:
        total = counts.sum()
        if total <= 0:
            return 0.0
        return _published_median(counts, total, nb_bins)
    counts = counts.cpu().long()
    total = counts.sum()
    if total <= 0:
        return 0.0
    half = total.item() / 2.0
    cumulative = torch.cumsum(counts, 0)
    j = int(torch.nonzero(cumulative >= half)[0])
    before = cumulative[j - 1].item() if j > 0 else 0
    return j / nb_bins + (half - before) / counts[j].item() / nb_bins


def _published_median(counts: torch.Tensor, total: torch.Tensor, nb_bins: int) -> float:
    half = total / 2  # float32 0-dim tensor, as in the published code
    running = 0.0
    for j in range(nb_bins):
        lower = j / nb_bins
        read_bin = int(lower * nb_bins)
        if half >= running and half <= running + counts[read_bin]:
            break
        running += lower * nb_bins
    return float(lower + ((half - running) / counts[read_bin]) * (1 / nb_bins))


def thresholds_from_histograms(
    histograms: torch.Tensor,
    statistic: str,
    base_threshold: float,
    legacy=False,
) -> torch.Tensor:
    """Per-class thresholds from (C x nb_bins) histograms; float32 tensor of length C (on the
    histograms' device).

    ``tau_c = median_c`` (0 for an empty row) then clamped by the base threshold:
    entropy ``tau_c = max(tau_c, base)``, probability ``tau_c = min(tau_c, base)``. The clamp
    keeps Python's ``max``/``min`` semantics of the published code (a nan median stays nan).
    ``legacy="sats"`` (or ``True``) then sets every infinite ``tau_c`` to 0.005, as the SATS
    repository does; ``"plop"`` keeps them.
    """
    if histograms.dim() != 2:
        raise ValueError(f"histograms must be (C, nb_bins), got shape {tuple(histograms.shape)}")
    if statistic not in _DEFAULT_NB_BINS:
        raise ValueError(f"statistic must be 'entropy' or 'probability', got {statistic!r}")
    flavour = legacy_median_flavour(legacy)
    medians = torch.tensor(
        [median_from_histogram(row, legacy=flavour or False) for row in histograms], dtype=torch.float32
    )
    base = torch.tensor(base_threshold, dtype=torch.float32)
    clamped = torch.empty_like(medians)
    for c, median in enumerate(medians):
        if statistic == "entropy":
            clamped[c] = base if base > median else median
        else:
            clamped[c] = base if base < median else median
    if flavour == "sats":
        clamped[torch.isinf(clamped)] = SATS_INFINITE_THRESHOLD
    return clamped.to(histograms.device)


def base_threshold_for(mode: str, threshold: float, step: int = 0,
                       step_threshold: Optional[float] = None) -> float:
    """The clamp applied to the medians: ``X`` of ``median_X``/``entropy_X`` if given, else
    ``threshold``; plus ``step * step_threshold`` when ``step_threshold`` is set."""
    _, value = parse_pseudo_mode(mode)
    base = value if value is not None else threshold
    if step_threshold is not None:
        base = base + step * step_threshold
    return float(base)


def _background_of(batch, labels: torch.Tensor, raw_labels: bool, device) -> torch.Tensor:
    """Pixels whose old-model statistics enter the histogram (module docstring)."""
    if not raw_labels:
        return labels == 0
    raw = getattr(batch, "raw_label", None)
    if raw is None:
        raise ValueError(
            "raw-label thresholds need batches carrying the unmapped label (a 'raw_label' field); "
            "iterate over a loader of dataset.with_raw_labels(train_dataset)")
    raw = raw.to(device, dtype=torch.long)
    if raw.shape != labels.shape:
        raise ValueError(f"raw labels shape {tuple(raw.shape)} differs from the labels' "
                         f"{tuple(labels.shape)}")
    return raw == 0


@torch.no_grad()
def find_thresholds(
    old_model: torch.nn.Module,
    loader: Iterable,
    device: torch.device | str,
    mode: str,
    nb_old_classes: int,
    nb_current_classes: int,
    nb_bins: Optional[int] = None,
    legacy=False,
    threshold: float = 0.9,
    step: int = 0,
    step_threshold: Optional[float] = None,
    logger=None,
    raw_labels: bool = False,
) -> Thresholds:
    """PLOP's per-class thresholds for ``mode`` (``median[_X]`` or ``entropy[_X]``), computed once
    per step with the old model over ``loader`` (the training set).

    ``loader`` yields ``(images, labels)`` or ``(images, labels, saliency)``; the old model is
    called as ``logits, _ = old_model(images)``. Histograms have ``nb_current_classes`` rows and
    ``nb_bins`` columns (default 100 entropy / 20 probability), are summed over ranks (not with
    ``legacy``: one histogram per rank, as published), and go through
    :func:`thresholds_from_histograms` with :func:`base_threshold_for` as the clamp.

    ``raw_labels=True``: batches must also carry the unmapped masks as ``batch.raw_label`` (what a
    loader over ``dataset.with_raw_labels(...)`` yields) and only pixels with raw class id 0 are
    counted, as in the SATS repository. Every rank must call this (the all-reduce is collective).
    """
    statistic = threshold_statistic(mode)
    if statistic is None:
        raise ValueError(f"pseudo-labelling mode {mode!r} does not use per-class thresholds")
    if nb_old_classes > nb_current_classes:
        raise ValueError(
            f"nb_old_classes={nb_old_classes} exceeds nb_current_classes={nb_current_classes}"
        )
    nb_bins = default_nb_bins(statistic) if nb_bins is None else int(nb_bins)
    if nb_bins < 1:
        raise ValueError(f"nb_bins must be positive, got {nb_bins}")
    flavour = legacy_median_flavour(legacy)
    max_entropy = _max_entropy_value(nb_current_classes) if statistic == "entropy" else None

    device = torch.device(device)
    was_training = old_model.training
    old_model.eval()
    histogram = torch.zeros(nb_current_classes, nb_bins, dtype=histogram_dtype(flavour or False),
                            device=device)
    try:
        for batch in loader:
            images, labels = batch[0].to(device, dtype=torch.float32), batch[1].to(device, dtype=torch.long)
            logits_old, _ = old_model(images)
            _check_label_logits(labels, logits_old, nb_old_classes)
            background = _background_of(batch, labels, raw_labels, device)
            accumulate_histogram(histogram, logits_old, labels, statistic, max_entropy, background)
    finally:
        old_model.train(was_training)
    if flavour is None:
        all_reduce_histogram(histogram)
        histogram = histogram.cpu()

    base = base_threshold_for(mode, threshold, step, step_threshold)
    thresholds = thresholds_from_histograms(histogram, statistic, base, legacy=flavour or False)
    _report_thresholds(thresholds.cpu(), flavour, logger)
    return Thresholds(thresholds.to(device), max_entropy)


def _report_thresholds(thresholds: torch.Tensor, flavour: Optional[str], logger) -> None:
    bad = [c for c, value in enumerate(thresholds.tolist()) if not math.isfinite(value)]
    if bad:
        message = (f"pseudo-label thresholds are not finite for classes {bad} "
                   f"({'published median computation' if flavour else 'unexpected'}): "
                   f"{thresholds.tolist()}")
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        if logger is not None:
            logger.warning(message)
    elif logger is not None:
        logger.info("pseudo-label thresholds: " + ", ".join(f"{value:.4f}" for value in thresholds.tolist()))


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

def weights_fingerprint(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every tensor of a state dict
    (a ``module.`` prefix from DDP is ignored)."""
    state = (model_or_state_dict.state_dict()
             if isinstance(model_or_state_dict, torch.nn.Module) else model_or_state_dict)
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is not a tensor ({type(tensor).__name__})")
        key = name[len("module."):] if name.startswith("module.") else name
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # bytes through a uint8 view: works for bf16 (no numpy dtype) and 0-dim buffers alike
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ThresholdKey:
    """Everything the thresholds depend on. ``extra`` holds run settings that change the pixels
    seen by the old model (crop size, seed, data masking, ...) as JSON-serialisable values."""

    weights: str
    dataset: str
    task: str
    step: int
    mode: str
    nb_bins: Optional[int]
    legacy: bool | str
    threshold: float
    step_threshold: Optional[float]
    nb_old_classes: int
    nb_current_classes: int
    dataset_len: int
    extra: Mapping[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict:
        fields = asdict(self)
        fields["extra"] = dict(sorted(dict(self.extra).items()))
        # what the thresholds mean changed with format 2 (legacy=True is the SATS repository's
        # computation, per rank): older files must not be reused
        fields["format"] = _THRESHOLD_CACHE_FORMAT
        return fields

    def digest(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:20]


class ThresholdCache:
    """Per-step thresholds stored as ``{cache_dir}/thresholds_{key digest}.pt`` (written
    atomically, read with ``weights_only=True``). The file also stores the full key, checked on
    load, so a stale or colliding file is never used."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.cache_dir = Path(cache_dir)

    def path(self, key: ThresholdKey) -> Path:
        return self.cache_dir / f"thresholds_{key.digest()}.pt"

    def load(self, key: ThresholdKey) -> Optional[Thresholds]:
        path = self.path(key)
        if not path.is_file():
            return None
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(stored, dict) or stored.get("key") != _jsonable(key.as_dict()):
            raise ValueError(f"threshold cache file {path} does not hold the thresholds of this key")
        return Thresholds(stored["thresholds"], stored["max_entropy"])

    def save(self, key: ThresholdKey, value: Thresholds) -> Path:
        path = self.path(key)
        payload = {"key": _jsonable(key.as_dict()), "thresholds": value.thresholds.detach().cpu(),
                   "max_entropy": value.max_entropy}
        atomic_write(path, lambda handle: torch.save(payload, handle))
        return path

    def get_or_compute(self, key: ThresholdKey, compute: Callable[[], Thresholds],
                       device: torch.device | str | None = None) -> Thresholds:
        """Load the thresholds of ``key`` or run ``compute()`` (collective: all ranks) and save
        them from rank 0. Ranks agree on the cache hit so that either all or none compute.

        Legacy thresholds (``key.legacy``) are computed per rank, so with several ranks each rank
        keeps its own file (the rank is added to the key) and a re-run gives every rank its own
        thresholds back."""
        per_rank = _per_rank_thresholds(key)
        if per_rank:
            key = replace(key, extra={**dict(key.extra), "rank": dist.get_rank()})
        cached = self.load(key)
        if not _all_ranks_agree(cached is not None):
            value = compute()
            if per_rank or not dist.is_initialized() or dist.get_rank() == 0:
                self.save(key, value)
            return value
        return Thresholds(cached.thresholds.to(device) if device is not None else cached.thresholds,
                          cached.max_entropy)


def _per_rank_thresholds(key: ThresholdKey) -> bool:
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return distributed and legacy_median_flavour(key.legacy) is not None


def _jsonable(value):
    """Round-trip through JSON so that tuples/lists compare equal after a save."""
    return json.loads(json.dumps(value, sort_keys=True))


def _all_ranks_agree(flag: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    if backend_device == "cuda":
        backend_device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([int(flag)], device=backend_device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())
