"""DKD (Decomposed Knowledge Distillation, Baek et al., NeurIPS 2022): losses, prediction rule,
classifier initialisation, optimiser groups and the DKD-M memory policy, on plain tensors.

Channel layout of a DKD model (``dkd_model.DKDSegmentationModule``): channel 0 is the auxiliary
classifier's score (not a background score), channel k ≥ 1 is class k; every channel is an
independent sigmoid. Labels are in the usual label space (0 background, k class k, 255 void),
so at step t the current classes are the channels ``first_new .. C − 1`` with ``first_new`` = 1
at step 0 and = the channel count of the old model at t > 0.

Notation: ``BCE_p(x, q) = −[p·q·log σ(x) + (1 − q)·log(1 − σ(x))]`` elementwise (p = pos_weight),
``mean_pix`` = mean over every pixel of the batch (background and void included). Every term is
a *sum over channels* of per-channel pixel means, the scale DKD's weights were tuned for. All
terms are computed in fp32.

    L_mbce    = Σ_{c current} mean_pix BCE_p(z_c, 1[y = c])             (full resolution)
    L_kd      = Σ_{k old}     mean_pix BCE(z_k, σ(z_old_k))              (full resolution)
    L_dkd_pos = Σ_{k old}     mean_pix BCE(pos_k, σ(pos_old_k))          (feature resolution)
    L_dkd_neg = Σ_{k old}     mean_pix BCE(neg_k, σ(neg_old_k))          (feature resolution)
    L_ac      = mean_pix BCE(z_0, 0) = mean_pix softplus(z_0)
    L         = 1·L_mbce + 5·L_kd + 5·L_dkd_pos + 5·L_dkd_neg + 1·L_ac  (step 0: L_mbce + L_ac)

with ``pos_k = Σ_d max(W_kd, 0)·f_d`` and ``neg_k = Σ_d min(W_kd, 0)·f_d`` the evidence for and
against class k carried by the classifier's positive and negative weights on the pre-classifier
feature f (no bias: ``z_k = pos_k + neg_k + b_k`` at feature resolution).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.reduce import channel_max

__all__ = [
    "IGNORE_INDEX",
    "EVIDENCE_POS",
    "EVIDENCE_NEG",
    "EVIDENCE_KEYS",
    "PREDICTION_THRESHOLD",
    "MEMORY_PSEUDO_THRESHOLD",
    "HEAD_LR_FACTOR",
    "DKDWeights",
    "new_class_bce",
    "old_class_kd",
    "decomposed_evidence",
    "decomposed_kd",
    "aux_classifier_loss",
    "dkd_total",
    "DKDLoss",
    "dkd_prediction",
    "init_new_classifier_from_aux",
    "dkd_param_groups",
    "dkd_memory_pseudo_labels",
    "select_dkd_memory",
    "build_dkd_memory",
]

IGNORE_INDEX = 255
#: extras a DKD model returns on request: the decomposed evidence of every class channel (k ≥ 1)
EVIDENCE_POS = "evidence_pos"
EVIDENCE_NEG = "evidence_neg"
EVIDENCE_KEYS = (EVIDENCE_POS, EVIDENCE_NEG)
#: a pixel is labelled with its best class only when that class's sigmoid score exceeds this
PREDICTION_THRESHOLD = 0.5
#: DKD-M: background pixels of memory candidates take the old model's class at this score or above
MEMORY_PSEUDO_THRESHOLD = 0.9
#: learning-rate multiplier of the head and of every classifier relative to the backbone
HEAD_LR_FACTOR = 10.0


@dataclass(frozen=True)
class DKDWeights:
    """Weights of the five terms; the defaults are the published ones (VOC and ADE alike)."""

    mbce: float = 1.0
    kd: float = 5.0
    dkd_pos: float = 5.0
    dkd_neg: float = 5.0
    ac: float = 1.0

    def items(self):
        return [(f.name, float(getattr(self, f.name))) for f in fields(self)]


# --------------------------------------------------------------------------------------------
# Loss terms
# --------------------------------------------------------------------------------------------
def _check_maps(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 4 or y.dim() != 4 or x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[2:]:
        raise ValueError(f"{name}: expected two (B, C, H, W) maps of the same batch and size, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")


def _soft_bce_channel_sum(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``Σ_k mean_pix BCE(logits_k, σ(teacher_k))`` over the teacher's channels (logits' first ones)."""
    n = teacher_logits.shape[1]
    target = torch.sigmoid(teacher_logits.float())
    loss = F.binary_cross_entropy_with_logits(logits[:, :n].float(), target, reduction="none")
    return loss.mean(dim=(0, 2, 3)).sum()


