"""SATS (Qiu et al., Pattern Recognition 2023): transfer of the encoder's self-attention, pooled per
class region (``utils/sats.py``), on top of entropy pseudo-labels (PLOP's) and MiB's unbiased KD."""
from __future__ import annotations

from methods import register_component, register_method
from methods.base import Component, Context, LossTerm, MethodSpec, StepInfo
from methods.common import add_switch
from utils import loss as L

DISTILL_OBJECTS = ("sats-selfattn", "sats-selfattn-GP", "sats-selfattn-NP", "sats-feature-CNN")


class AttentionTransfer(LossTerm):
    """``distill_weight_args × sats_loss(A_new, A_old, labels)``: class-specific region pooling of the
    encoder's self-attention maps (or, ``sats-feature-CNN``, of the CNN feature maps)."""

    name = "sats"

    def __init__(self, weight: float, variant: str, legacy_layout: bool):
        super().__init__(weight)
        self.variant, self.legacy_layout = variant, legacy_layout
        self.key = "featuremaps" if variant == "sats-feature-CNN" else "attn_maps"
        self.new_wants = self.old_wants = frozenset({self.key})

    def __call__(self, ctx: Context):
        return L.sats_loss(ctx.extras[self.key], ctx.old_extras[self.key], ctx.labels, variant=self.variant,
                           legacy_layout=self.legacy_layout)


class SATS(Component):
    name = "sats"
    order = 50

    def add_options(self, parser):
        g = parser.add_argument_group("Method: SATS")
        add_switch(g, "distill_segformer", "self-attention transfer term at step > 0 (set by --method SATS)")
        g.add_argument("--distill_object", type=str, default="sats-selfattn", choices=DISTILL_OBJECTS,
                       help="what SATS distils: class-pooled attention maps (sats-selfattn), globally "
                            "pooled (-GP), unpooled (-NP), or DeepLab features (sats-feature-CNN)")
        g.add_argument("--distill_weight_args", type=float, default=10,
                       help="weight of the SATS term (applied to every --distill_object)")
        g.add_argument("--sats_legacy_reshape", action="store_true", default=False,
                       help="reshape attention maps as the published code does (heads and positions mixed "
                            "in stages 2-4) instead of the per-head layout")

    def check(self, opts):
        attention = opts.distill_object != "sats-feature-CNN"
        if opts.distill_segformer and attention and not opts.model.startswith("segformer"):
            raise ValueError(f"--distill_object {opts.distill_object} transfers self-attention maps, which "
                             f"--model {opts.model} does not have; use a segformer model or --distill_object "
                             f"sats-feature-CNN")

    def terms(self, info: StepInfo) -> list:
        o = info.opts
        if not o.distill_segformer:
            return []
        return [AttentionTransfer(o.distill_weight_args, o.distill_object, o.sats_legacy_reshape)]

    def log_samples(self, run, model, model_old, dataset, indices, epoch) -> None:
        """The class-pooled attention maps of the old and the new model (two images)."""
        o = run.opts
        if model_old is None or not o.distill_segformer or o.distill_object == "sats-feature-CNN":
            return
        import torch

        from utils import tensorboard_samples as tb

        with torch.no_grad():
            for tag, panel in tb.pooled_attention_panels(model.eval(), model_old, dataset, indices[:2] or [0],
                                                         run.device, o.sats_legacy_reshape):
                run.logger.add_image(f"SATS_attention/{tag}", panel[None], epoch, dataformats="CHW")
        model.train()


register_component(SATS())
register_method(MethodSpec(
    "SATS", preset={"pseudo": "entropy", "threshold": 0.001,
                    # the SATS code computes PLOP's adaptive factor but never applies it: off, as published
                    "classif_adaptive_factor": False, "init_balanced": True, "loss_kd": 20, "unkd": True,
                    "unce": False,  # plain CE on the pseudo-labelled target
                    "distill_segformer": True, "distill_object": "sats-selfattn", "distill_weight_args": 20},
    memory=True, order=10, summary="self-attention transfer + pseudo-labels + unbiased KD"))
