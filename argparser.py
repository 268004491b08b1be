"""Command-line options of ``run.py`` and the method presets.

Every option name and default of the SATS repository's argparser is kept (users' scripts rely on
them), with the fixes of the project's decision table (``SPEC.md``):

* ``--method`` is a *preset*: it fills in the options listed in :data:`METHOD_PRESETS`. An option
  given explicitly on the command line wins over the preset, and the override is reported in
  ``opts.preset_overrides`` (``"preset MiB sets loss_kd=40; using 10 from the command line"``).
  The originals silently replaced the user's value.
* ``--method`` is optional (no method = plain fine-tuning, FT) and case-insensitive; ``MiB-M``,
  ``PLOP-M``, ``SSUL-M`` and ``SATS-M`` are the method plus a class-balanced exemplar memory of
  :data:`MEMORY_SIZES` images.
* ``--model`` has a default (``segformer_b2``) and accepts every MiT size; ``--local_rank``,
  ``--local-rank`` and the ``LOCAL_RANK`` environment variable (torchrun) all work.
* Options the originals parsed and then ignored either do what their name says here or say
  "accepted for compatibility, has no effect" in ``--help`` (see :data:`NO_EFFECT_OPTIONS`); a
  non-default value of such an option is reported in ``opts.option_warnings``.

Public API: :func:`get_argparser`, :func:`modify_command_options`, :func:`parse_options`,
:func:`explicit_options`, :func:`options_to_dict`, :data:`METHOD_PRESETS`, :data:`ORIGINAL_REPO_VALUES`.
"""
import argparse
import json
import os
import sys

__all__ = [
    "METHODS",
    "MEMORY_METHODS",
    "MEMORY_SIZES",
    "NUM_CLASSES",
    "MODELS",
    "METHOD_PRESETS",
    "ORIGINAL_REPO_VALUES",
    "NO_EFFECT_OPTIONS",
    "PSEUDO_MODES",
    "get_argparser",
    "explicit_options",
    "canonical_method",
    "modify_command_options",
    "parse_options",
    "original_repo_flags",
    "options_to_dict",
]

METHODS = ("FT", "LWF", "LWF-MC", "ILT", "EWC", "RW", "PI", "MiB", "PLOP", "SSUL", "SATS")
# Methods that have a "-M" (exemplar memory) variant in the SATS paper's tables.
MEMORY_METHODS = ("MiB", "PLOP", "SSUL", "SATS")
# SSUL-M's memory sizes, also used by SATS-M (SATS argparser: 100 VOC / 300 ADE).
MEMORY_SIZES = {"voc": 100, "ade": 300}
NUM_CLASSES = {"voc": 21, "ade": 151}
MODELS = ("deeplab",) + tuple(f"segformer_b{i}" for i in range(6))
MODEL_ALIASES = {"segformer": "segformer_b2"}
DISTILL_OBJECTS = ("sats-selfattn", "sats-selfattn-GP", "sats-selfattn-NP", "sats-feature-CNN")
# Pseudo-labelling modes of PLOP plus SSUL's; "threshold_<x>" is accepted too (x in (0, 1]).
PSEUDO_MODES = ("naive", "confidence", "median", "entropy", "ssul")

