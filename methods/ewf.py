"""EWF, endpoints weight fusion (Xiao et al., CVPR 2023), as a technique: ``--method MiB+EWF``.

At the end of every step t > 0, once the base method has trained and saved ``θ_t``, the step's
checkpoint is replaced by an average with the weights ``θ*_{t−1}`` the step started from::

    θ*_t = (1 − α_t) · θ*_{t−1} + α_t · θ_t,      α_t = sqrt(N_new / (N_old + N_new))

``N_old`` counts every class of the earlier steps, background included, ``N_new`` the classes of
step t (the task table's counts); ``--ewf_alpha`` replaces α by a fixed number. Every
floating-point entry the old endpoint has is fused (BatchNorm running statistics included);
integer buffers and the newest classifier keep the trained values. ``θ*_{t−1}`` is the file the
step's old model was loaded from (``--step_ckpt`` when given), itself fused at its own step.
The fused file is what the step tests and what the next step loads. The checkpoint records
``ewf = {fused, alpha, old_checkpoint, threshold_fraction}``, so fusing is done once: a resumed
step that finds its file fused leaves it alone, and one whose run died between the last save and
the fusion fuses it.

``--fix_pre_cls`` (in the EWF preset; NeST's PLOP scripts use it too) freezes the old classifiers
``cls[0..t−1]`` during the step: ``requires_grad=False`` before the optimiser is built, so they get
no update, no weight decay and no momentum. Fusing them then only undoes what the base method's
initialisation moved (MiB's balanced init shifts the background bias by ``−log(N_new + 1)``; the
fused bias is ``b − α·log(N_new + 1)``).

The tensor functions are in ``utils/ewf.py``.
"""
from __future__ import annotations

import argparse
import os

from methods import register_component, register_method
from methods.base import Component, MethodSpec, StepInfo
from methods.common import add_switch, hidden_switch, technique_group
from utils import ewf as ewf_utils
from utils.checkpoint import load_checkpoint

EWF_ONLY = ("ewf_alpha", "ewf_threshold_fraction", "ewf_keep_unfused")


def fusion_alpha(opts, classes) -> float:
    """``--ewf_alpha`` when given, else ``sqrt(classes[-1] / Σ classes)`` (per-step class counts)."""
    if opts.ewf_alpha is not None:
        return ewf_utils.check_alpha(opts.ewf_alpha)
    return ewf_utils.ewf_alpha(classes)


