"""SSUL (Cha et al., NeurIPS 2021): an "unknown" channel learnt from salient background pixels,
per-class BCE, pseudo-labels of the old classes above a sigmoid score, the new classifiers copied
from the unknown one, and everything but the classifiers frozen after step 0
(``utils/ssul.py`` holds the tensor functions and the channel layout)."""
from __future__ import annotations

from typing import Optional

from methods import register_component, register_method
from methods.base import Component, Context, Criterion, MethodSpec, StepInfo, TargetBuilder, Targets
from methods.common import add_switch
from utils import ssul as ssul_utils
from utils.reduce import channel_argmax


class SsulBCE(Criterion):
    """SSUL's BCE, summed over channels and averaged over the valid pixels (a scalar)."""

    name = "ssul"

    def __call__(self, ctx: Context):
        return ssul_utils.ssul_bce_loss(ctx.logits.float(), ctx.labels)


class SsulTargets(TargetBuilder):
    """Labels moved to SSUL's channel space (unknown from saliency); at step > 0 background and
    unknown pixels take the old model's class where its sigmoid score exceeds the threshold."""

    name = "ssul"

    def __init__(self, dataset: str, threshold: float, step: int):
        self.dataset, self.threshold = dataset, threshold
        self.needs_old_model = step > 0

    def __call__(self, labels, old_logits, saliency=None, old_probs=None) -> Targets:
        targets = ssul_utils.ssul_targets(labels, saliency, self.dataset)
        if old_logits is not None:
            targets = ssul_utils.ssul_pseudo_label(targets, old_logits, threshold=self.threshold)
        return Targets(targets)


def unknown_init(model, logger) -> None:
    model.init_unknown_classifier()
    if logger is not None:
        logger.info("New classifier initialised from the unknown class (SSUL)")


def ssul_prediction(logits):
    """Argmax after folding the unknown channel into the background."""
    return channel_argmax(ssul_utils.ssul_fold_unknown(logits))


class SSUL(Component):
    name = "ssul"
    priority = 100

    def add_options(self, parser):
        g = parser.add_argument_group("Method: SSUL")
        add_switch(g, "ssul", "SSUL training (set by --method SSUL): unknown channel, BCE, SSUL pseudo-labels, "
                              "weight transfer, frozen network at steps > 0")
        add_switch(g, "unknown", "add an 'unknown' output channel learnt from salient background pixels")
        add_switch(g, "bn_freeze", "at steps > 0 keep BatchNorm layers in eval mode, frozen")
        add_switch(g, "w_transfer", "initialise the new classes' classifier from the unknown one (needs --unknown)")
        g.add_argument("--ssul_pseudo_threshold", type=float, default=0.7,
                       help="sigmoid score above which an old-class prediction relabels a background/unknown pixel")

    def check(self, opts):
        if opts.pseudo == "ssul" and not opts.ssul:
            raise ValueError("--pseudo ssul needs --ssul (SSUL's label space with the unknown channel)")
        if opts.ssul and not opts.unknown:
            raise ValueError("--ssul needs --unknown (SSUL's classifier has an unknown channel)")
        if opts.w_transfer and not opts.unknown:
            raise ValueError("--w_transfer copies the unknown classifier: it needs --unknown")

    def derive(self, opts):
        opts.saliency = opts.unknown  # the unknown class is learnt from saliency maps

    def label_space(self, opts, nb_old, nb_current):
        if opts.ssul:  # the unknown channel lives inside cls, not in the label space
            return max(nb_old - 1, 0), nb_current - 1
        return nb_old, nb_current

    def criterion(self, info: StepInfo) -> Optional[Criterion]:
        return SsulBCE() if info.opts.ssul else None

    def targets(self, info: StepInfo) -> Optional[TargetBuilder]:
        o = info.opts
        return SsulTargets(o.dataset, o.ssul_pseudo_threshold, info.step) if o.ssul else None

    def init_classifier(self, info: StepInfo):
        return ("unknown", unknown_init) if info.opts.w_transfer else None

    def param_groups(self, model, opts, step):
        if opts.ssul and step > 0:
            return ssul_utils.ssul_trainable_parameters(model, opts.lr)
        return None

    def predict(self, opts):
        return ssul_prediction if opts.ssul else None

    def eval_loss(self, opts) -> bool:
        return not opts.ssul  # the softmax CE does not fit SSUL's sigmoid channels

    def find_unused_parameters(self, opts) -> bool:
        return bool(opts.ssul)

    def memory_pseudo_labels(self, opts):
        from dataset.memory import ssul_memory_pseudo_labels

        return ssul_memory_pseudo_labels if opts.ssul else None

    def setup_model(self, run, model, info: StepInfo) -> None:
        if info.opts.bn_freeze and info.step > 0:
            model.fix_bn()  # sticky: the model's train() keeps BN in eval


register_component(SSUL())
CLOVAAI_STEP0_RATES = ("--lr_body0", "0.001", "--lr_head0", "0.01")
# clovaai/SSUL's run.sh: --loss_type bce_loss --pseudo --pseudo_thresh 0.7 --freeze --bn_freeze
# --unknown --w_transfer
register_method(MethodSpec(
    "SSUL", preset={"ssul": True, "bce": True, "unknown": True, "pseudo": "ssul", "ssul_pseudo_threshold": 0.7,
                    "freeze": True, "bn_freeze": True, "w_transfer": True,
                    # clovaai/SSUL's step 0: backbone 0.001, head and classifiers 0.01, whatever --lr says
                    "lr_body0": 0.001, "lr_head0": 0.01},
    step0_family="ssul", memory=True, order=9, summary="unknown class + frozen network + BCE",
    # clovaai/SSUL's README: VOC 50 epochs lr 0.01, ADE 100 epochs lr 0.05 with warm_poly
    # (step 0 spells out the preset's two rates so that a dry run shows what step 0 trains with)
    sweep={"voc": {"epochs": 50, "lr0": 0.01, "lr": 0.01, "step0_args": list(CLOVAAI_STEP0_RATES)},
           "ade": {"epochs": 100, "lr0": 0.05, "lr": 0.05, "args": ["--lr_policy", "warm_poly"],
                   "step0_args": ["--lr_policy", "warm_poly", *CLOVAAI_STEP0_RATES]}}))