_PLOP_POD_OPTIONS = {"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}}

# One row per method: the options it sets, with the SATS repository's values (the comparison the
# SATS paper reports). Where MiB's or PLOP's own repository differs, the comment says so and
# ORIGINAL_REPO_VALUES gives the flags that reproduce it.
METHOD_PRESETS = {
    "FT": {},
    "LWF": {"loss_kd": 100},
    "LWF-MC": {"icarl": True, "icarl_importance": 10},
    "ILT": {"loss_kd": 10, "loss_de": 10},  # MiB and PLOP repos: 100 and 100
    "EWC": {"regularizer": "ewc", "reg_importance": 100},  # MiB repo: 500
    "RW": {"regularizer": "rw", "reg_importance": 100},
    "PI": {"regularizer": "pi", "reg_importance": 100},  # MiB repo: 500
    "MiB": {"loss_kd": 40, "unce": True, "unkd": True, "init_balanced": True},  # MiB/PLOP: loss_kd 10
    "PLOP": {
        "pod": "local",
        "pod_factor": 0.01,
        "pod_logits": True,
        "pod_options": _PLOP_POD_OPTIONS,
        "pseudo": "entropy",
        "threshold": 0.001,
        "classif_adaptive_factor": True,
        "init_balanced": True,
    },
    # clovaai/SSUL's run.sh: --loss_type bce_loss --pseudo --pseudo_thresh 0.7 --freeze
    # --bn_freeze --unknown --w_transfer
    "SSUL": {
        "ssul": True,
        "bce": True,
        "unknown": True,
        "pseudo": "ssul",
        "ssul_pseudo_threshold": 0.7,
        "freeze": True,
        "bn_freeze": True,
        "w_transfer": True,
    },
    "SATS": {
        "pseudo": "entropy",
        "threshold": 0.001,
        # the SATS code computes PLOP's adaptive factor but never applies it: off, as published
        "classif_adaptive_factor": False,
        "init_balanced": True,
        "loss_kd": 20,
        "unkd": True,
        "unce": False,  # plain CE on the pseudo-labelled target
        "distill_segformer": True,
        "distill_object": "sats-selfattn",
        "distill_weight_args": 20,
    },
}

# The MiB / PLOP repositories' own values where they differ from METHOD_PRESETS (for the README's
# method table): {method: {repository: {option: value}}}. original_repo_flags() writes the flags.
ORIGINAL_REPO_VALUES = {
    "ILT": {"MiB": {"loss_kd": 100, "loss_de": 100}, "PLOP": {"loss_kd": 100, "loss_de": 100}},
    "EWC": {"MiB": {"reg_importance": 500}},
    "PI": {"MiB": {"reg_importance": 500}},
    "MiB": {"MiB": {"loss_kd": 10}, "PLOP": {"loss_kd": 10}},
}

# Parsed so that the originals' command lines keep working, but nothing reads them. Their --help
# says so, and a non-default value is reported in opts.option_warnings.
NO_EFFECT_OPTIONS = (
    "dont_predict_bg",
    "disable_background",
    "fusion_mode",
    "small_sample_test",
    "entropy_min_mean_pixels",
)
_NO_EFFECT = " Accepted for compatibility, has no effect."

# PLOP's experimental switches that no preset and no paper table uses. They would change the loss,
# so a run that sets one stops with an error instead of silently training without it.
NOT_IMPLEMENTED_OPTIONS = (
    "init_multimodal", "nca", "kd_new", "kd_mask", "kd_mask_adaptative_factor", "kd_scheduling",
    "kd_bce_sig", "exkd_gt", "exkd_sum", "temperature", "temperature_semiold", "temperature_apply",
    "focal_loss", "focal_loss_new", "ce_on_new", "ce_on_pseudo", "entropy_min", "sample_weights_new",
    "pseudo_soft", "pseudo_ablation", "pod_large_logits",
)
# Options that only refine an option above (no effect on their own); dead in the originals too.
NO_EFFECT_OPTIONS = NO_EFFECT_OPTIONS + (
    "nca_margin", "kd_bce_sig_shape", "focal_loss_gamma", "pseudo_soft_factor", "ckpt_interval",
    "print_interval",
)

_GROUP_TITLES = (
    "Data",
    "Model",
    "Training",
    "Method/loss",
    "Method/loss: pseudo-labels and POD (PLOP)",
    "Method/loss: SATS",
    "Method/loss: SSUL and exemplar memory",
    "Validation & checkpoints",
    "Logging",
    "Performance/distributed",
    "Compatibility switches",
)


# ---------------------------------------------------------------------------------------------
# Small argparse helpers
# ---------------------------------------------------------------------------------------------
def _str2bool(text):
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _json_dict(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _model_name(text):
    return MODEL_ALIASES.get(text, text)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for ``--no_*`` switches and help texts that state their own."""

    def _get_help_string(self, action):
        if action.const is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_switch(group, name, help_text, default=False):
    """``--name`` (on) and ``--no_name`` (off) on one destination, so a preset can be undone."""
    group.add_argument(f"--{name}", dest=name, action="store_true", default=default, help=help_text)
    undo = f"turn --{name} off" if default else f"turn --{name} off (e.g. to undo a --method preset)"
    group.add_argument(f"--no_{name}", dest=name, action="store_false", default=default, help=undo)


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------
def _task_help():
    try:
        import tasks
    except ImportError:
        return "Task (protocol) name."
    names = {d: ", ".join(tasks.get_task_list(d)) for d in NUM_CLASSES}
    return (f"Task (class split) to run. VOC: {names['voc']}. ADE: {names['ade']}. Generic 'B-I' "
            f"(B base classes, then steps of I) and 'B-Is' (then I single-class steps) also work. "
            f"Aliases resolve to the table name (15-1 = 15-5s, ADE 50-50 = 50).")


def _add_data_options(parser):
    g = parser.add_argument_group("Data")
    g.add_argument("--data_root", type=str, default="data", help="dataset root folder")
    g.add_argument("--dataset", type=str, default="voc", choices=sorted(NUM_CLASSES),
                   help="dataset: Pascal-VOC 2012 (21 classes) or ADE20K (151 classes, 0 scored)")
    g.add_argument("--task", type=str, default="19-1", help=_task_help())
    g.add_argument("--step", type=int, nargs="+", default=[0],
                   help="incremental step(s) to run, in increasing order; several steps run one "
                        "after the other in one invocation")
    g.add_argument("--overlap", action="store_true", default=False,
                   help="overlapped setting: training images of a step may contain future classes "
                        "(labelled background); index caches get the '-ov' suffix")
    g.add_argument("--no_mask", action="store_true", default=False,
                   help="do not relabel old classes as background in the training set")
    g.add_argument("--data_masking", type=str, default="current",
                   choices=["current", "current+old", "all", "new"],
                   help="which classes keep their label in the training set: the current step's "
                        "(others -> background), current and old, all, or only new")
    g.add_argument("--idxs_dir", type=str, default="data",
                   help="where the per-step index caches go: "
                        "{idxs_dir}/{dataset}/{task}[-ov]/{train,val,test_on_val}-{step}.npy")
    g.add_argument("--test_on_val", action="store_true", default=False,
                   help="VOC only: train on a random 80%% of the step's images and test on the "
                        "remaining 20%% of the val-split list")
    g.add_argument("--val_on_trainset", action="store_true", default=False,
                   help="build the test set from the train split")
    g.add_argument("--cross_val", action="store_true", default=False,
                   help="validate on a random 20%% of the training set instead of the val split")
    g.add_argument("--ignore_test_bg", action="store_true", default=False,
                   help="label background as ignore (255) in the test set (PLOP)")
    g.add_argument("--num_classes", type=int, default=None,
                   help="number of classes; always derived from --dataset (voc 21, ade 151), a "
                        "different value is an error")


def _add_model_options(parser):
    g = parser.add_argument_group("Model")
    g.add_argument("--model", type=_model_name, default="segformer_b2", choices=MODELS,
                   help="network: DeepLabV3 (ResNet, see --backbone) or SegFormer with a MiT-B0..B5 "
                        "encoder ('segformer' = segformer_b2, the SATS paper's model)")
    g.add_argument("--segformer_head", type=str, default="sats", choices=["sats", "mlp"],
                   help="SegFormer decoder: 'sats' = the SATS repo's head (1x1 conv per stage to "
                        "256 channels, nearest upsampling, concat, 1x1 conv); 'mlp' = the official "
                        "all-MLP decoder")
    g.add_argument("--backbone", type=str, default="resnet101", choices=["resnet50", "resnet101"],
                   help="DeepLab only: ResNet depth")
    g.add_argument("--output_stride", type=int, default=16, choices=[8, 16],
                   help="DeepLab only: output stride of the ResNet body")
    g.add_argument("--norm_act", type=str, default="iabn_sync",
                   choices=["iabn_sync", "iabn", "abn", "std", "iabn_sync_test"],
                   help="DeepLab only: normalisation+activation. iabn_sync/iabn/abn: BatchNorm "
                        "(synchronised across GPUs for iabn_sync) + LeakyReLU(0.01), with the "
                        "in-place variants' abs(weight)+eps scaling; std: plain BatchNorm. Also "
                        "names the ImageNet file pretrained/{backbone}_{norm_act}.pth.tar")
    g.add_argument("--pretrained", type=str, default=None, metavar="PATH",
                   help="ImageNet weights for the encoder/body (default: the model's file under "
                        "{code_directory}/pretrained/, e.g. mit_b2.pth); a missing file is an error")
    g.add_argument("--no_pretrained", action="store_true", default=False,
                   help="start the encoder/body from random weights")
    g.add_argument("--code_directory", type=str, default=".",
                   help="folder holding pretrained/ (ImageNet weights)")
    g.add_argument("--pooling", type=int, default=32,
                   help="DeepLab only: size of the ASPP global-pooling window in evaluation mode")
    g.add_argument("--base_weights", action="store_true", default=False,
                   help="at step > 0 load only the step-0 classifier from the previous checkpoint")
    g.add_argument("--fix_bn", action="store_true", default=False,
                   help="keep every BatchNorm layer in eval mode with frozen parameters")
    g.add_argument("--nb_background_modes", type=int, default=1,
                   help="PLOP experiment: number of background output channels")
    g.add_argument("--multimodal_fusion", type=str, default="sum",
                   help="PLOP experiment: how background channels are fused (with "
                        "--nb_background_modes > 1)")
    g.add_argument("--init_multimodal", type=str, default=None,
                   choices=["max", "softmax", "max_init", "softmax_init", "softmax_remove",
                            "max_remove"],
                   help="PLOP experiment: initialise new classes from the background modes")
    g.add_argument("--cosine", action="store_true", default=False,
                   help="PLOP experiment: cosine-similarity classifier with a learned scale")
    g.add_argument("--nca", action="store_true", default=False,
                   help="PLOP experiment: NCA loss instead of cross-entropy")
    g.add_argument("--nca_margin", type=float, default=0.0, help="PLOP experiment: NCA margin")
    g.add_argument("--align_weight", type=str, default=None, choices=["old", "background", "all"],
                   help="PLOP experiment: rescale new classifier weights to the norm of these")
    g.add_argument("--align_weight_frequency", type=str, default="never",
                   choices=["never", "epoch", "task"],
                   help="PLOP experiment: when --align_weight is applied")


def _add_training_options(parser):
    g = parser.add_argument_group("Training")
    g.add_argument("--epochs", type=int, default=30, help="epochs per step")
    g.add_argument("--batch_size", type=int, default=4,
                   help="batch size per process (total = batch_size x number of processes)")
    g.add_argument("--crop_size", type=int, default=512,
                   help="training crop size (and evaluation size with --crop_val)")
    g.add_argument("--lr", type=float, nargs="+", default=[0.007],
                   help="learning rate: one value, or one per --step entry")
    g.add_argument("--lr_head", type=float, default=1.0,
                   help="multiplier of the learning rate of the head and classifiers (the "
                        "originals use one rate for every group, i.e. 1)")
    g.add_argument("--lr_old", type=float, default=None,
                   help="at step > 0, multiplier of the learning rate of the old classes' "
                        "classifiers (default: same as the others)")
    g.add_argument("--momentum", type=float, default=0.9,
                   help="SGD (Nesterov) momentum (the originals hard-coded 0.9)")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="weight decay of every group")
    g.add_argument("--lr_policy", type=str, default="poly", choices=["poly", "step"],
                   help="poly: lr*(1-i/max_iter)^lr_power per iteration; step: StepLR per "
                        "iteration with --lr_decay_step and --lr_decay_factor")
    g.add_argument("--lr_decay_step", type=int, default=5000,
                   help="StepLR period in iterations (--lr_policy step)")
    g.add_argument("--lr_decay_factor", type=float, default=0.1,
                   help="StepLR factor (--lr_policy step)")
    g.add_argument("--lr_power", type=float, default=0.9, help="exponent of the poly schedule")
    _add_switch(g, "freeze",
                "at steps > 0 leave the feature extractor out of the optimiser (ILT); with --ssul "
                "only the new, unknown and background classifiers are trained (SSUL)")
    g.add_argument("--stop_after_epochs", type=int, default=None,
                   help="stop this invocation after N epochs of the step (the checkpoint is saved; "
                        "continue later with --ckpt); default: train every epoch")
    g.add_argument("--max_nan_skips", type=int, default=10,
                   help="an update whose loss is NaN/Inf is skipped on every process; more than "
                        "this many skips in a step stop the run with an error")


def _add_method_options(parser):
    g = parser.add_argument_group("Method/loss")
    g.add_argument("--method", type=str, default=None,
                   help="preset that sets the options of a method (case-insensitive): "
                        + ", ".join(METHODS)
                        + "; MiB-M, PLOP-M, SSUL-M, SATS-M add an exemplar memory of 100 (VOC) / "
                          "300 (ADE) images. Options given on the command line win over the "
                          "preset (the run logs each override). No method = fine-tuning (FT)")
    _add_switch(g, "bce", "binary cross-entropy (one-vs-all sigmoid) instead of softmax CE")
    g.add_argument("--loss_kd", type=float, default=0.0,
                   help="weight of the output knowledge distillation (LwF / MiB); 0 = off")
    g.add_argument("--loss_de", type=float, default=0.0,
                   help="weight of the L2 distillation of the encoder features (ILT); 0 = off")
    _add_switch(g, "unce", "MiB unbiased cross-entropy (old classes merged into background)")
    _add_switch(g, "unkd", "MiB unbiased knowledge distillation (new classes merged into background)")
    g.add_argument("--alpha", type=float, default=1.0,
                   help="MiB: sharpening exponent of the old model's soft targets")
    _add_switch(g, "init_balanced",
                "MiB initialisation of new classifiers from the background one "
                "(bias - log(N_new + 1))")
    g.add_argument("--regularizer", type=str, default=None, choices=["ewc", "rw", "pi"],
                   help="weight regulariser: EWC, RW (Riemannian walk) or PI (path integral)")
    g.add_argument("--reg_importance", type=float, default=1.0, help="regulariser weight")
    g.add_argument("--reg_alpha", type=float, default=0.9,
                   help="EWC/RW: weight of the running Fisher estimate (EMA)")
    g.add_argument("--reg_no_normalize", action="store_true", default=False,
                   help="EWC/RW/PI: do not normalise the importance by its maximum")
    g.add_argument("--reg_iterations", type=int, default=10,
                   help="RW: iterations between two updates of the path score")
    _add_switch(g, "icarl", "LwF-MC / iCaRL: BCE on new classes + BCE distillation on old ones")
    g.add_argument("--icarl_importance", type=float, default=1.0,
                   help="weight of the iCaRL distillation term")
    g.add_argument("--icarl_disjoint", action="store_true", default=False,
                   help="iCaRL: one BCE with old-model targets on old channels (instead of two terms)")
    g.add_argument("--icarl_bkg", action="store_true", default=False,
                   help="iCaRL: take the background target from the ground truth")
    g.add_argument("--kd_new", action="store_true", default=False,
                   help="keep the output KD only on pixels labelled background")
    g.add_argument("--kd_mask", type=str, default=None, choices=["oldbackground", "new"],
                   help="restrict the KD to old-background or to new-class pixels")
    g.add_argument("--kd_mask_adaptative_factor", action="store_true", default=False,
                   help="scale the masked KD by the fraction of kept pixels")
    g.add_argument("--kd_scheduling", action="store_true", default=False,
                   help="scale KD by sqrt(seen classes / new classes)")
    g.add_argument("--kd_bce_sig", action="store_true", default=False,
                   help="KD as BCE between sigmoids")
    g.add_argument("--kd_bce_sig_shape", type=str, default="trim", choices=["trim", "sum"],
                   help="with --kd_bce_sig: drop the new channels (trim) or sum them into background (sum)")
    g.add_argument("--exkd_gt", action="store_true", default=False,
                   help="excluded KD (PLOP experiment): new-class channels reduced with the ground truth; "
                        "classes of intermediate steps use --temperature_semiold")
    g.add_argument("--exkd_sum", action="store_true", default=False,
                   help="excluded KD (PLOP experiment): new-class channels summed into background")
    g.add_argument("--temperature", type=float, default=1.0, help="KD temperature")
    g.add_argument("--temperature_semiold", type=float, default=1.0,
                   help="KD temperature of the classes of the previous step")
    g.add_argument("--temperature_apply", type=str, default=None, choices=["all", "new", "old"],
                   help="divide the logits by --temperature before KD on all, old (background) or new "
                        "pixels")
    g.add_argument("--entropy_min", type=float, default=0.0,
                   help="weight of the entropy-minimisation term (AdvEnt); 0 = off")
    g.add_argument("--sample_weights_new", type=float, default=None,
                   help="factor multiplying the per-pixel CE (PLOP's code applies it to every pixel)")
    g.add_argument("--focal_loss", action="store_true", default=False, help="focal loss")
    g.add_argument("--focal_loss_new", action="store_true", default=False,
                   help="focal loss on new-class pixels only")
    g.add_argument("--focal_loss_gamma", type=int, default=2, help="focal loss exponent")
    g.add_argument("--ce_on_new", action="store_true", default=False,
                   help="ignore background pixels (label 0) in the CE")


def _add_plop_options(parser):
    g = parser.add_argument_group("Method/loss: pseudo-labels and POD (PLOP)")
    g.add_argument("--pseudo", type=str, default=None,
                   help="pseudo-labelling of background pixels with the old model at step > 0: "
                        "naive, confidence, threshold_<x>, median, entropy (PLOP), ssul (SSUL)")
    g.add_argument("--threshold", type=float, default=0.9,
                   help="pseudo-label threshold (entropy mode: floor of the per-class thresholds)")
    g.add_argument("--step_threshold", type=float, default=None,
                   help="rejected: PLOP added it after the thresholds were read (no effect); "
                        "pass --threshold per run instead")
    g.add_argument("--ce_on_pseudo", action="store_true", default=False,
                   help="pseudo-labelled pixels get plain CE while the others keep the criterion (needs "
                        "--pseudo entropy)")
    g.add_argument("--pseudo_nb_bins", type=int, default=None,
                   help="histogram bins of the median thresholds (default 100 entropy / 20 others)")
    _add_switch(g, "classif_adaptive_factor",
                "PLOP: multiply each image's CE by (confident old pixels / old pixels)")
    g.add_argument("--classif_adaptive_min_factor", type=float, default=0.0,
                   help="lower bound of the adaptive factor")
    g.add_argument("--pseudo_soft", type=str, default=None, choices=["soft_certain", "soft_uncertain"],
                   help="soft cross-entropy with the old model's probabilities on certain or uncertain "
                        "background pixels instead of hard pseudo-labels")
    g.add_argument("--pseudo_soft_factor", type=float, default=1.0,
                   help="weight of the soft pseudo-labels")
    g.add_argument("--pseudo_ablation", type=str, default=None,
                   choices=["corrected_errors", "removed_errors"],
                   help="PLOP ablation using the ground truth to correct/remove wrong pseudo-labels")
    g.add_argument("--pod", type=str, default=None, choices=["spatial", "local", "global"],
                   help="POD feature distillation: spatial, local (PLOP) or global pooling")
    g.add_argument("--pod_factor", type=float, default=5.0, help="POD weight")
    g.add_argument("--pod_options", type=_json_dict, default=None,
                   help="POD options as JSON, e.g. PLOP's "
                        "'{\"switch\": {\"after\": {\"extra_channels\": \"sum\", "
                        "\"factor\": 0.0005, \"type\": \"local\"}}}'")
    g.add_argument("--pod_prepro", type=str, default="pow", help="POD feature pre-processing")
    g.add_argument("--no_pod_schedule", action="store_true", default=False,
                   help="do not scale POD by sqrt(seen classes / new classes)")
    g.add_argument("--pod_apply", type=str, default="all", choices=["all", "backbone", "deeplab"],
                   help="which feature maps POD distils")
    g.add_argument("--pod_deeplab_mask", action="store_true", default=False,
                   help="POD on the ASPP output restricted per class mask")
    g.add_argument("--pod_deeplab_mask_factor", type=float, default=None,
                   help="weight of the masked ASPP POD (default: --pod_factor)")
    g.add_argument("--deeplab_mask_downscale", action="store_true", default=False,
                   help="downscale the masks instead of upscaling the features")
    g.add_argument("--pod_interpolate_last", action="store_true", default=False,
                   help="interpolate the last POD map to the previous one's size")
    _add_switch(g, "pod_logits", "also apply POD to the logits")
    g.add_argument("--pod_large_logits", action="store_true", default=False,
                   help="also apply POD to the full-resolution logits")
    g.add_argument("--spp_scales", type=int, nargs="+", default=[1, 2, 4],
                   help="pyramid scales of local POD")


def _add_sats_options(parser):
    g = parser.add_argument_group("Method/loss: SATS")
    _add_switch(g, "distill_segformer",
                "SATS self-attention transfer term at step > 0 (set by --method SATS)")
    g.add_argument("--distill_object", type=str, default="sats-selfattn", choices=DISTILL_OBJECTS,
                   help="what SATS distils: class-pooled attention maps (sats-selfattn), globally "
                        "pooled (-GP), unpooled (-NP), or DeepLab features (sats-feature-CNN). The "
                        "originals' default 'v4' was not a valid choice")
    g.add_argument("--distill_weight_args", type=float, default=10,
                   help="weight of the SATS term (applied to every --distill_object)")


def _add_ssul_options(parser):
    g = parser.add_argument_group("Method/loss: SSUL and exemplar memory")
    _add_switch(g, "ssul",
                "SSUL training (set by --method SSUL): unknown channel, BCE, SSUL pseudo-labels, "
                "weight transfer, frozen network at steps > 0")
    _add_switch(g, "unknown",
                "add an 'unknown' output channel learnt from salient background pixels (SSUL)")
    _add_switch(g, "bn_freeze", "at steps > 0 keep BatchNorm layers in eval mode, frozen (SSUL)")
    _add_switch(g, "w_transfer",
                "initialise the new classes' classifier from the unknown one (SSUL; needs "
                "--unknown)")
    g.add_argument("--ssul_pseudo_threshold", type=float, default=0.7,
                   help="SSUL: sigmoid score above which an old-class prediction relabels a "
                        "background/unknown pixel")
    g.add_argument("--mem_size", type=int, default=0,
                   help="images kept from previous steps in a class-balanced exemplar memory "
                        "(SSUL-M); 0 = no memory. The -M methods set 100 (VOC) / 300 (ADE)")


def _add_validation_options(parser):
    g = parser.add_argument_group("Validation & checkpoints")
    g.add_argument("--crop_val", action="store_true", default=False,
                   help="evaluate on a resize + centre crop of --crop_size (the SATS/MiB/PLOP "
                        "protocol) instead of full images. CHANGED: in the originals the flag "
                        "turned cropping OFF (store_false, crop by default)")
    g.add_argument("--val_interval", type=int, default=1, help="validate every N epochs")
    g.add_argument("--ckpt_interval", type=int, default=1,
                   help="save the step checkpoint every N epochs (always after the last epoch)")
    g.add_argument("--test", action="store_true", default=False,
                   help="do not train: test the weights of --ckpt (or the step's checkpoint)")
    g.add_argument("--ckpt", type=str, default=None,
                   help="checkpoint of the current step to resume from or to test")
    g.add_argument("--step_ckpt", type=str, default=None,
                   help="checkpoint of the previous step (default: the file --checkpoint and "
                        "--name give); used by the first step of the invocation only")
    g.add_argument("--checkpoint", type=str, default="checkpoints/step",
                   help="checkpoint folder: {checkpoint}/{task}-{dataset}_{name}_{step}.pth")
    _add_switch(g, "strict_weights",
                "load checkpoints strictly (every key must match); CHANGED: the originals' flag "
                "turned strict loading off", default=True)


def _add_logging_options(parser):
    g = parser.add_argument_group("Logging")
    g.add_argument("--logdir", type=str, default="./logs",
                   help="TensorBoard root: {logdir}/{task}-{dataset}/{name}/")
    g.add_argument("--name", type=str, default="Experiment",
                   help="experiment name (log folder, checkpoint and results file names)")
    g.add_argument("--date", type=str, default="",
                   help="date written into the results file name results/{date}_{dataset}_{task}_"
                        "{name}.csv")
    _add_switch(g, "visualize",
                "TensorBoard logging on rank 0 (default on). CHANGED: the originals' flag "
                "turned it off", default=True)
    g.add_argument("--sample_num", type=int, default=0,
                   help="number of validation images whose predictions go to TensorBoard")
    g.add_argument("--debug", action="store_true", default=False,
                   help="verbose logging; a step > 0 may start without a previous checkpoint")
    g.add_argument("--print_interval", type=int, default=10,
                   help="log the running training loss every N iterations")
    _add_switch(g, "progress", "tqdm progress bars on rank 0", default=True)


def _add_performance_options(parser):
    g = parser.add_argument_group("Performance/distributed")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=0,
                   help="GPU of this process; torch.distributed.launch passes it, torchrun sets "
                        "LOCAL_RANK (read when the option is not given)")
    g.add_argument("--random_seed", type=int, default=42, help="seed of torch, numpy and random")
    g.add_argument("--num_workers", type=int, default=1, help="DataLoader workers")
    g.add_argument("--opt_level", type=str, default="O0", choices=["O0", "O1", "O2", "O3"],
                   help="mixed precision with torch.amp (apex's level names): O0 fp32; O1 fp16 "
                        "autocast + GradScaler on CUDA (bf16 autocast on CPU); O2/O3 bf16 autocast; "
                        "distillation terms are computed in fp32")
    g.add_argument("--sequential_old_model", action="store_true", default=False,
                   help="run the previous step's model in the training thread, before the new model "
                        "(default: on a side thread, overlapping the new model's forward; same values)")


def _add_compatibility_options(parser):
    g = parser.add_argument_group(
        "Compatibility switches",
        "Reproduce a published code's behaviour where it differs from the papers, or accept the "
        "originals' options that no code reads.")
    g.add_argument("--sats_legacy_reshape", action="store_true", default=False,
                   help="SATS: reshape attention maps as the published code does (heads and "
                        "positions mixed in stages 2-4) instead of the per-head layout")
    g.add_argument("--pseudo_median_legacy", action="store_true", default=False,
                   help="PLOP/SATS: per-rank 'median' thresholds with the published running-sum "
                        "bug (adds the bin index) instead of the true median over all ranks")
    g.add_argument("--cosine_legacy", action="store_true", default=False,
                   help="with --cosine: reproduce PLOP/SATS, which normalise only the classifier "
                        "weights and never apply the learned scale")
    g.add_argument("--small_sample_test", type=_str2bool, nargs="?", const=True, default=False,
                   help="SATS debug flag (forced off by the original)." + _NO_EFFECT)
    g.add_argument("--entropy_min_mean_pixels", action="store_true", default=False,
                   help="PLOP option never read by PLOP." + _NO_EFFECT)
    g.add_argument("--dont_predict_bg", action="store_true", default=False,
                   help="Cityscapes option of the originals." + _NO_EFFECT)
    g.add_argument("--disable_background", action="store_true", default=False,
                   help="deprecated Cityscapes option of the originals." + _NO_EFFECT)
    g.add_argument("--fusion-mode", dest="fusion_mode", metavar="NAME", type=str, default="mean",
                   choices=["mean", "voting", "max"],
                   help="output fusion of the originals' model (never used)." + _NO_EFFECT)


def get_argparser():
    """The ``run.py`` parser: every SATS option (same names and defaults) plus this project's."""
    parser = argparse.ArgumentParser(
        description="Continual semantic segmentation: SATS and its baselines (FT, LWF, LWF-MC, "
                    "ILT, EWC, RW, PI, MiB, PLOP, SSUL). --method applies a preset; explicit "
                    "options win over it.",
        formatter_class=_HelpFormatter,
    )
    _add_data_options(parser)
    _add_model_options(parser)
    _add_training_options(parser)
    _add_method_options(parser)
    _add_plop_options(parser)
    _add_sats_options(parser)
    _add_ssul_options(parser)
    _add_validation_options(parser)
    _add_logging_options(parser)
    _add_performance_options(parser)
    _add_compatibility_options(parser)
    _mark_unsupported(parser)
    return parser


def _mark_unsupported(parser):
    """State in --help which options are inert or refused (see NO_EFFECT / NOT_IMPLEMENTED)."""
    for action in parser._actions:
        help_text = action.help or ""
        if action.dest in NOT_IMPLEMENTED_OPTIONS:
            action.help = help_text + " PLOP experimental option, not implemented here: setting it is an error."
        elif action.dest in NO_EFFECT_OPTIONS and _NO_EFFECT not in help_text:
            action.help = help_text + _NO_EFFECT


def _parser_defaults(parser=None):
    parser = parser or get_argparser()
    return {a.dest: a.default for a in parser._actions if a.dest != "help"}


def explicit_options(argv, parser=None):
    """Destinations given on the command line ``argv`` (a list of strings).

    The same parser is built with every default set to ``argparse.SUPPRESS``, so the parsed
    namespace holds exactly the options that were typed, whatever their value (``--loss_kd 0``
    with a default of 0 counts as given).
    """
    parser = parser or get_argparser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(list(argv))))


