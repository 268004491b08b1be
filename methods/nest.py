"""NeST (Xie et al., ECCV 2024), as a technique: ``--method MiB+NeST``. At every step t > 0, before
the base method trains, the new classifier is generated from the old ones and pre-tuned.

1. Selection: the frozen old model runs over the step's training images; for new class ``c``
   (pixels ``S_c``), old class ``j`` and feature channel ``d`` (``f`` the head output, ``p`` the old
   softmax, ``W`` the stacked old classifiers, background first)::

       M0[c, j, d] = (1 / |S_c|) Σ_{n ∈ S_c} p_n[j] · 1[f_n[d] · W[j, d] > 0]
       P0[c]       = softmax_j( Σ_d M0[c, j, d] )

2. Pre-tuning: only ``M``, ``P`` (from ``M0``, ``P0``), the new biases ``b_new`` (from the background
   bias), a background channel mask ``m_bg`` and scale ``s`` (from 1) are trained, for
   ``--nest_epochs`` epochs at ``lr × --nest_lr_scale`` (SGD, poly schedule), with the network frozen
   in train mode and the unbiased cross-entropy (``--nest_loss``) of the classifier::

       w_c = Σ_j P[c, j] · (M[c, j] ⊙ W[j])   (new rows),     w_bg = s · (m_bg ⊙ W[0])

3. Installation: ``cls[t] ← (w, b_new · ‖b_old‖ / ‖b_new‖)``, the background row ``← w_bg`` rescaled to
   its loaded norm, the new rows to the old rows' mean norm. This replaces the base method's
   classifier initialisation (MiB's balanced init does not run); the base method then trains as usual.

The checkpoint records ``methods.nest = {done, epochs, lr, counts, ...}``: a step resumed with
``--ckpt`` from a checkpoint of its own never pre-tunes again. The tensor functions are in
``utils/nest.py``; the options share the "Techniques" section of ``--help`` with EWF, whose
``--fix_pre_cls`` (freeze the old classifiers during the step) NeST's PLOP scripts use.
"""
from __future__ import annotations

import argparse

from methods import register_component, register_method
from methods.base import Component, MethodSpec, StepInfo
from methods.common import hidden_switch, technique_group
from utils import nest as nest_utils

NEST_ONLY = {"nest_epochs": None, "nest_lr_scale": None, "nest_loss": None, "nest_unkd": None, "nest_grid": None,
             "nest_legacy_bias_init": False, "nest_legacy_schedule": False, "nest_bias_norm": None,
             "nest_empty_class": None}

SSUL_REASON = ("SSUL's channel 0 is its unknown class, its classifiers are per-class sigmoids and its new "
               "classifier copies the unknown one; NeST generates softmax classifiers from a background row")
DKD_REASON = ("DKD's network has sigmoid channels, an auxiliary channel 0 and no background classifier, "
              "and initialises new classifiers from the auxiliary one")
SIGMOID_REASON = ("the pre-tuning fits the generated classifier to a softmax (unbiased CE) and selects old "
                  "classes by their softmax scores, while LWF-MC / --bce train per-class sigmoids")


def nest_placeholder_init(model, logger) -> None:
    """The recipe's classifier initialisation when NeST is on: nothing here (the base method's
    init must not run); the classifier is generated in :meth:`NeST.setup_model`."""
    if logger is not None:
        logger.info("New classifier: generated and pre-tuned by NeST before training (replaces the base method's init)")


