"""ILT (Michieli & Zanuttigh, 2019): output KD plus an L2 distillation of the encoder features."""
from __future__ import annotations

from methods import register_component, register_method
from methods.base import Component, Context, LossTerm, MethodSpec, StepInfo
from utils import loss as L


class FeatureDistillation(LossTerm):
    """``loss_de × MSE(f_new, f_old)`` on the backbone output (mean over elements)."""

    name = "de"
    new_wants = old_wants = frozenset({"body"})

    def __call__(self, ctx: Context):
        return L.features_l2(ctx.extras["body"], ctx.old_extras["body"])


class ILT(Component):
    name = "ilt"
    order = 20

    def add_options(self, parser):
        g = parser.add_argument_group("Method: ILT (feature distillation)")
        g.add_argument("--loss_de", type=float, default=0.0,
                       help="weight of the L2 distillation of the encoder features; 0 = off")

    def terms(self, info: StepInfo) -> list:
        return [FeatureDistillation(info.opts.loss_de)] if info.opts.loss_de > 0 else []


register_component(ILT())
register_method(MethodSpec("ILT", preset={"loss_kd": 10, "loss_de": 10}, order=3,
                           summary="output + encoder-feature distillation"))
