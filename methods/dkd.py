"""DKD (Baek et al., NeurIPS 2022, "Decomposed Knowledge Distillation for Class-Incremental Semantic
Segmentation") and DKD-M (with the exemplar memory).

DKD has its own network (``modules/dkd_model.py``): channel 0 is a one-channel auxiliary classifier that
reads detached features, channel k ≥ 1 scores class k, every channel is an independent sigmoid and
there is no background channel. The tensor functions live in ``utils/dkd.py``; this module binds
them to the options and the trainer. Notation: ``BCE_p(x, q) = −[p·q·log σ(x) + (1 − q)·log(1 − σ(x))]``,
``mean_pix`` = mean over every pixel of the batch (background and void included), ``F`` = the
first class of the step (1 at step 0), ``K`` = the old model's class count, ``w_*`` = ``--dkd_weights``.

    mbce     = w_mbce · Σ_{c ≥ F} mean_pix BCE_p(z_c, 1[y = c])   (p = --dkd_pos_weight of the step)
    dkd_kd   = w_kd   · Σ_{k=1..K} mean_pix BCE(z_k, σ(z_old_k))
    dkd_pos  = w_pos  · Σ_{k=1..K} mean_pix BCE(pos_k, σ(pos_old_k))    pos_k = Σ_d max(W_kd, 0)·f_d
    dkd_neg  = w_neg  · Σ_{k=1..K} mean_pix BCE(neg_k, σ(neg_old_k))    neg_k = Σ_d min(W_kd, 0)·f_d
    dkd_ac   = w_ac   · mean_pix BCE(z_0, 0)

Step 0 trains ``mbce_ac = mbce + dkd_ac`` (one criterion: the recipe has no loss terms at step 0);
steps > 0 train ``mbce + dkd_kd + dkd_pos + dkd_neg + dkd_ac``. The evidence maps ``pos``/``neg``
are the classifier's response split by the sign of its weights, without bias, at the feature
resolution; ``f`` is the classifier's input.

At steps > 0 BatchNorm (statistics and affine parameters) and dropout are frozen, weight decay
applies to the new classifier only, and every new classifier row starts as a copy of the auxiliary
classifier. A pixel is predicted as its best class when that class's sigmoid exceeds 0.5, else as
background.
"""
from __future__ import annotations

from typing import Optional

from methods import register_component, register_method
from methods.base import Component, Context, Criterion, LossTerm, MethodSpec, StepInfo
from methods.common import add_switch
from utils import dkd as dkd_utils
from utils.dkd import DKDWeights

#: ``--dkd_pos_weight`` when not given: (step 0, later steps), the published per-dataset values
DEFAULT_POS_WEIGHTS = {"voc": (2.0, 1.0), "ade": (35.0, 35.0)}
WEIGHT_NAMES = ("MBCE", "KD", "POS", "NEG", "AC")


def dkd_weights(opts) -> DKDWeights:
    """The five term weights of ``--dkd_weights MBCE KD POS NEG AC``."""
    return DKDWeights(*(float(w) for w in opts.dkd_weights))


def pos_weight(opts, step: int) -> float:
    """p of the step's mBCE: the first ``--dkd_pos_weight`` value at step 0, the last one after."""
    values = opts.dkd_pos_weight
    return float(values[0] if step == 0 else values[-1])


# --------------------------------------------------------------------------------------------
# Criterion and loss terms
# --------------------------------------------------------------------------------------------
class NewClassBCE(Criterion):
    """``w_mbce · Σ_{c ≥ F} mean_pix BCE_p(z_c, 1[y = c])`` (a scalar), plus ``w_ac · mean_pix
    BCE(z_0, 0)`` when ``aux_weight`` is given (step 0, named ``mbce_ac``).

    ``F = max(ctx.nb_old, 1)``: channel 0 is the auxiliary score, so the step-0 classes start at 1.
    Void pixels are negatives of every channel and count in the mean unless ``ignore_void``.
    """

    def __init__(self, weight: float, pos_weight: float, ignore_void: bool, aux_weight: float = 0.0):
        self.weight, self.pos_weight, self.ignore_void = float(weight), float(pos_weight), bool(ignore_void)
        self.aux_weight = float(aux_weight)
        self.name = "mbce_ac" if self.aux_weight else "mbce"

    def __call__(self, ctx: Context):
        loss = self.weight * dkd_utils.new_class_bce(ctx.logits, ctx.labels, max(ctx.nb_old, 1), self.pos_weight,
                                                     self.ignore_void)
        if self.aux_weight:
            loss = loss + self.aux_weight * dkd_utils.aux_classifier_loss(ctx.logits[:, 0])
        return loss


class SigmoidKD(LossTerm):
    """``Σ_{k=1..K} mean_pix BCE(z_k, σ(z_old_k))``: the old classes' scores, auxiliary channel excluded."""

    name = "dkd_kd"

    def __call__(self, ctx: Context):
        return dkd_utils.old_class_kd(ctx.logits, ctx.old_logits)


