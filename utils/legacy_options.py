"""The originals' options that this implementation refuses or ignores, in one table.

They are hidden from ``run.py --help`` (``--help_legacy`` lists them) but still parsed, so the
originals' command lines keep working:

* ``NO_EFFECT``: accepted; a non-default value is reported in ``opts.option_warnings``.
* ``REFUSED``: PLOP's experimental switches that no preset and no paper table uses. They would
  change the loss, so setting one is an error instead of silently training without it.
"""
from __future__ import annotations

import argparse

# (flags, argparse keywords, what it was)
NO_EFFECT = (
    (("--dont_predict_bg",), dict(action="store_true"), "Cityscapes option of the originals"),
    (("--disable_background",), dict(action="store_true"), "deprecated Cityscapes option of the originals"),
    (("--fusion-mode",), dict(dest="fusion_mode", type=str, default="mean", choices=["mean", "voting", "max"]),
     "output fusion of the originals' model (never used)"),
    (("--small_sample_test",), dict(type=lambda t: str(t).strip().lower() in ("1", "true", "yes", "y", "on"),
                                    nargs="?", const=True), "SATS debug flag (forced off by the original)"),
    (("--entropy_min_mean_pixels",), dict(action="store_true"), "PLOP option never read by PLOP"),
    (("--nca_margin",), dict(type=float, default=0.0), "margin of PLOP's NCA loss (refused here)"),
    (("--kd_bce_sig_shape",), dict(type=str, default="trim", choices=["trim", "sum"]),
     "shape of PLOP's --kd_bce_sig (refused here)"),
    (("--focal_loss_gamma",), dict(type=int, default=2), "exponent of PLOP's focal loss (refused here)"),
    (("--pseudo_soft_factor",), dict(type=float, default=1.0), "weight of PLOP's --pseudo_soft (refused here)"),
    (("--ckpt_interval",), dict(type=int, default=1),
     "the originals' checkpoint period; here the step checkpoint is written at every validation"),
    (("--print_interval",), dict(type=int, default=10),
     "the originals' logging period; here every iteration goes to TensorBoard"),
)

REFUSED = (
    (("--init_multimodal",), dict(type=str, choices=["max", "softmax", "max_init", "softmax_init",
                                                      "softmax_remove", "max_remove"]),
     "initialise new classes from several background modes"),
    (("--nca",), dict(action="store_true"), "NCA loss instead of cross-entropy"),
    (("--kd_new",), dict(action="store_true"), "output KD only on pixels labelled background"),
    (("--kd_mask",), dict(type=str, choices=["oldbackground", "new"]), "KD on old-background or new pixels"),
    (("--kd_mask_adaptative_factor",), dict(action="store_true"), "masked KD scaled by the kept fraction"),
    (("--kd_scheduling",), dict(action="store_true"), "KD scaled by sqrt(seen / new classes)"),
    (("--kd_bce_sig",), dict(action="store_true"), "KD as BCE between sigmoids"),
    (("--exkd_gt",), dict(action="store_true"), "excluded KD with the ground truth"),
    (("--exkd_sum",), dict(action="store_true"), "excluded KD summing new channels into background"),
    (("--temperature",), dict(type=float, default=1.0), "KD temperature"),
    (("--temperature_semiold",), dict(type=float, default=1.0), "KD temperature of the previous step's classes"),
    (("--temperature_apply",), dict(type=str, choices=["all", "new", "old"]), "where the temperature applies"),
    (("--focal_loss",), dict(action="store_true"), "focal loss"),
    (("--focal_loss_new",), dict(action="store_true"), "focal loss on new-class pixels"),
    (("--ce_on_new",), dict(action="store_true"), "CE ignoring background pixels"),
    (("--ce_on_pseudo",), dict(action="store_true"), "plain CE on pseudo-labelled pixels"),
    (("--entropy_min",), dict(type=float, default=0.0), "entropy-minimisation term"),
    (("--sample_weights_new",), dict(type=float), "factor on the per-pixel CE"),
    (("--pseudo_soft",), dict(type=str, choices=["soft_certain", "soft_uncertain"]), "soft pseudo-labels"),
    (("--pseudo_ablation",), dict(type=str, choices=["corrected_errors", "removed_errors"]),
     "pseudo-labels corrected with the ground truth"),
    (("--pod_large_logits",), dict(action="store_true"), "POD on the full-resolution logits"),
    (("--step_threshold",), dict(type=float), "added to the threshold after the thresholds were read"),
)

_MESSAGES = {
    "step_threshold": "--step_threshold is not supported: PLOP added it to the threshold after the thresholds "
                      "were computed, so it never had an effect; pass --threshold for each run instead",
}


def _dest(flags, kwargs):
    return kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")


def add_legacy_options(parser) -> None:
    """Add every legacy option, hidden from ``--help``."""
    for flags, kwargs, _ in NO_EFFECT + REFUSED:
        kwargs = dict(kwargs)
        if kwargs.get("action") == "store_true":
            kwargs.setdefault("default", False)
        kwargs.setdefault("default", None)
        parser.add_argument(*flags, help=argparse.SUPPRESS, **kwargs)


def no_effect_names() -> tuple:
    return tuple(_dest(f, k) for f, k, _ in NO_EFFECT)


def refused_names() -> tuple:
    return tuple(_dest(f, k) for f, k, _ in REFUSED)


def warnings_for(opts, defaults) -> list:
    """One note per no-effect option given a non-default value."""
    notes = []
    for flags, kwargs, _ in NO_EFFECT:
        dest = _dest(flags, kwargs)
        if getattr(opts, dest) != defaults[dest]:
            value = getattr(opts, dest)
            shown = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
            notes.append(f"{flags[0]} has no effect in this implementation (accepted for compatibility); "
                         f"ignoring {shown}")
    return notes


def check_refused(opts, defaults) -> None:
    """Raise ``ValueError`` if a refused option was set."""
    used = [_dest(f, k) for f, k, _ in REFUSED if getattr(opts, _dest(f, k), None) != defaults[_dest(f, k)]]
    for name in used:
        if name in _MESSAGES:
            raise ValueError(_MESSAGES[name])
    if used:
        raise ValueError(f"--{', --'.join(used)}: PLOP experimental option(s) not implemented in this "
                         f"re-implementation (no preset or paper table uses them); remove them from the "
                         f"command line")


def legacy_help() -> str:
    """The text ``--help_legacy`` prints."""
    lines = ["Options of the original code bases, accepted for their command lines:", "",
             "Accepted, no effect (a non-default value is logged):"]
    lines += [f"  {', '.join(f):28s} {what}" for f, _, what in NO_EFFECT]
    lines += ["", "Refused with an error (PLOP experiments no preset or paper table uses):"]
    lines += [f"  {', '.join(f):28s} {what}" for f, _, what in REFUSED]
    return "\n".join(lines)
