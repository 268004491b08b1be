"""Command-line options of ``run.py``: the options every run shares, and the method presets.

The methods' option groups, presets and checks live in their modules (``methods/``, presets applied by
``methods.presets``): an explicit option wins over a preset, and the run logs the override. The
originals' inert or refused options live in ``utils/legacy_options.py`` (listed by ``--help_legacy``).

Public API: :func:`get_argparser`, :func:`modify_command_options`, :func:`parse_options`,
:func:`explicit_options`, :func:`options_to_dict`, :data:`METHOD_PRESETS`, :data:`ORIGINAL_REPO_VALUES`.
"""
import argparse
import datetime
import json
import os
import sys

import methods
from methods.common import add_switch
from methods.plop import PSEUDO_MODES as _PLOP_PSEUDO
from methods.presets import ORIGINAL_REPO_VALUES, apply_method, canonical_method, original_repo_flags
from methods.sats import DISTILL_OBJECTS  # noqa: F401  (re-exported)
from utils import legacy_options
from utils.errors import ArgumentParser

__all__ = [
    "METHODS", "MEMORY_METHODS", "MEMORY_SIZES", "NUM_CLASSES", "MODELS", "METHOD_PRESETS",
    "ORIGINAL_REPO_VALUES", "NO_EFFECT_OPTIONS", "NOT_IMPLEMENTED_OPTIONS", "PSEUDO_MODES", "get_argparser",
    "explicit_options", "canonical_method", "modify_command_options", "parse_options", "original_repo_flags",
    "options_to_dict", "UsageError",
]

METHODS = tuple(methods.names())
MEMORY_METHODS = tuple(methods.memory_names())
METHOD_PRESETS = {spec.name: dict(spec.preset) for spec in methods.specs() if not spec.technique}
# SSUL-M's memory sizes, also used by every other -M method (SATS argparser: 100 VOC / 300 ADE).
MEMORY_SIZES = {"voc": 100, "ade": 300}
NUM_CLASSES = {"voc": 21, "ade": 151}
MODELS = ("deeplab",) + tuple(f"segformer_b{i}" for i in range(6))
MODEL_ALIASES = {"segformer": "segformer_b2"}
PSEUDO_MODES = _PLOP_PSEUDO + ("ssul",)
NO_EFFECT_OPTIONS = legacy_options.no_effect_names()
NOT_IMPLEMENTED_OPTIONS = legacy_options.refused_names()

class UsageError(ValueError):
    """A bad option or combination: the message names the option and the fix."""


# ---------------------------------------------------------------------------------------------
# Small argparse helpers
# ---------------------------------------------------------------------------------------------
def _model_name(text):
    return MODEL_ALIASES.get(text, text)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for ``--no_*`` switches and help texts that state their own; 130
    columns so that an option and its help share a line."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=36, width=130)

    def _get_help_string(self, action):
        if action.const is False or "default" in (action.help or "") or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