class DecomposedKD(LossTerm):
    """``Σ_{k=1..K} mean_pix BCE(e_k, σ(e_old_k))`` on the positive (``dkd_pos``) or negative
    (``dkd_neg``) evidence maps of both models."""

    def __init__(self, weight: float, key: str):
        super().__init__(weight)
        self.key = key
        self.name = "dkd_pos" if key == dkd_utils.EVIDENCE_POS else "dkd_neg"
        self.new_wants = self.old_wants = frozenset({key})

    def __call__(self, ctx: Context):
        return dkd_utils.decomposed_kd(ctx.extras[self.key], ctx.old_extras[self.key])


class AuxiliaryClassifierTerm(LossTerm):
    """``mean_pix BCE(z_0, 0)``: every pixel a negative of the auxiliary classifier."""

    name = "dkd_ac"

    def __call__(self, ctx: Context):
        return dkd_utils.aux_classifier_loss(ctx.logits[:, 0])


def aux_init(model, logger) -> None:
    dkd_utils.init_new_classifier_from_aux(model)
    if logger is not None:
        logger.info("New classifier initialised from the auxiliary classifier (DKD)")


# --------------------------------------------------------------------------------------------
# The component
# --------------------------------------------------------------------------------------------
def _refusals(opts) -> list:
    """``(applies, option, reason)`` for the options DKD's network or recipe cannot honour."""
    softmax = "it reads a softmax with a background channel; DKD's channels are sigmoids"
    groups = "DKD has its own optimiser groups (backbone lr, head and classifiers lr x --lr_head)"
    return [
        (opts.cosine, "--cosine", "DKD's classifiers are plain 1x1 convolutions"),
        ((opts.nb_background_modes or 1) > 1, "--nb_background_modes", "DKD has no background channel"),
        (opts.align_weight is not None, "--align_weight", "DKD has no background channel"),
        (opts.unknown, "--unknown", "DKD has no unknown channel"),
        (opts.ssul, "--ssul", "DKD has no unknown channel"),
        (opts.bce, "--bce", "DKD trains its own BCE (mBCE)"),
        (opts.icarl, "--icarl", "DKD trains its own BCE and distillation"),
        (opts.unce, "--unce", softmax),
        (opts.loss_kd > 0, "--loss_kd", softmax + " (DKD's KD weight: --dkd_weights)"),
        (opts.pseudo is not None, "--pseudo", "DKD does not pseudo-label its training targets"),
        (opts.init_balanced, "--init_balanced", "DKD initialises new classifiers from the auxiliary one"),
        (opts.base_weights, "--base_weights", "DKD's classifier layout differs"),
        (opts.freeze, "--freeze", groups),
        (opts.lr_old is not None, "--lr_old", groups),
        (opts.lr_body0 is not None, "--lr_body0", groups),
        (opts.lr_head0 is not None, "--lr_head0", groups),
    ]


