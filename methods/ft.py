"""FT: fine-tuning, the lower bound. Its step 0 (plain cross-entropy) is the one FT, LwF, ILT, MiB,
PLOP and SATS share. Also owns ``--bce``: one-vs-all sigmoids instead of the softmax CE."""
from __future__ import annotations

from typing import Optional

from methods import register_component, register_method
from methods.base import Component, Context, Criterion, MethodSpec, StepInfo
from methods.common import add_switch
from utils import loss as L


class BinaryCrossEntropy(Criterion):
    """Per-pixel ``sum_c BCE(z_c, onehot(y)_c)`` over the channels, ignored pixels 0."""

    name = "bce"

    def __call__(self, ctx: Context):
        return L.BCEWithLogitsLossWithIgnoreIndex(reduction="none")(ctx.logits.float(), ctx.labels)


class FineTuning(Component):
    name = "ft"
    priority = 10

    def add_options(self, parser):
        g = parser.add_argument_group("Method: FT (fine-tuning)")
        add_switch(g, "bce", "binary cross-entropy (one-vs-all sigmoid) instead of softmax CE")

    def criterion(self, info: StepInfo) -> Optional[Criterion]:
        return BinaryCrossEntropy() if info.opts.bce else None


register_component(FineTuning())
register_method(MethodSpec("FT", order=0, summary="fine-tuning on the new classes only"))