class _LegacyHelp(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(legacy_options.legacy_help())
        parser.exit()


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------
def _add_data_options(parser):
    g = parser.add_argument_group("Data")
    g.add_argument("--data_root", type=str, default="data", help="dataset root folder")
    g.add_argument("--dataset", type=str, default="voc", choices=sorted(NUM_CLASSES),
                   help="dataset: Pascal-VOC 2012 (21 classes) or ADE20K (151 classes, 0 scored)")
    g.add_argument("--task", type=str, default="19-1", help="task (class split), e.g. VOC 15-5, 15-1, 10-1, 19-1, "
                                                            "15-5s_b..w; ADE 100-50, 100-10, 50; generic B-I, B-Is "
                                                            "(README: Tasks)")
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
                   help="which classes keep their label in training: the current step's, current+old, all, new")
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
                   help="DeepLabV3 (ResNet, --backbone) or SegFormer MiT-B0..B5 ('segformer' = b2, the SATS paper's)")
    g.add_argument("--segformer_head", type=str, default="sats", choices=["sats", "mlp"],
                   help="SegFormer decoder: the SATS repository's head, or the official all-MLP one")
    g.add_argument("--backbone", type=str, default="resnet101", choices=["resnet50", "resnet101"],
                   help="DeepLab only: ResNet depth")
    g.add_argument("--output_stride", type=int, default=16, choices=[8, 16],
                   help="DeepLab only: output stride of the ResNet body")
    g.add_argument("--norm_act", type=str, default="iabn_sync",
                   choices=["iabn_sync", "iabn", "abn", "std", "iabn_sync_test"],
                   help="DeepLab: BatchNorm + LeakyReLU(0.01) with inplace-abn's abs(weight)+eps scaling (iabn_sync: "
                        "synchronised over processes), or std BatchNorm+ReLU")
    g.add_argument("--pretrained", type=str, default=None, metavar="SOURCE", help="ImageNet weights: a file (default "
                   "{code_directory}/pretrained/<model file>), hf:OWNER/REPO[@REV] or torchvision[:WEIGHTS] (cached)")
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
    g.add_argument("--lr_policy", type=str, default="poly", choices=["poly", "step", "warm_poly"],
                   help="poly: lr*(1-i/max_iter)^lr_power per iteration; step: StepLR; warm_poly: poly after a "
                        "linear warm-up from 0.001x (SSUL's ADE schedule)")
    g.add_argument("--lr_warmup", type=float, default=0.1, help="warm_poly: warm-up fraction of the step")
    g.add_argument("--lr_body0", type=float, default=None,
                   help="step 0 only: learning rate of the body (default: --lr; the SSUL preset sets "
                        "clovaai/SSUL's 0.001)")
    g.add_argument("--lr_head0", type=float, default=None,
                   help="step 0 only: learning rate of the head and classifiers (default: --lr x --lr_head; "
                        "the SSUL preset sets 0.01)")
    g.add_argument("--lr_decay_step", type=int, default=5000,
                   help="StepLR period in iterations (--lr_policy step)")
    g.add_argument("--lr_decay_factor", type=float, default=0.1,
                   help="StepLR factor (--lr_policy step)")
    g.add_argument("--lr_power", type=float, default=0.9, help="exponent of the poly schedule")
    add_switch(g, "freeze",
                "at steps > 0 leave the feature extractor out of the optimiser (ILT); with --ssul "
                "only the new, unknown and background classifiers are trained (SSUL)")
    g.add_argument("--stop_after_epochs", type=int, default=None,
                   help="stop this invocation after N epochs of the step (the checkpoint is saved; "
                        "continue later with --ckpt); default: train every epoch")
    g.add_argument("--max_nan_skips", type=int, default=10,
                   help="an update whose loss is NaN/Inf is skipped on every process; more than "
                        "this many skips in a step stop the run with an error")


def _add_validation_options(parser):
    g = parser.add_argument_group("Validation & checkpoints")
    g.add_argument("--crop_val", action="store_true", default=False,
                   help="evaluate on a resize + centre crop of --crop_size (the SATS/MiB/PLOP "
                        "protocol) instead of full images. CHANGED: in the originals the flag "
                        "turned cropping OFF (store_false, crop by default)")
    g.add_argument("--val_interval", type=int, default=1, help="validate every N epochs")
    g.add_argument("--test", action="store_true", default=False,
                   help="do not train: test the weights of --ckpt (or the step's checkpoint)")
    g.add_argument("--ckpt", type=str, default=None,
                   help="checkpoint of the current step to resume from or to test")
    g.add_argument("--step_ckpt", type=str, default=None,
                   help="checkpoint of the previous step (default: the file --checkpoint and "
                        "--name give); used by the first step of the invocation only")
    g.add_argument("--checkpoint", type=str, default="checkpoints/step",
                   help="checkpoint folder: {checkpoint}/{task}-{dataset}_{name}_{step}.pth")
    g.add_argument("--max_skipped_samples", type=int, default=10,
                   help="unreadable files per split left out (counted, reported, never replaced) before the run "
                        "stops")
    g.add_argument("--allow_checkpoint_mismatch", action="store_true", default=False,
                   help="accept a checkpoint whose recorded dataset, class order or model differs (logged)")
    add_switch(g, "strict_weights",
                "load checkpoints strictly (every key must match); CHANGED: the originals' flag "
                "turned strict loading off", default=True)