class DKD(Component):
    name = "dkd"
    priority = 90
    order = 60

    def add_options(self, parser):
        g = parser.add_argument_group("Method: DKD (sigmoid classifiers + auxiliary channel)")
        add_switch(g, "dkd", "DKD's network and losses (set by --method DKD)")
        g.add_argument("--dkd_weights", type=float, nargs=5, default=[1.0, 5.0, 5.0, 5.0, 1.0], metavar=WEIGHT_NAMES,
                       help="weights of mBCE, KD, DKD pos/neg, AC (default: 1 5 5 5 1)")
        g.add_argument("--dkd_pos_weight", type=float, nargs="+", default=None, metavar=("P0", "P"),
                       help="mBCE positive weight at step 0 [, later] (default: VOC 2 1, ADE 35)")
        g.add_argument("--dkd_ignore_void", action="store_true", default=False,
                       help="leave void pixels out of mBCE (published: negatives)")
        g.add_argument("--dkd_memory_legacy", action="store_true", default=False,
                       help="DKD-M at step > 1: label candidates with an untrained model, as published")

    def check(self, opts):
        if not opts.dkd:
            for name in ("dkd_ignore_void", "dkd_memory_legacy"):
                if getattr(opts, name):
                    raise ValueError(f"--{name} needs --dkd (--method DKD)")
            if opts.dkd_pos_weight is not None:
                raise ValueError("--dkd_pos_weight needs --dkd (--method DKD)")
            return
        for applies, option, reason in _refusals(opts):
            if applies:
                raise ValueError(f"{option} cannot be combined with DKD: {reason}; remove {option} "
                                 f"(presets of other methods set some of these: use --method DKD)")
        if any(w < 0 for w in opts.dkd_weights):
            raise ValueError(f"--dkd_weights must be >= 0, got {opts.dkd_weights}")
        if opts.dkd_weights[0] == 0 and opts.dkd_weights[4] == 0:
            raise ValueError("--dkd_weights: MBCE and AC are both 0, so step 0 has nothing to train")
        values = opts.dkd_pos_weight
        if values is not None and (len(values) > 2 or any(v <= 0 for v in values)):
            raise ValueError(f"--dkd_pos_weight takes one or two values > 0 (step 0, later steps), got {values}")
        if opts.dkd_memory_legacy and not opts.mem_size:
            raise ValueError("--dkd_memory_legacy changes how DKD-M chooses its memory; it needs a memory "
                             "(--method DKD-M or --mem_size N)")

    def derive(self, opts):
        if opts.dkd and opts.dkd_pos_weight is None:
            opts.dkd_pos_weight = list(DEFAULT_POS_WEIGHTS[opts.dataset])

    # ---- model
    def build_model(self, opts, classes):
        if not getattr(opts, "dkd", False):
            return None
        from modules.dkd_model import build_dkd_model

        return build_dkd_model(opts, classes)

    def model_tag(self, opts) -> Optional[str]:
        """What a checkpoint's identity should add to the model name: DKD's network is not
        interchangeable with the softmax one of the same ``--model``."""
        return "dkd" if getattr(opts, "dkd", False) else None

    # ---- one step
    def criterion(self, info: StepInfo) -> Optional[Criterion]:
        o = info.opts
        if not o.dkd:
            return None
        w = dkd_weights(o)
        return NewClassBCE(w.mbce, pos_weight(o, info.step), o.dkd_ignore_void,
                           aux_weight=w.ac if info.step == 0 else 0.0)

    def terms(self, info: StepInfo) -> list:
        o = info.opts
        if not o.dkd:
            return []
        w = dkd_weights(o)
        return [SigmoidKD(w.kd), DecomposedKD(w.dkd_pos, dkd_utils.EVIDENCE_POS),
                DecomposedKD(w.dkd_neg, dkd_utils.EVIDENCE_NEG), AuxiliaryClassifierTerm(w.ac)]

    def init_classifier(self, info: StepInfo):
        o = info.opts
        return ("aux", aux_init) if o.dkd and dkd_weights(o).ac > 0 else None

    def param_groups(self, model, opts, step):
        if not opts.dkd:
            return None
        return dkd_utils.dkd_param_groups(model, opts.lr, opts.weight_decay, step, head_lr_factor=opts.lr_head)

    def predict(self, opts):
        return dkd_utils.dkd_prediction if opts.dkd else None

    def eval_loss(self, opts) -> bool:
        return not opts.dkd  # the softmax CE does not fit sigmoid channels without background

    def find_unused_parameters(self, opts) -> bool:
        # a term of weight 0 leaves some classifier (the auxiliary one, the old ones) without gradient
        return bool(opts.dkd) and any(w == 0 for w in opts.dkd_weights)

    def memory_pseudo_labels(self, opts):
        return dkd_utils.dkd_memory_pseudo_labels if opts.dkd else None

    # ---- step hooks
    def setup_model(self, run, model, info: StepInfo) -> None:
        o = info.opts
        if not o.dkd or info.step == 0:
            return
        model.freeze_bn_and_dropout()
        if o.dkd_memory_legacy and o.mem_size and info.step > 1:
            choose_legacy_memory(run, info.step)


def choose_legacy_memory(run, step: int) -> None:
    """DKD-M's memory as published: step ``step``'s candidates are labelled by a freshly built
    model of the previous step's classes (ImageNet backbone, random head and classifiers), not by
    the trained one. Written where the memory loader reads it; an existing file (resume) is kept.
    The fresh model is drawn from a forked RNG seeded with ``--random_seed``, so training's random
    stream is the one of the default memory."""
    import os

    import torch

    import tasks
    from dataset import memory as mem
    from modules.dkd_model import memory_labelling_model
    from methods.memory import choose_memory, memory_path
    from utils import distributed as dist_utils

    opts = run.opts
    path = memory_path(opts, step)
    if os.path.isfile(path):
        return
    old_classes = tasks.get_per_task_classes(opts.dataset, opts.task, step - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.random_seed)
        labeller = memory_labelling_model(run.model_old, opts, old_classes, legacy=True)
    run.logger.info(f"--dkd_memory_legacy: the memory of step {step} is chosen with an untrained step-{step - 1} "
                    f"model (ImageNet backbone, random head), as the published code did")
    entries = choose_memory(opts, step, labeller, run.device, run.logger)
    if run.rank == 0:
        mem.save_memory(path, entries, meta={"task": opts.task, "dataset": opts.dataset, "step": step,
                                             "mem_size": opts.mem_size, "seed": opts.random_seed,
                                             "dkd_memory_legacy": True})
    dist_utils.barrier()


register_component(DKD())
register_method(MethodSpec(
    "DKD", preset={"dkd": True, "lr_head": 10, "norm_act": "std"},
    step0_family="dkd", memory=True, order=11,
    summary="sigmoid classifiers + decomposed KD + auxiliary classifier",
    # the authors' scripts: VOC 60 epochs at lr 1e-3 then 1e-4; ADE 100 epochs at 2.5e-3 then 2.5e-4
    # with a warm-up + poly schedule
    sweep={"voc": {"epochs": 60, "lr0": 0.001, "lr": 0.0001},
           "ade": {"epochs": 100, "lr0": 0.0025, "lr": 0.00025,
                   "args": ["--lr_policy", "warm_poly", "--lr_warmup", "0.2"],
                   "step0_args": ["--lr_policy", "warm_poly", "--lr_warmup", "0.2"]}}))
