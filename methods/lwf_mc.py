"""LwF-MC / iCaRL's loss (Rebuffi et al., 2017): BCE on the new classes plus BCE distillation of the
old model's sigmoids on the old channels. Its step 0 (BCE) is its own."""
from __future__ import annotations

from typing import Optional

from methods import register_component, register_method
from methods.base import Component, Context, Criterion, LossTerm, MethodSpec, StepInfo
from methods.common import add_switch
from methods.ft import BinaryCrossEntropy
from utils import loss as L


class IcarlDistillation(LossTerm):
    """``icarl_importance × C_o × mean BCEWithLogits(z[:, :C_o], sigmoid(z_old))`` (combined form)."""

    name = "icarl"

    def __call__(self, ctx: Context):
        return L.icarl_distillation(ctx.logits, ctx.old_logits)


class IcarlDisjoint(Criterion):
    """One BCE: ground truth on the new channels, the old model's sigmoids on the old ones."""

    name = "icarl_disjoint"

    def __init__(self, bkg: bool):
        self.loss = L.IcarlLoss(reduction="none", bkg=bkg)

    def __call__(self, ctx: Context):
        import torch

        return self.loss(ctx.logits.float(), ctx.labels, torch.sigmoid(ctx.old_logits.float()))


class LwfMC(Component):
    name = "lwf_mc"
    priority = 80
    order = 30

    def add_options(self, parser):
        g = parser.add_argument_group("Method: LwF-MC (iCaRL's loss)")
        add_switch(g, "icarl", "LwF-MC / iCaRL: BCE on new classes + BCE distillation on old ones")
        g.add_argument("--icarl_importance", type=float, default=1.0,
                       help="weight of the iCaRL distillation term")
        g.add_argument("--icarl_disjoint", action="store_true", default=False,
                       help="one BCE with old-model targets on old channels (instead of two terms)")
        g.add_argument("--icarl_bkg", action="store_true", default=False,
                       help="take the background target from the ground truth")

    def criterion(self, info: StepInfo) -> Optional[Criterion]:
        o = info.opts
        if o.icarl and o.icarl_disjoint and info.step > 0:
            return IcarlDisjoint(o.icarl_bkg)
        return BinaryCrossEntropy() if o.icarl else None

    def terms(self, info: StepInfo) -> list:
        o = info.opts
        if o.icarl and not o.icarl_disjoint:
            return [IcarlDistillation(o.icarl_importance)]
        return []


register_component(LwfMC())
register_method(MethodSpec("LWF-MC", preset={"icarl": True, "icarl_importance": 10}, step0_family="lwf-mc",
                           order=2, summary="iCaRL's BCE distillation"))