def _add_logging_options(parser):
    g = parser.add_argument_group("Logging")
    g.add_argument("--logdir", type=str, default="./logs",
                   help="TensorBoard root: {logdir}/{task}-{dataset}/{name}/")
    g.add_argument("--name", type=str, default="Experiment",
                   help="experiment name (log folder, checkpoint and results file names)")
    g.add_argument("--date", type=str, default=str(datetime.date.today()),
                   help="date written into the results file name results/{date}_{dataset}_{task}_"
                        "{name}.csv (default: today)")
    add_switch(g, "visualize",
                "TensorBoard logging on rank 0 (default on). CHANGED: the originals' flag "
                "turned it off", default=True)
    g.add_argument("--sample_num", type=int, default=0,
                   help="number of validation images whose predictions go to TensorBoard")
    g.add_argument("--debug", action="store_true", default=False,
                   help="verbose logging; a step > 0 may start without a previous checkpoint")
    add_switch(g, "progress", "tqdm progress bars on rank 0", default=True)


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


def _add_method_option(parser):
    g = parser.add_argument_group("Method")
    g.add_argument("--method", type=str, default=None,
                   help="preset of a method (case-insensitive): " + ", ".join(METHODS)
                        + "; NAME-M adds an exemplar memory of 100 (VOC) / 300 (ADE) images ("
                        + ", ".join(f"{m}-M" for m in MEMORY_METHODS) + ")"
                        + ("; BASE+TECHNIQUE composes a technique (" + ", ".join(methods.techniques()) + ")"
                           if methods.techniques() else "")
                        + ". Options given on the command line win over the preset (the run logs each "
                          "override). No method = fine-tuning (FT)")
    g.add_argument("--help_legacy", action=_LegacyHelp,
                   help="list the original code bases' options that are accepted but ignored or refused")


def get_argparser():
    """The ``run.py`` parser: the shared options, then each registered method's group."""
    parser = ArgumentParser(
        usage="%(prog)s [options]   (--help_legacy: the originals' options accepted for compatibility)",
        description="Continual semantic segmentation: SATS and its baselines. --method applies a preset; "
                    "explicit options win over it.",
        formatter_class=_HelpFormatter,
    )
    _add_data_options(parser)
    _add_model_options(parser)
    _add_training_options(parser)
    _add_validation_options(parser)
    _add_logging_options(parser)
    _add_performance_options(parser)
    _add_method_option(parser)
    for component in methods.components():
        component.add_options(parser)
    legacy_options.add_legacy_options(parser)
    return parser


def _parser_defaults(parser=None):
    parser = parser or get_argparser()
    return {a.dest: a.default for a in parser._actions if a.dest not in ("help", "help_legacy")}


def explicit_options(argv, parser=None):
    """Destinations typed on the command line ``argv``: the parser with every default suppressed
    (``--loss_kd 0`` with a default of 0 counts as given)."""
    parser = parser or get_argparser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(list(argv))))


# ---------------------------------------------------------------------------------------------
# Post-processing: preset, derived attributes, checks
# ---------------------------------------------------------------------------------------------
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
        raise UsageError(f"unknown dataset {opts.dataset!r}; valid datasets: {', '.join(sorted(NUM_CLASSES))}")
    expected = NUM_CLASSES[opts.dataset]
    if "num_classes" in explicit and opts.num_classes not in (None, expected):
        raise UsageError(f"--num_classes {opts.num_classes} does not match dataset {opts.dataset!r}, which "
                         f"has {expected} classes (leave it out)")
    opts.num_classes = expected


def _set_local_rank(opts, explicit):
    if "local_rank" in explicit or "LOCAL_RANK" not in os.environ:
        return
    text = os.environ["LOCAL_RANK"]
    try:
        opts.local_rank = int(text)
    except ValueError:
        raise UsageError(f"environment variable LOCAL_RANK={text!r} is not an integer") from None


def _check_task_and_steps(opts):
    import tasks

    steps = list(opts.step)
    if any(s < 0 for s in steps):
        raise UsageError(f"--step values must be >= 0, got {steps}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise UsageError(f"--step values must be strictly increasing (each step needs the previous one), "
                         f"got {steps}")
    for step in steps:
        tasks.get_task_labels(opts.dataset, opts.task, step)  # raises ValueError naming the problem
    opts.task = tasks.canonical_task(opts.dataset, opts.task)