# ---------------------------------------------------------------------------------------------
# Post-processing: preset, derived attributes, checks
# ---------------------------------------------------------------------------------------------
def canonical_method(name):
    """``(method, uses_memory)`` for a user spelling: ``"mib"`` -> ``("MiB", False)``,
    ``"SATS-m"`` -> ``("SATS", True)``, ``None`` -> ``("FT", False)``."""
    if name is None:
        return "FT", False
    by_lower = {m.lower(): (m, False) for m in METHODS}
    by_lower.update({f"{m.lower()}-m": (m, True) for m in MEMORY_METHODS})
    try:
        return by_lower[str(name).strip().lower()]
    except KeyError:
        valid = list(METHODS) + [f"{m}-M" for m in MEMORY_METHODS]
        raise ValueError(f"unknown method {name!r}; valid methods (any case): "
                         f"{', '.join(valid)}") from None


def _format_value(value):
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _apply_preset(opts, preset_name, values, explicit):
    """Set ``values`` on ``opts`` except where the user gave the option; return the override notes."""
    notes = []
    for option, value in values.items():
        if option not in explicit:
            setattr(opts, option, value)
        elif getattr(opts, option) != value:
            notes.append(f"preset {preset_name} sets {option}={_format_value(value)}; using "
                         f"{_format_value(getattr(opts, option))} from the command line")
    return notes