class NeST(Component):
    name = nest_utils.NEST_STATE_KEY  # "nest": the checkpoint's methods.nest is the done-record
    # Wins the classifier init over every softmax base method (MiB's balanced init has 5); the
    # methods with their own layouts (LWF-MC 80, DKD 90, SSUL 100) are refused.
    priority = 60
    order = 90

    def __init__(self):
        self._records = {}  # {step checkpoint path: done-record} of the steps this process pre-tuned

    def add_options(self, parser):
        g = technique_group(parser)
        hidden_switch(g, "nest")
        g.add_argument("--nest_epochs", type=int, default=None, metavar="N",
                       help="NeST: pre-tuning epochs at steps > 0 (default: VOC 5, ADE 15)")
        g.add_argument("--nest_lr_scale", type=float, default=None, metavar="X",
                       help="NeST: pre-tuning lr = step lr x X (default: VOC 1, ADE 500)")
        g.add_argument("--nest_loss", choices=nest_utils.LOSSES, default=None, help=argparse.SUPPRESS)
        g.add_argument("--nest_unkd", type=float, default=None, help=argparse.SUPPRESS)
        g.add_argument("--nest_grid", type=int, default=None, help=argparse.SUPPRESS)
        g.add_argument("--nest_legacy_bias_init", action="store_true", default=False, help=argparse.SUPPRESS)
        g.add_argument("--nest_legacy_schedule", action="store_true", default=False, help=argparse.SUPPRESS)
        g.add_argument("--nest_bias_norm", choices=nest_utils.BIAS_NORMS, default=None, help=argparse.SUPPRESS)
        g.add_argument("--nest_empty_class", choices=nest_utils.EMPTY_CLASS_RULES, default=None,
                       help=argparse.SUPPRESS)

    def check(self, opts):
        if not opts.nest:
            for option, default in NEST_ONLY.items():
                if getattr(opts, option) != default:
                    raise ValueError(f"--{option} needs --nest (--method BASE+NeST)")
            return
        for applies, option, reason in _refusals(opts):
            if applies:
                raise ValueError(f"{option} cannot be combined with NeST: {reason}; remove {option}")
        # the settings' own checks name the offending --nest_* option (the step's lr is checked elsewhere)
        nest_utils.NestSettings.from_options(argparse.Namespace(**{**vars(opts), "lr": 1.0}))

    def init_classifier(self, info: StepInfo):
        return ("nest", nest_placeholder_init) if info.opts.nest and info.step > 0 else None

    def setup_model(self, run, model, info: StepInfo) -> None:
        o = info.opts
        if not o.nest or info.step == 0:
            return
        if not nest_utils.should_pretune(info.step, run.resumed_state):
            self._records[run.checkpoint] = dict(run.resumed_state.get(self.name) or {"done": True})
            run.logger.info(f"NeST: {o.ckpt} holds a classifier that was pre-tuned already; not pre-tuning again")
            return
        settings = nest_utils.NestSettings.from_options(o)
        run.logger.info(f"NeST: pre-tuning for {settings.epochs} epoch{'s' if settings.epochs > 1 else ''} at lr "
                        f"{settings.tune_lr:g} ({settings.loss} loss)")
        outcome = nest_utils.run_nest(settings, model, run.model_old, run.train_loader, run.device,
                                      logger=run.logger)
        self._records[run.checkpoint] = outcome.record

    def checkpoint_state(self, run):
        if not run.opts.nest or run.step == 0:
            return None
        return self._records.get(run.checkpoint)


def _refusals(opts):
    """``(applies, option, reason)`` of the layouts NeST cannot generate a classifier for."""
    return [
        (opts.ssul or opts.unknown, "--ssul/--unknown (SSUL)", SSUL_REASON),
        (getattr(opts, "dkd", False), "--dkd (DKD)", DKD_REASON),
        (opts.icarl, "--icarl (LWF-MC)", SIGMOID_REASON),
        (opts.bce, "--bce", SIGMOID_REASON),
        (opts.cosine, "--cosine", "NeST generates plain 1x1 classifiers, not cosine ones"),
        (opts.nb_background_modes > 1, "--nb_background_modes",
         "NeST needs a single background channel"),
        (opts.base_weights, "--base_weights",
         "NeST generates the new classifier from every old one, which --base_weights does not load"),
    ]


register_component(NeST())
register_method(MethodSpec(
    "NeST", preset={"nest": True}, technique=True, order=100,
    refuses={"SSUL": SSUL_REASON, "DKD": DKD_REASON, "LWF-MC": SIGMOID_REASON},
    summary="new classifier generated from the old ones and pre-tuned before each step",
    # the authors' scripts (MiB and PLOP bases): step 0 at lr 0.02, MiB with the MiB repository's
    # KD weight, PLOP with frozen old classifiers on VOC (its ADE POD values are PLOP's own ADE
    # sweep); the pre-tuning epochs and lr scale are the per-dataset defaults of --nest_epochs and
    # --nest_lr_scale. SATS+NeST (not in the paper) keeps SATS's values and its step-0 model.
    sweep={"voc+MiB": {"lr0": 0.02, "args": ["--loss_kd", "10"]},
           "ade+MiB": {"lr0": 0.02, "args": ["--loss_kd", "10"]},
           "voc+PLOP": {"lr0": 0.02, "args": ["--fix_pre_cls"]},
           "ade+PLOP": {"lr0": 0.02}}))