class EWF(Component):
    name = "ewf"
    order = 95  # its hook fuses the saved file: after every other component's after_step

    def add_options(self, parser):
        g = technique_group(parser)
        hidden_switch(g, "weight_fusion")
        add_switch(g, "fix_pre_cls", "freeze the old classifiers at steps > 0 (EWF preset)")
        g.add_argument("--ewf_alpha", type=float, default=None, metavar="A",
                       help="EWF: weight of the trained endpoint (default: sqrt(new / seen classes))")
        g.add_argument("--ewf_threshold_fraction", type=float, default=None, help=argparse.SUPPRESS)
        g.add_argument("--ewf_keep_unfused", action="store_true", default=False, help=argparse.SUPPRESS)

    def check(self, opts):
        if not opts.weight_fusion:
            for option in EWF_ONLY:
                if getattr(opts, option) not in (None, False):
                    raise ValueError(f"--{option} needs --weight_fusion (--method BASE+EWF)")
        if opts.ewf_alpha is not None:
            ewf_utils.check_alpha(opts.ewf_alpha)
        if opts.ewf_threshold_fraction is not None and not 0.0 < opts.ewf_threshold_fraction <= 1.0:
            raise ValueError(f"--ewf_threshold_fraction must be in (0, 1] (the published variant: "
                             f"{ewf_utils.ORIGINAL_THRESHOLD_FRACTION}), got {opts.ewf_threshold_fraction}")
        if opts.ssul and (opts.weight_fusion or opts.fix_pre_cls):
            option = "--weight_fusion" if opts.weight_fusion else "--fix_pre_cls"
            raise ValueError(f"{option} cannot be combined with SSUL: {SSUL_REASON}; remove {option}")
        if opts.weight_fusion and opts.base_weights:
            raise ValueError("--weight_fusion cannot be combined with --base_weights: the fusion averages with "
                             "the previous step's weights, which --base_weights does not start from; remove one")

    def setup_model(self, run, model, info: StepInfo) -> None:
        o = info.opts
        if info.step == 0:
            return
        if o.weight_fusion:
            check_resumable(o)
        if o.fix_pre_cls:
            frozen = ewf_utils.freeze_old_classifiers(model)
            last = len(model.cls) - 2
            run.logger.info(f"--fix_pre_cls: the old classifiers (cls.0{f' to cls.{last}' if last else ''}, "
                            f"{len(frozen)} tensors) are frozen for this step")

    def after_step(self, run, info: StepInfo) -> None:
        o = info.opts
        if not o.weight_fusion or info.step == 0 or run.rank != 0:
            return
        alpha = fusion_alpha(o, run.classes)
        report = ewf_utils.fuse_checkpoint(run.checkpoint, run.previous_checkpoint, alpha,
                                           o.ewf_threshold_fraction, o.ewf_keep_unfused)
        if not report.fused:
            run.logger.info(f"EWF: {run.checkpoint} is fused already (alpha {report.alpha:.6f}); left as it is")
            return
        delta = ", ".join(f"{k} {v:.3g}" for k, v in sorted(report.mean_abs_delta.items()))
        run.logger.info(f"EWF: fused {run.checkpoint} with {report.old_checkpoint}, alpha {alpha:.6f} "
                        f"(weight of the trained endpoint); mean |trained - old| per module: {delta}"
                        + (f"; unfused copy {ewf_utils.unfused_path(run.checkpoint)}" if o.ewf_keep_unfused else ""))
        run.logger.add_scalar("EWF/alpha", alpha, info.step)


def check_resumable(opts) -> None:
    """A fused checkpoint ends its step: training on from it (``--ckpt`` with more ``--epochs``)
    would fuse the fused weights a second time. Re-testing it (as many epochs as it holds) is fine."""
    if opts.ckpt is None or not os.path.isfile(opts.ckpt):
        return
    ckpt = load_checkpoint(opts.ckpt)
    done = int(ckpt.get("epoch", -1)) + 1
    if ewf_utils.is_fused(ckpt) and done < opts.epochs:
        raise ValueError(f"--ckpt {opts.ckpt} holds fused weights (EWF ran at the end of its step after "
                         f"{done} epochs); training it to --epochs {opts.epochs} would fuse twice. Resume from "
                         f"its unfused copy (--ewf_keep_unfused) or train the step again")


SSUL_REASON = ("SSUL trains its unknown and background classifiers at steps > 0 (so --fix_pre_cls cannot "
               "freeze them) and freezes the rest of the network, and no paper defines the fusion of its "
               "endpoints")

register_component(EWF())
register_method(MethodSpec(
    "EWF", preset={"weight_fusion": True, "fix_pre_cls": True}, technique=True, order=101,
    refuses={"SSUL": SSUL_REASON},
    summary="endpoints weight fusion: (1 - a)·previous + a·trained at the end of each step",
    # the authors' scripts: every step 30 (VOC) / 60 (ADE) epochs, lr 0.01 then 0.001 (the
    # defaults); MiB with the MiB repository's KD weight, 100 on the long ADE tasks
    sweep={"voc+MiB": {"args": ["--loss_kd", "10"]},
           "ade:100-50+MiB": {"args": ["--loss_kd", "10"]},
           "ade:50+MiB": {"args": ["--loss_kd", "10"]},
           "ade:100-10+MiB": {"args": ["--loss_kd", "100"]},
           "ade:100-5+MiB": {"args": ["--loss_kd", "100"]}}))