def _explicit_set(opts, explicit):
    if explicit is not None:
        return set(explicit)
    recorded = getattr(opts, "explicit_options", None)
    if recorded is not None:
        return set(recorded)
    # A namespace built in code: anything that differs from the parser default counts as given.
    defaults = _parser_defaults()
    return {k for k, v in vars(opts).items() if k in defaults and v != defaults[k]}


def _set_dataset_attributes(opts, explicit):
    if opts.dataset not in NUM_CLASSES:
        raise ValueError(f"unknown dataset {opts.dataset!r}; valid datasets: "
                         f"{', '.join(sorted(NUM_CLASSES))}")
    expected = NUM_CLASSES[opts.dataset]
    if "num_classes" in explicit and opts.num_classes not in (None, expected):
        raise ValueError(f"--num_classes {opts.num_classes} does not match dataset "
                         f"{opts.dataset!r}, which has {expected} classes (leave it out)")
    opts.num_classes = expected


def _set_local_rank(opts, explicit):
    if "local_rank" in explicit or "LOCAL_RANK" not in os.environ:
        return
    text = os.environ["LOCAL_RANK"]
    try:
        opts.local_rank = int(text)
    except ValueError:
        raise ValueError(f"environment variable LOCAL_RANK={text!r} is not an integer") from None


