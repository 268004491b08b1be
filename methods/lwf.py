"""LwF (Li & Hoiem, 2017): knowledge distillation of the old model's outputs, ``--loss_kd``.

The KD term is also MiB's (``--unkd``: new-class probabilities merged into the background) and
SATS's. ``--alpha`` sharpens the teacher: ``softmax(alpha * z_old)``.
"""
from __future__ import annotations

from methods import register_component, register_method
from methods.base import Component, Context, LossTerm, MethodSpec, StepInfo
from utils import loss as L


class OutputDistillation(LossTerm):
    """``loss_kd × KD(z, z_old)``: KD over the old channels (MiB's UNKD with ``unbiased``)."""

    name = "kd"

    def __init__(self, weight: float, unbiased: bool, alpha: float):
        super().__init__(weight)
        self.unbiased = unbiased
        self.alpha = alpha
        self.shares_old_softmax = alpha == 1  # the teacher is softmax(z_old), computed once
        kind = L.UnbiasedKnowledgeDistillationLoss if unbiased else L.KnowledgeDistillationLoss
        self.loss = kind(reduction="mean", alpha=alpha)

    def __call__(self, ctx: Context):
        teacher = ctx.old_probs if self.shares_old_softmax else None
        shared = {"log_probs": ctx.log_probs} if self.unbiased else {}
        return self.loss(ctx.logits.float(), ctx.old_logits.float(), teacher=teacher, **shared)


class LearningWithoutForgetting(Component):
    name = "lwf"
    order = 10

    def add_options(self, parser):
        g = parser.add_argument_group("Method: LwF (output distillation; also MiB, SATS)")
        g.add_argument("--loss_kd", type=float, default=0.0,
                       help="weight of the output knowledge distillation (LwF / MiB); 0 = off")
        g.add_argument("--alpha", type=float, default=1.0,
                       help="sharpening exponent of the old model's soft targets (MiB)")

    def terms(self, info: StepInfo) -> list:
        o = info.opts
        return [OutputDistillation(o.loss_kd, bool(o.unkd), o.alpha)] if o.loss_kd > 0 else []


register_component(LearningWithoutForgetting())
register_method(MethodSpec("LWF", preset={"loss_kd": 100}, order=1, summary="output distillation"))
