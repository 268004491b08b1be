"""The plug-in interface: what a method module provides, and the per-step objects built from it.

A method module holds one :class:`Component` (its options, checks and the pieces of a training
step it contributes) and registers one or more :class:`MethodSpec` (a name on the command line,
its preset values, the step-0 model it can share). Which pieces are active is decided by the
(preset-expanded) options alone, so ``--method FT --loss_kd 10`` trains LwF's KD term exactly as
``--method LWF --loss_kd 10`` does.

At the start of a step :func:`methods.build_recipe` asks every component for its contribution and
returns a :class:`Recipe`: the main criterion, the weighted loss terms (options bound once), the
target builder (pseudo-labels), the classifier initialisation, the optimiser groups, the
prediction rule and the step hooks. The trainer calls only these objects.

Conventions reproduced from MiB/PLOP (they set the scale the presets were tuned for): the main
criterion is a per-pixel map averaged over *all* pixels, ignored pixels counting as zeros.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from utils.reduce import channel_argmax

IGNORE = 255


# --------------------------------------------------------------------------------------------
# What a loss term reads
# --------------------------------------------------------------------------------------------
@dataclass
class Context:
    """One batch as the loss terms see it (inside the trainer's fp32 region)."""

    images: torch.Tensor
    labels: torch.Tensor  # targets after pseudo-labelling
    logits: torch.Tensor
    extras: dict
    old_logits: Optional[torch.Tensor]
    old_extras: dict
    nb_old: int  # C_o: background + classes of past steps
    nb_current: int  # C: all classes seen so far
    old_probs: Optional[torch.Tensor] = None  # softmax(old_logits), when the recipe shares it

    @property
    def nb_new(self) -> int:
        return self.nb_current - self.nb_old

    @functools.cached_property
    def log_probs(self) -> torch.Tensor:
        """``log_softmax(logits)`` over all channels in fp32, computed once: the CE criterion and
        UNKD both read it (one backward through it for their summed gradients)."""
        return torch.log_softmax(self.logits.float(), dim=1)


class Targets(NamedTuple):
    """The main criterion's labels, optional per-pixel weights and per-image factor ``(B, 1, 1)``."""

    labels: torch.Tensor
    pixel_weights: Optional[torch.Tensor] = None
    image_factor: Optional[torch.Tensor] = None


# --------------------------------------------------------------------------------------------
# The pieces of a recipe
# --------------------------------------------------------------------------------------------
class LossTerm:
    """A weighted loss term, its options bound when the step starts.

    ``value = weight * self(ctx)``; ``new_wants`` / ``old_wants`` name the intermediate outputs
    (``segmentation_module.EXTRA_KEYS``) the new and the old model must return for it.
    """

    name: str = "term"
    new_wants: frozenset = frozenset()
    old_wants: frozenset = frozenset()
    shares_old_softmax: bool = False  # reads ctx.old_probs (softmax of the old logits)

    def __init__(self, weight: float):
        self.weight = float(weight)

    def __call__(self, ctx: Context) -> torch.Tensor:
        raise NotImplementedError


class Criterion:
    """The main loss as a per-pixel map ``(B, H, W)`` (ignored pixels 0), averaged by the trainer.

    ``name`` is the key the loss is logged under; ``reads_log_probs``: the map is computed from
    ``ctx.log_probs`` (shared with UNKD)."""

    name: str = "ce"
    reads_log_probs: bool = False

    def __call__(self, ctx: Context) -> torch.Tensor:
        raise NotImplementedError


class CrossEntropy(Criterion):
    """``-log softmax(z)_y`` per pixel: the same ops as ``F.cross_entropy`` (log-softmax, NLL)."""

    name = "ce"
    reads_log_probs = True

    def __call__(self, ctx: Context) -> torch.Tensor:
        return F.nll_loss(ctx.log_probs, ctx.labels, ignore_index=IGNORE, reduction="none")


class TargetBuilder:
    """Turns the batch labels into the criterion's targets, reading the old model's outputs.

    ``before(trainer, loader, logger)`` runs once before the first epoch (e.g. thresholds);
    ``__call__`` runs on the old model's side thread, per batch.
    """

    name: str = "targets"
    shares_old_softmax: bool = False
    needs_old_model: bool = True

    def before(self, trainer, loader, logger=None) -> None:
        pass

    def __call__(self, labels, old_logits, saliency=None, old_probs=None) -> Targets:
        raise NotImplementedError


def argmax_prediction(logits: torch.Tensor) -> torch.Tensor:
    """The predicted class per pixel: the argmax over channels (first on ties)."""
    return channel_argmax(logits)


# --------------------------------------------------------------------------------------------
# A step's recipe
# --------------------------------------------------------------------------------------------
@dataclass
class StepInfo:
    """What a component may read when it builds its contribution to a step."""

    opts: object
    step: int
    classes: Optional[list]  # per-step class counts of the model (tasks.get_per_task_classes)
    nb_old: int  # classes of past steps, background included (label space)
    nb_current: int  # all classes seen so far (label space)


@dataclass
class Recipe:
    """Everything one step's training and evaluation need from the methods."""

    criterion: Criterion
    terms: list = field(default_factory=list)
    targets: Optional[TargetBuilder] = None
    regularizer: Optional[str] = None  # "ewc" | "rw" | "pi"
    init_classifier: Optional[Callable] = None  # (model, logger) -> None, at step > 0
    init_name: Optional[str] = None
    predict: Callable = argmax_prediction
    eval_loss: bool = True  # report the validation CE (not for label spaces it does not fit)
    find_unused_parameters: bool = False  # DDP: some parameters get no gradient
    hooks: list = field(default_factory=list)  # components with step hooks
    components: list = field(default_factory=list)

    @property
    def new_wants(self) -> set:
        return set().union(*(t.new_wants for t in self.terms)) if self.terms else set()

    @property
    def old_wants(self) -> set:
        return set().union(*(t.old_wants for t in self.terms)) if self.terms else set()

    @property
    def needs_old_model(self) -> bool:
        return bool(self.terms) or (self.targets is not None and self.targets.needs_old_model)

    @property
    def share_old_softmax(self) -> bool:
        """One softmax of the old logits for the pseudo-labels and the KD teacher."""
        return any(t.shares_old_softmax for t in self.terms) or bool(
            self.targets is not None and self.targets.shares_old_softmax)

    @property
    def pseudo(self) -> Optional[str]:
        return None if self.targets is None else self.targets.name

    @property
    def init(self) -> Optional[str]:
        return self.init_name


# --------------------------------------------------------------------------------------------
# Components and method names
# --------------------------------------------------------------------------------------------
class Component:
    """Base class of a method module's component. Every hook is optional.

    Class attributes: ``name``; ``priority`` orders the components that claim the same piece (the
    criterion, the targets, the classifier init, the optimiser groups, the prediction): the
    highest priority that returns something wins.
    """

    name = "component"
    priority = 0
    order = 100  # position of its loss terms in the sum (and in the logs)

    # ---- options
    def add_options(self, parser) -> None:
        """Add this component's option group to ``parser``."""

    def check(self, opts) -> None:
        """Raise ``ValueError`` naming the option for an invalid combination."""

    def derive(self, opts) -> None:
        """Set derived attributes on ``opts`` after the checks."""

    # ---- model
    def build_model(self, opts, classes):
        """The network of a method with its own architecture (called by
        ``segmentation_module.make_model`` for the new and the old model), or None."""
        return None

    def model_tag(self, opts) -> Optional[str]:
        """A name added to the checkpoint's recorded model when this component changes the network
        (so that its checkpoints are told apart from the default network's), or None."""
        return None

    def label_space(self, opts, nb_old: int, nb_current: int) -> tuple[int, int]:
        """``(nb_old, nb_current)`` in the label space the criterion sees."""
        return nb_old, nb_current

    # ---- one step
    def criterion(self, info: StepInfo) -> Optional[Criterion]:
        return None

    def terms(self, info: StepInfo) -> list:
        return []

    def targets(self, info: StepInfo) -> Optional[TargetBuilder]:
        """Called at every step (step 0 included: a builder may only change the label space)."""
        return None

    def regularizer(self, info: StepInfo) -> Optional[str]:
        return None

    def init_classifier(self, info: StepInfo) -> Optional[tuple[str, Callable]]:
        """``(name, fn(model, logger))`` initialising the new classifier at step > 0, or None."""
        return None

    def param_groups(self, model, opts, step: int) -> Optional[list]:
        """Optimiser groups replacing the default ones, or None."""
        return None

    def predict(self, opts) -> Optional[Callable]:
        return None

    def eval_loss(self, opts) -> bool:
        return True

    def find_unused_parameters(self, opts) -> bool:
        return False

    def memory_pseudo_labels(self, opts) -> Optional[Callable]:
        """How the exemplar memory labels its candidates with the old model, or None."""
        return None

    # ---- step hooks (run.py calls them on every component in registry order)
    def setup_model(self, run, model, info: StepInfo) -> None:
        """After the previous step's weights are loaded and before the optimiser is built."""

    def before_training(self, run, info: StepInfo) -> None:
        """After the trainer is built (and a resume loaded), before the first epoch."""

    def after_step(self, run, info: StepInfo) -> None:
        """After the step's final checkpoint is written, before it is tested."""

    def log_samples(self, run, model, model_old, dataset, indices, epoch) -> None:
        """Extra TensorBoard images at validation time."""

    # ---- checkpoint state
    def checkpoint_state(self, run) -> Optional[dict]:
        """Extra state saved in the step's checkpoint under ``ckpt["methods"][self.name]``, or None.
        A resumed step finds it in ``run.resumed_state`` (``{component name: state}``)."""
        return None


@dataclass(frozen=True)
class MethodSpec:
    """A name accepted by ``--method``.

    ``preset``: the options it sets (an explicit command-line value wins, logged);
    ``step0_family``: runs of methods of the same family can share one step-0 model;
    ``memory``: ``NAME-M`` adds the exemplar memory; ``technique``: composes with a base method
    as ``BASE+NAME`` (its preset is applied after the base's); ``refuses``: base methods it cannot
    be combined with, with the reason.
    """

    name: str
    preset: dict = field(default_factory=dict)
    step0_family: str = "ce"
    memory: bool = False
    technique: bool = False
    refuses: dict = field(default_factory=dict)
    summary: str = ""
    order: int = 100  # position in listings
    # The authors' sweep values where they differ from the scripts' defaults, per dataset or
    # "dataset:task": {"epochs", "lr0", "lr", "args" (steps > 0), "step0_args"}.
    sweep: dict = field(default_factory=dict)