def _check_task_and_steps(opts):
    import tasks

    steps = list(opts.step)
    if any(s < 0 for s in steps):
        raise ValueError(f"--step values must be >= 0, got {steps}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"--step values must be strictly increasing (each step needs the previous "
                         f"one), got {steps}")
    for step in steps:
        tasks.get_task_labels(opts.dataset, opts.task, step)  # raises ValueError naming the problem
    opts.task = tasks.canonical_task(opts.dataset, opts.task)


def _check_training_numbers(opts):
    if len(opts.lr) not in (1, len(opts.step)):
        raise ValueError(f"--lr takes one value or one per step: got {len(opts.lr)} values "
                         f"{opts.lr} for {len(opts.step)} steps {opts.step}")
    if any(lr <= 0 for lr in opts.lr):
        raise ValueError(f"--lr values must be > 0, got {opts.lr}")
    positive = {"batch_size": opts.batch_size, "epochs": opts.epochs, "crop_size": opts.crop_size,
                "val_interval": opts.val_interval, "ckpt_interval": opts.ckpt_interval,
                "print_interval": opts.print_interval}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if opts.lr_head <= 0:
        raise ValueError(f"--lr_head must be > 0, got {opts.lr_head}")
    if opts.mem_size < 0:
        raise ValueError(f"--mem_size must be >= 0, got {opts.mem_size}")
    if opts.stop_after_epochs is not None and opts.stop_after_epochs < 1:
        raise ValueError(f"--stop_after_epochs must be >= 1, got {opts.stop_after_epochs}")
    if opts.max_nan_skips < 0:
        raise ValueError(f"--max_nan_skips must be >= 0, got {opts.max_nan_skips}")


def _check_pseudo(opts):
    mode = opts.pseudo
    if mode is None or mode in PSEUDO_MODES:
        return
    if mode.startswith("threshold_"):
        try:
            value = float(mode[len("threshold_"):])
        except ValueError:
            value = None
        if value is not None and 0 < value <= 1:
            return
    raise ValueError(f"unknown --pseudo {mode!r}; valid: {', '.join(PSEUDO_MODES)} or "
                     f"threshold_<x> with 0 < x <= 1 (PLOP's median_<x> never produced labels and "
                     f"is not supported)")


def _check_method_options(opts):
    if opts.data_masking == "all" and not opts.test:
        raise ValueError("--data_masking all keeps the labels of future classes, which the step's "
                         "classifier has no channel for (PLOP refused it too); use current, "
                         "current+old or new")
    if opts.step_threshold is not None:
        raise ValueError("--step_threshold is not supported: PLOP added it to the threshold after "
                         "the thresholds were computed, so it never had an effect; pass --threshold "
                         "for each run instead")
    _check_pseudo(opts)
    if opts.pseudo == "ssul" and not opts.ssul:
        raise ValueError("--pseudo ssul needs --ssul (SSUL's label space with the unknown channel)")
    if opts.ssul and not opts.unknown:
        raise ValueError("--ssul needs --unknown (SSUL's classifier has an unknown channel)")
    if opts.w_transfer and not opts.unknown:
        raise ValueError("--w_transfer copies the unknown classifier: it needs --unknown")
    if opts.distill_object not in DISTILL_OBJECTS:
        raise ValueError(f"unknown --distill_object {opts.distill_object!r}; valid: "
                         f"{', '.join(DISTILL_OBJECTS)}")
    attention = opts.distill_object != "sats-feature-CNN"
    if opts.distill_segformer and attention and not opts.model.startswith("segformer"):
        raise ValueError(f"--distill_object {opts.distill_object} transfers self-attention maps, "
                         f"which --model {opts.model} does not have; use a segformer model or "
                         f"--distill_object sats-feature-CNN")


def _no_effect_warnings(opts, defaults):
    flags = {"fusion_mode": "--fusion-mode"}  # the one option spelled with a hyphen
    return [f"{flags.get(name, '--' + name)} has no effect in this implementation (accepted for "
            f"compatibility); ignoring {_format_value(getattr(opts, name))}"
            for name in NO_EFFECT_OPTIONS if getattr(opts, name) != defaults[name]]


def modify_command_options(opts, explicit=None):
    """Apply ``--method``'s preset, derive attributes and check the options; returns ``opts``.

    ``explicit``: the option destinations typed on the command line (default:
    ``opts.explicit_options`` as :func:`parse_options` records it, else every option whose value
    differs from the parser default). Sets ``method`` (canonical spelling, ``"FT"`` without one),
    ``num_classes``, ``mem_size`` for "-M" methods, ``local_rank`` from ``LOCAL_RANK``,
    ``no_overlap``, ``no_cross_val``, ``saliency`` (= ``unknown``), ``preset_overrides`` (list of str, one per explicit value
    that beat the preset) and ``option_warnings`` (list of str). Raises ``ValueError`` naming the
    offending option.
    """
    explicit = _explicit_set(opts, explicit)
    defaults = _parser_defaults()
    _set_dataset_attributes(opts, explicit)
    opts.model = _model_name(opts.model)
    if opts.model not in MODELS:
        raise ValueError(f"unknown model {opts.model!r}; valid: {', '.join(MODELS)} (or 'segformer')")

    method, with_memory = canonical_method(opts.method)
    opts.method = method
    overrides = _apply_preset(opts, method, METHOD_PRESETS[method], explicit)
    if with_memory:
        overrides += _apply_preset(opts, f"{method}-M", {"mem_size": MEMORY_SIZES[opts.dataset]},
                                   explicit)
    opts.preset_overrides = overrides

    _set_local_rank(opts, explicit)
    _check_task_and_steps(opts)
    _check_training_numbers(opts)
    _check_method_options(opts)

    opts.saliency = opts.unknown  # the unknown class is learnt from saliency maps
    opts.no_overlap = not opts.overlap
    opts.no_cross_val = not opts.cross_val
    if not opts.visualize:
        opts.sample_num = 0
    opts.option_warnings = _no_effect_warnings(opts, defaults)
    _reject_not_implemented(opts, defaults)
    return opts


def _reject_not_implemented(opts, defaults):
    used = [name for name in NOT_IMPLEMENTED_OPTIONS
            if name in defaults and getattr(opts, name, defaults[name]) != defaults[name]]
    if used:
        raise ValueError(
            f"--{', --'.join(used)}: PLOP experimental option(s) not implemented in this "
            f"re-implementation (no preset or paper table uses them); remove them from the command line")


def parse_options(argv=None):
    """Parse ``argv`` (default ``sys.argv[1:]``) and apply :func:`modify_command_options`.

    The options typed on the command line are recorded in ``opts.explicit_options`` (sorted
    list). A bad combination exits through ``parser.error`` with the message.
    """
    parser = get_argparser()
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parser.parse_args(argv)
    opts.explicit_options = sorted(explicit_options(argv))
    try:
        modify_command_options(opts)
    except ValueError as error:
        parser.error(str(error))
    return opts


def original_repo_flags(method, repo):
    """Command-line flags that turn ``method``'s preset into ``repo``'s own values
    (``original_repo_flags("ILT", "MiB")`` -> ``"--loss_kd 100 --loss_de 100"``); "" if equal."""
    method, _ = canonical_method(method)
    values = ORIGINAL_REPO_VALUES.get(method, {}).get(repo, {})
    return " ".join(f"--{option} {_format_value(value)}" for option, value in values.items())


def options_to_dict(opts):
    """The options as a plain dict of checkpoint-safe values (``utils.checkpoint.options_to_dict``)."""
    from utils.checkpoint import options_to_dict as to_dict

    return to_dict(opts)