def new_class_bce(logits: torch.Tensor, labels: torch.Tensor, first_new: int, pos_weight: float = 1.0,
                  ignore_void: bool = False, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """DKD's mBCE on the current step's channels ``first_new .. C − 1`` (a scalar).

        L = Σ_{c ≥ first_new} mean_pix BCE_p(z_c, 1[y = c])

    Every label other than c is a negative of channel c: background, classes of other steps and,
    as in the published code, void pixels (``ignore_index``), which count in the mean. With
    ``ignore_void`` the void pixels are left out instead and the mean runs over the others
    (0 when every pixel is void).

    Args:
        logits: (B, C, H, W), full resolution; channel c scores class c.
        labels: (B, H, W) integer labels.
        first_new: first class of the step (1 at step 0: channel 0 is the auxiliary score).
        pos_weight: p, the weight of positive pixels.
    """
    if logits.dim() != 4 or labels.shape != (logits.shape[0],) + tuple(logits.shape[2:]):
        raise ValueError(f"new_class_bce: labels {tuple(labels.shape)} must be (B, H, W) of logits "
                         f"{tuple(logits.shape)}")
    if not 1 <= first_new < logits.shape[1]:
        raise ValueError(f"new_class_bce: first_new must lie in [1, {logits.shape[1]}), got {first_new}")
    new = logits[:, first_new:].float()
    classes = torch.arange(first_new, logits.shape[1], device=labels.device).view(1, -1, 1, 1)
    target = (labels.unsqueeze(1) == classes).to(new.dtype)
    weight = None if pos_weight == 1 else new.new_tensor(float(pos_weight)).view(1, 1, 1, 1)
    loss = F.binary_cross_entropy_with_logits(new, target, pos_weight=weight, reduction="none")
    if not ignore_void:
        return loss.mean(dim=(0, 2, 3)).sum()
    valid = labels != ignore_index
    per_pixel = loss.sum(dim=1)
    if not bool(valid.any()):
        return per_pixel.sum() * 0.0
    return per_pixel[valid].mean()


def old_class_kd(logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """KD on the old classes' logits: ``Σ_{k=1..K_old} mean_pix BCE(z_k, σ(z_old_k))``.

    ``old_logits`` (B, 1 + K_old, H, W) is the old model's output; channel 0 (the auxiliary score)
    is left out on both sides. The minimum is the binary entropy of the targets, not 0.
    """
    _check_maps("old_class_kd", logits, old_logits)
    if old_logits.shape[1] < 2 or logits.shape[1] < old_logits.shape[1]:
        raise ValueError(f"old_class_kd: the old model needs the auxiliary channel and at least one class, "
                         f"and no more channels than the new one; got {old_logits.shape[1]} and {logits.shape[1]}")
    return _soft_bce_channel_sum(logits[:, 1:], old_logits[:, 1:])


def decomposed_evidence(features: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos, neg)``: a 1×1 classifier's response split by the sign of its weights, without bias.

        pos_k = Σ_d max(W_kd, 0)·f_d        neg_k = Σ_d min(W_kd, 0)·f_d

    so ``pos + neg + b`` is the classifier's output. ``pos`` passes gradient only to the weights
    > 0, ``neg`` only to the weights < 0; both pass gradient to the features.

    Args:
        features: (B, D, h, w) classifier input.
        weight: (K, D, 1, 1) or (K, D) classifier weights.
    Returns:
        two (B, K, h, w) maps.
    """
    if weight.dim() == 2:
        weight = weight[:, :, None, None]
    if features.dim() != 4 or weight.dim() != 4 or weight.shape[1] != features.shape[1] or weight.shape[2:] != (1, 1):
        raise ValueError(f"decomposed_evidence: features (B, D, h, w) and weights (K, D[, 1, 1]) expected, "
                         f"got {tuple(features.shape)} and {tuple(weight.shape)}")
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    positive = torch.where(weight > 0, weight, zero)
    negative = torch.where(weight < 0, weight, zero)
    return F.conv2d(features, positive), F.conv2d(features, negative)


def decomposed_kd(evidence: torch.Tensor, old_evidence: torch.Tensor) -> torch.Tensor:
    """One DKD term: ``Σ_{k=1..K_old} mean_pix BCE(e_k, σ(e_old_k))`` at feature resolution.

    ``evidence`` (B, K, h, w): the new model's positive (or negative) evidence of every class;
    ``old_evidence`` (B, K_old, h, w): the old model's, for its classes, which are the first K_old
    of the new model's. The evidence maps are used as logits and the old ones, through a sigmoid,
    as soft targets.
    """
    _check_maps("decomposed_kd", evidence, old_evidence)
    if evidence.shape[1] < old_evidence.shape[1]:
        raise ValueError(f"decomposed_kd: the new model has {evidence.shape[1]} classes, fewer than the "
                         f"old model's {old_evidence.shape[1]}")
    return _soft_bce_channel_sum(evidence, old_evidence)


def aux_classifier_loss(aux_logits: torch.Tensor) -> torch.Tensor:
    """The auxiliary classifier's term: every pixel is a negative, ``mean_pix BCE(z_0, 0)``.

    ``aux_logits``: channel 0 of the logits, (B, H, W) or (B, 1, H, W). The auxiliary classifier
    reads detached features, so this term trains nothing but that classifier.
    """
    z = aux_logits.float()
    return F.binary_cross_entropy_with_logits(z, torch.zeros_like(z))


def dkd_total(terms: Mapping[str, torch.Tensor], weights: DKDWeights = DKDWeights()) -> torch.Tensor:
    """``Σ_name weight_name · term_name`` over the terms present (step 0: ``mbce`` and ``ac`` only)."""
    known = dict(weights.items())
    unknown = set(terms) - set(known)
    if unknown:
        raise ValueError(f"dkd_total: unknown terms {sorted(unknown)}; expected some of {list(known)}")
    if not terms:
        raise ValueError("dkd_total needs at least one term")
    return sum(known[name] * value for name, value in terms.items())


class DKDLoss:
    """The DKD objective of one step, its options bound once.

    ``terms(...)`` returns the *weighted* terms by name (``mbce``, ``ac`` and, with an old model,
    ``kd``, ``dkd_pos``, ``dkd_neg``; terms of weight 0 are skipped); ``__call__`` their sum.

    Args:
        first_new: first class of the step (1 at step 0, the old model's channel count after).
        weights: :class:`DKDWeights`.
        pos_weight: p of the mBCE (2 for VOC step 0, 1 for VOC t > 0, 35 for ADE).
        ignore_void: leave void pixels out of the mBCE (the published code counts them as negatives).
    """

    def __init__(self, first_new: int, weights: DKDWeights = DKDWeights(), pos_weight: float = 1.0,
                 ignore_void: bool = False):
        if first_new < 1:
            raise ValueError(f"DKDLoss: first_new must be >= 1 (channel 0 is the auxiliary score), got {first_new}")
        self.first_new = int(first_new)
        self.weights = weights
        self.pos_weight = float(pos_weight)
        self.ignore_void = bool(ignore_void)

    @property
    def distils(self) -> bool:
        return self.first_new > 1

    @property
    def wants(self) -> frozenset:
        """Extras both models must return: the evidence maps, when a DKD term is active."""
        if self.distils and (self.weights.dkd_pos or self.weights.dkd_neg):
            return frozenset(EVIDENCE_KEYS)
        return frozenset()

    def raw_terms(self, logits: torch.Tensor, labels: torch.Tensor, extras: Optional[Mapping] = None,
                  old_logits: Optional[torch.Tensor] = None, old_extras: Optional[Mapping] = None) -> dict:
        """The unweighted terms of non-zero weight."""
        w = self.weights
        terms = {}
        if w.mbce:
            terms["mbce"] = new_class_bce(logits, labels, self.first_new, self.pos_weight, self.ignore_void)
        if self.distils:
            if old_logits is None:
                raise ValueError(f"DKDLoss: classes before {self.first_new} are old; the old model's logits are needed")
            if old_logits.shape[1] != self.first_new:
                raise ValueError(f"DKDLoss: the old model has {old_logits.shape[1]} channels, expected {self.first_new}")
            if w.kd:
                terms["kd"] = old_class_kd(logits, old_logits)
            for name, key in (("dkd_pos", EVIDENCE_POS), ("dkd_neg", EVIDENCE_NEG)):
                if getattr(w, name):
                    missing = [m for m, ex in (("new", extras), ("old", old_extras)) if not ex or key not in ex]
                    if missing:
                        raise ValueError(f"DKDLoss: the {' and '.join(missing)} model must return {key!r} "
                                         f"(forward(x, wants={sorted(EVIDENCE_KEYS)}))")
                    terms[name] = decomposed_kd(extras[key], old_extras[key])
        if w.ac:
            terms["ac"] = aux_classifier_loss(logits[:, 0])
        return terms

    def terms(self, *args, **kwargs) -> dict:
        weights = dict(self.weights.items())
        return {name: weights[name] * value for name, value in self.raw_terms(*args, **kwargs).items()}

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return dkd_total(self.raw_terms(*args, **kwargs), self.weights)


# --------------------------------------------------------------------------------------------
# Prediction and pseudo-labels
# --------------------------------------------------------------------------------------------
def dkd_prediction(logits: torch.Tensor, threshold: float = PREDICTION_THRESHOLD) -> torch.Tensor:
    """DKD's decision rule, labels in the usual space (0 = background).

    ``s = σ(z)`` in fp32 over the class channels 1..C−1 (the auxiliary channel 0 is ignored);
    the prediction is ``1 + argmax s`` (first channel on ties) where ``max s > threshold``
    (strictly) and 0 elsewhere. Thresholding the fp32 sigmoids, not the logits, is the published
    rule: a logit of 3e-8 rounds to σ = 0.5 (background) and logits 18 and 25 both to σ = 1.0
    (the lower class wins).
    """
    if logits.dim() < 2 or logits.shape[1] < 2:
        raise ValueError(f"dkd_prediction: need the auxiliary channel and at least one class, got {tuple(logits.shape)}")
    scores, best = channel_max(torch.sigmoid(logits[:, 1:].float()))
    return torch.where(scores > threshold, best + 1, torch.zeros_like(best))


def dkd_memory_pseudo_labels(labels: torch.Tensor, logits_old: torch.Tensor,
                             threshold: float = MEMORY_PSEUDO_THRESHOLD) -> torch.Tensor:
    """DKD-M's description of a memory candidate, label space in and out.

    ``s = max_{k≥1} σ(z_old_k)``, ``ĉ = argmax``: pixels labelled 0 with ``s ≥ threshold`` take
    ``ĉ``; labelled and void pixels keep their label. ``logits_old`` (B, 1 + K_old, H, W) come from
    a DKD model (channel 0, the auxiliary score, is ignored).
    """
    if logits_old.dim() != 4 or logits_old.shape[1] < 2 or labels.shape != (logits_old.shape[0],) + tuple(logits_old.shape[2:]):
        raise ValueError(f"dkd_memory_pseudo_labels: labels (B, H, W) and logits (B, 1 + K, H, W) expected, "
                         f"got {tuple(labels.shape)} and {tuple(logits_old.shape)}")
    scores, best = channel_max(torch.sigmoid(logits_old[:, 1:].float()))
    relabel = (labels == 0) & (scores >= threshold)
    return torch.where(relabel, best + 1, labels)


# --------------------------------------------------------------------------------------------
# Classifier initialisation and optimiser groups
# --------------------------------------------------------------------------------------------
def _unwrap(model):
    return getattr(model, "module", model)


@torch.no_grad()
def init_new_classifier_from_aux(model) -> None:
    """Every row of the newest classifier ``cls[-1]`` becomes a copy of the auxiliary classifier
    ``cls[0]`` (weight and bias); no bias shift. The auxiliary and the old classifiers are left as
    they are. ``model`` may be DDP-wrapped."""
    classifiers = getattr(_unwrap(model), "cls", None)
    if classifiers is None or len(classifiers) < 3:
        raise RuntimeError("init_new_classifier_from_aux needs a DKD model of step > 0 "
                           "(cls = [auxiliary, step-0 classes, ..., new classes])")
    aux, new = classifiers[0], classifiers[-1]
    if aux.weight.shape[0] != 1:
        raise RuntimeError(f"cls[0] must be the 1-channel auxiliary classifier, it has {aux.weight.shape[0]} channels")
    new.weight.copy_(aux.weight.expand_as(new.weight))
    if new.bias is not None:
        new.bias.copy_(aux.bias.expand_as(new.bias))


def _batch_norm_parameters(module: nn.Module) -> set:
    return {id(p) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False)}


def dkd_param_groups(model, lr: float, weight_decay: float, step: int,
                     head_lr_factor: float = HEAD_LR_FACTOR) -> list[dict]:
    """DKD's SGD parameter groups (named ``backbone``, ``head``, ``classifiers`` / ``old_classifiers``,
    ``new_classifier``).

    Step 0: backbone at ``lr``; head and every classifier at ``head_lr_factor·lr``; all groups with
    ``weight_decay``, BatchNorm parameters included.
    Step t > 0: the same learning rates; BatchNorm parameters left out (frozen); weight decay
    only on the new classifier ``cls[-1]``, 0 on the backbone, the head, the auxiliary and the
    old classifiers. Parameters with ``requires_grad=False`` are left out. LayerNorm (MiT) counts
    as any other parameter.
    """
    module = _unwrap(model)
    if not all(hasattr(module, name) for name in ("body", "head", "cls")):
        raise ValueError("dkd_param_groups expects a segmentation model with body, head and cls")
    frozen = _batch_norm_parameters(module) if step > 0 else set()
    head_lr = lr * head_lr_factor
    decay = 0.0 if step > 0 else weight_decay

    def group(name, params, group_lr, group_decay):
        params = [p for p in params if p.requires_grad and id(p) not in frozen]
        return {"name": name, "params": params, "lr": group_lr, "weight_decay": group_decay}

    groups = [group("backbone", module.body.parameters(), lr, decay),
              group("head", module.head.parameters(), head_lr, decay)]
    if step > 0:
        groups.append(group("old_classifiers", [p for c in module.cls[:-1] for p in c.parameters()], head_lr, 0.0))
        groups.append(group("new_classifier", module.cls[-1].parameters(), head_lr, weight_decay))
    else:
        groups.append(group("classifiers", module.cls.parameters(), head_lr, weight_decay))
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------------------------
# DKD-M memory
# --------------------------------------------------------------------------------------------
def select_dkd_memory(candidate_classes: Sequence[Sequence[int]], old_classes: Sequence[int], mem_size: int,
                      seed: int) -> list[int]:
    """DKD-M's selection over candidate class lists; returns candidate indices.

    A class-balanced round robin of ``mem_size`` images in total: with
    ``numpy.random.RandomState(seed)`` shuffle the candidates, then the old classes; pass over the
    classes repeatedly, each taking the first remaining candidate that shows it, until
    ``mem_size`` are taken (the round robin of ``dataset.memory.select_exemplars``). When no
    remaining candidate shows any old class the selection stops short, with a warning (the
    published loop never ended there).
    """
    from dataset.memory import select_exemplars

    chosen = select_exemplars(candidate_classes, old_classes, mem_size, seed)
    if len(chosen) < mem_size and list(old_classes):
        warnings.warn(f"DKD-M memory: only {len(chosen)} of {mem_size} images found "
                      f"(no remaining candidate shows an old class)", RuntimeWarning, stacklevel=2)
    return chosen


def build_dkd_memory(old_model, candidate_dataset, step: int, mem_size: int, seed: int, device,
                     nb_old_classes: int, previous_memory=None, names=None, batch_size: int = 1,
                     num_workers: int = 0, threshold: float = MEMORY_PSEUDO_THRESHOLD) -> list:
    """The DKD-M memory of step ``step`` >= 1, as ``dataset.memory.MemoryEntry`` sorted by name.

    Candidates: the training images of step ``step − 1`` (``candidate_dataset``, labels in that
    step's space). At step 1 each is described by the classes of its label; at step > 1 by the
    classes of :func:`dkd_memory_pseudo_labels` with ``old_model``, which must be the step
    ``step − 1`` model *with its trained weights loaded*, and the previous memory (with the class
    lists stored then) joins the pool. Selection: :func:`select_dkd_memory` over the old classes
    ``1 .. nb_old_classes − 1``.
    """
    from functools import partial

    from dataset.memory import build_memory

    if step > 1 and old_model is None:
        raise ValueError(f"DKD-M at step {step} labels its candidates with the trained step-{step - 1} model: "
                         f"pass it (its weights loaded) as old_model")
    pseudo_fn = partial(dkd_memory_pseudo_labels, threshold=threshold)
    entries = build_memory(old_model, candidate_dataset, step, mem_size, seed, device, nb_old_classes,
                           previous_memory=previous_memory, pseudo_fn=pseudo_fn, names=names,
                           batch_size=batch_size, num_workers=num_workers)
    if len(entries) < mem_size:
        warnings.warn(f"DKD-M memory of step {step}: only {len(entries)} of {mem_size} images found "
                      f"(no remaining candidate shows an old class)", RuntimeWarning, stacklevel=2)
    return sorted(entries, key=lambda entry: entry.name)