def _check_training_numbers(opts):
    if len(opts.lr) not in (1, len(opts.step)):
        raise UsageError(f"--lr takes one value or one per step: got {len(opts.lr)} values {opts.lr} for "
                         f"{len(opts.step)} steps {opts.step}")
    if any(lr <= 0 for lr in opts.lr):
        raise UsageError(f"--lr values must be > 0, got {opts.lr}")
    positive = {"batch_size": opts.batch_size, "epochs": opts.epochs, "crop_size": opts.crop_size,
                "val_interval": opts.val_interval}
    for name, value in positive.items():
        if value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}")
    if opts.model.startswith("segformer") and opts.crop_size < 32:
        raise UsageError(f"--crop_size {opts.crop_size} is too small for {opts.model}: its encoder downsamples "
                         f"by 32, so crops need at least 32 pixels")
    if not 0 <= opts.lr_warmup <= 1:
        raise UsageError(f"--lr_warmup is a fraction of the step's iterations in [0, 1], got {opts.lr_warmup}")
    for name in ("lr_head", "lr_body0", "lr_head0"):
        if getattr(opts, name) is not None and getattr(opts, name) <= 0:
            raise UsageError(f"--{name} must be > 0, got {getattr(opts, name)}")
    if opts.stop_after_epochs is not None and opts.stop_after_epochs < 1:
        raise UsageError(f"--stop_after_epochs must be >= 1, got {opts.stop_after_epochs}")
    for name in ("max_nan_skips", "max_skipped_samples"):
        if getattr(opts, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(opts, name)}")
    if opts.data_masking == "all" and not opts.test:
        raise UsageError("--data_masking all keeps the labels of future classes, which the step's classifier "
                         "has no channel for (PLOP refused it too); use current, current+old or new")


def modify_command_options(opts, explicit=None):
    """Apply ``--method``'s preset, derive attributes and check the options; returns ``opts``.

    ``explicit``: the option destinations typed on the command line (default:
    ``opts.explicit_options`` as :func:`parse_options` records it, else every option whose value
    differs from the parser default). Sets ``method`` (canonical base name, ``"FT"`` without one),
    ``techniques``, ``method_label`` (``"SATS+NeST-M"``), ``num_classes``, ``mem_size`` for "-M"
    methods, ``local_rank`` from ``LOCAL_RANK``, ``no_overlap``, ``no_cross_val``, the methods'
    derived attributes, ``preset_overrides`` (one note per explicit value that beat a preset) and
    ``option_warnings``. Raises :class:`UsageError` (a ``ValueError``) naming the offending option.
    """
    explicit = _explicit_set(opts, explicit)
    defaults = _parser_defaults()
    _set_dataset_attributes(opts, explicit)
    opts.model = _model_name(opts.model)
    if opts.model not in MODELS:
        raise UsageError(f"unknown model {opts.model!r}; valid: {', '.join(MODELS)} (or 'segformer')")
    try:
        opts.preset_overrides = apply_method(opts, explicit, MEMORY_SIZES[opts.dataset])
    except ValueError as error:
        raise UsageError(str(error)) from None

    _set_local_rank(opts, explicit)
    legacy_options.check_refused(opts, defaults)
    _check_task_and_steps(opts)
    _check_training_numbers(opts)
    for component in methods.components():
        component.check(opts)
    for component in methods.components():
        component.derive(opts)

    opts.no_overlap = not opts.overlap
    opts.no_cross_val = not opts.cross_val
    if not opts.visualize:
        opts.sample_num = 0
    opts.option_warnings = legacy_options.warnings_for(opts, defaults)
    return opts


def parse_options(argv=None):
    """Parse ``argv`` (default ``sys.argv[1:]``) and apply :func:`modify_command_options`.

    The options typed on the command line are recorded in ``opts.explicit_options`` (sorted
    list). A bad combination exits through ``parser.error`` (status 2, the short usage line and
    the message).
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


def options_to_dict(opts):
    """The options as a plain dict of checkpoint-safe values (``utils.checkpoint.options_to_dict``)."""
    from utils.checkpoint import options_to_dict as to_dict

    return to_dict(opts)
