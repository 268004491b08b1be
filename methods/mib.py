"""MiB (Cermelli et al., CVPR 2020): unbiased cross-entropy (old classes merged into the background),
unbiased KD (new classes merged into the background) and the balanced new-classifier init."""
from __future__ import annotations

from typing import Optional

from methods import register_component, register_method
from methods.base import Component, Context, Criterion, MethodSpec, StepInfo
from methods.common import add_switch
from utils import loss as L


class UnbiasedCrossEntropy(Criterion):
    """``-log(sum_{c < C_o} p_c)`` on background pixels, ``-log p_y`` elsewhere (per pixel)."""

    name = "unce"

    def __init__(self, nb_old: int):
        self.loss = L.UnbiasedCrossEntropy(old_cl=nb_old, reduction="none")

    def __call__(self, ctx: Context):
        return self.loss(ctx.logits.float(), ctx.labels)


def balanced_init(model, logger) -> None:
    model.init_new_classifier()
    if logger is not None:
        logger.info("New classifier initialised from the background (MiB balanced init)")


class MiB(Component):
    name = "mib"
    priority = 5

    def add_options(self, parser):
        g = parser.add_argument_group("Method: MiB")
        add_switch(g, "unce", "unbiased cross-entropy (old classes merged into background)")
        add_switch(g, "unkd", "unbiased knowledge distillation (new classes merged into background)")
        add_switch(g, "init_balanced",
                   "initialise new classifiers from the background one (bias - log(N_new + 1))")

    def criterion(self, info: StepInfo) -> Optional[Criterion]:
        return UnbiasedCrossEntropy(info.nb_old) if info.opts.unce and info.step > 0 else None

    def init_classifier(self, info: StepInfo):
        return ("balanced", balanced_init) if info.opts.init_balanced else None


register_component(MiB())
# MiB's and PLOP's repositories use loss_kd 10 (ORIGINAL_REPO_VALUES)
register_method(MethodSpec("MiB", preset={"loss_kd": 40, "unce": True, "unkd": True, "init_balanced": True},
                           memory=True, order=7, summary="unbiased CE + unbiased KD + balanced init"))
