"""The Trainer: one continual-learning step, method-agnostic.

A method is a *recipe* (see :func:`build_recipe`): the main criterion, a list of weighted loss
terms, the pseudo-labelling mode, the regularizer and the intermediate outputs each model must
return. The training iteration below reads top to bottom and never names a method:

    old_out = old_model(images, wants)          (only when a term or the pseudo-labels need it)
    labels  = recipe.make_targets(labels, old_out)
    out     = model(images, wants)               (the two lines above run on a side thread meanwhile)
    loss    = criterion(out, labels) + sum(w_t * term_t(out, old_out, labels))
    backward ; regularizer.update() ; penalty backward ; optimiser step ; scheduler step

Conventions reproduced from MiB/PLOP (they set the scale the presets were tuned for): the main
criterion is a per-pixel map averaged over *all* pixels, ignored ones counting as zeros.
"""
from __future__ import annotations

import contextlib
import functools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils import distributed as dist_utils
from utils import loss as L
from utils import pseudo as pseudo_utils
from utils import ssul as ssul_utils
from utils.reduce import channel_argmax
from utils.regularizer import get_regularizer

IGNORE = 255


# --------------------------------------------------------------------------------------------
# Mixed precision: the originals' apex --opt_level mapped onto torch.amp
# --------------------------------------------------------------------------------------------
def amp_settings(opt_level: str, device: torch.device):
    """Return ``(autocast dtype or None, use GradScaler)`` for an apex-style ``opt_level``.

    O0: fp32. O1: fp16 autocast + GradScaler on CUDA, bf16 autocast on CPU (CPU has no fp16
    autocast worth using). O2/O3: bf16 autocast, no scaler (bf16 keeps fp32's exponent range).
    """
    if opt_level == "O0":
        return None, False
    if opt_level == "O1" and device.type == "cuda":
        return torch.float16, True
    if opt_level in ("O1", "O2", "O3"):
        return torch.bfloat16, False
    raise ValueError(f"--opt_level must be one of O0, O1, O2, O3, got {opt_level!r}")


def autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fp32(device: torch.device):
    """Region where distillation terms are computed in fp32 even inside an autocast block."""
    return torch.autocast(device_type=device.type, enabled=False)


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------
@dataclass
class Context:
    """What a loss term may read for one batch."""

    images: torch.Tensor
    labels: torch.Tensor  # targets after pseudo-labelling
    logits: torch.Tensor
    extras: dict
    old_logits: Optional[torch.Tensor]
    old_extras: dict
    nb_old: int  # C_o: background + classes of past steps
    nb_current: int  # C: all classes seen so far
    opts: SimpleNamespace
    old_probs: Optional[torch.Tensor] = None  # softmax(old_logits), when the recipe shares it

    @property
    def nb_new(self) -> int:
        return self.nb_current - self.nb_old

    @functools.cached_property
    def log_probs(self) -> torch.Tensor:
        """``log_softmax(logits)`` over all channels in fp32, computed once: the CE criterion and
        UNKD both read it (one backward through it for their summed gradients)."""
        return torch.log_softmax(self.logits.float(), dim=1)


@dataclass
class LossTerm:
    name: str
    weight: float
    fn: Callable[[Context], torch.Tensor]
    new_wants: frozenset = frozenset()
    old_wants: frozenset = frozenset()


@dataclass
class Recipe:
    criterion: str  # "ce" | "unce" | "bce" | "icarl_disjoint" | "ssul"
    terms: list = field(default_factory=list)
    pseudo: Optional[str] = None  # PLOP modes, or "ssul"
    regularizer: Optional[str] = None
    init: Optional[str] = None  # "balanced" | "unknown" | None
    share_old_softmax: bool = False  # one softmax(old logits) for the pseudo-labels and the KD teacher

    @property
    def new_wants(self) -> set:
        return set().union(*(t.new_wants for t in self.terms)) if self.terms else set()

    @property
    def old_wants(self) -> set:
        return set().union(*(t.old_wants for t in self.terms)) if self.terms else set()

    @property
    def needs_old_model(self) -> bool:
        return bool(self.terms) or self.pseudo is not None


def _kd_term(ctx: Context) -> torch.Tensor:
    kd = L.UnbiasedKnowledgeDistillationLoss if ctx.opts.unkd else L.KnowledgeDistillationLoss
    teacher = ctx.old_probs if ctx.opts.alpha == 1 else None  # = softmax(alpha * z_old)
    shared = {"log_probs": ctx.log_probs} if ctx.opts.unkd else {}
    return kd(reduction="mean", alpha=ctx.opts.alpha)(ctx.logits.float(), ctx.old_logits.float(), teacher=teacher,
                                                      **shared)


def _de_term(ctx: Context) -> torch.Tensor:
    """ILT: ``MSE(f_new, f_old)`` on the backbone output (``nn.MSELoss()``, mean over elements)."""
    return L.features_l2(ctx.extras["body"], ctx.old_extras["body"])


def _icarl_term(ctx: Context) -> torch.Tensor:
    """LwF-MC (combined form): ``C_o * mean BCEWithLogits(z[:, :C_o], sigmoid(z_old))``."""
    return L.icarl_distillation(ctx.logits, ctx.old_logits)


def _pod_term(ctx: Context) -> torch.Tensor:
    """PLOP's POD on the backbone maps, the head output and (``pod_logits``) the small logits."""
    o = ctx.opts
    old_maps = list(ctx.old_extras["attentions"])
    new_maps = list(ctx.extras["attentions"])
    if o.pod_logits:
        old_maps.append(ctx.old_extras["sem_logits_small"])
        new_maps.append(ctx.extras["sem_logits_small"])
    return L.features_distillation(
        [m.float() for m in old_maps],
        [m.float() for m in new_maps],
        collapse_channels=o.pod,
        labels=ctx.labels,
        index_new_class=ctx.nb_old,
        pod_apply=o.pod_apply,
        pod_deeplab_mask=o.pod_deeplab_mask,
        pod_deeplab_mask_factor=o.pod_deeplab_mask_factor,
        interpolate_last=o.pod_interpolate_last,
        pod_factor=o.pod_factor,
        prepro=o.pod_prepro,
        deeplabmask_upscale=not o.deeplab_mask_downscale,
        spp_scales=o.spp_scales,
        pod_options=o.pod_options,
        outputs_old=ctx.old_logits,
        use_pod_schedule=not o.no_pod_schedule,
        nb_current_classes=ctx.nb_current,
        nb_new_classes=ctx.nb_new,
    )


def _sats_term(ctx: Context) -> torch.Tensor:
    """SATS: class-specific region pooling of the encoder's self-attention (or CNN feature) maps."""
    key = "featuremaps" if ctx.opts.distill_object == "sats-feature-CNN" else "attn_maps"
    return L.sats_loss(
        ctx.extras[key],
        ctx.old_extras[key],
        ctx.labels,
        variant=ctx.opts.distill_object,
        legacy_layout=ctx.opts.sats_legacy_reshape,
    )


def _sats_wants(opts) -> frozenset:
    return frozenset({"featuremaps" if opts.distill_object == "sats-feature-CNN" else "attn_maps"})


# Each entry: name, whether it is on for these options, its weight, the function, what it reads.
TERM_TABLE = [
    ("kd", lambda o: o.loss_kd > 0, lambda o: o.loss_kd, _kd_term, lambda o: frozenset()),
    ("de", lambda o: o.loss_de > 0, lambda o: o.loss_de, _de_term, lambda o: frozenset({"body"})),
    ("icarl", lambda o: o.icarl and not o.icarl_disjoint, lambda o: o.icarl_importance, _icarl_term,
     lambda o: frozenset()),
    ("pod", lambda o: o.pod is not None, lambda o: 1.0, _pod_term,
     lambda o: frozenset({"attentions", "sem_logits_small"})),
    ("sats", lambda o: o.distill_segformer, lambda o: o.distill_weight_args, _sats_term, _sats_wants),
]


def build_recipe(opts, step: int) -> Recipe:
    """Turn the (preset-expanded) options into the recipe of step ``step``."""
    if opts.ssul:
        criterion = "ssul"
    elif opts.icarl and opts.icarl_disjoint and step > 0:
        criterion = "icarl_disjoint"
    elif opts.bce or opts.icarl:
        criterion = "bce"
    elif opts.unce and step > 0:
        criterion = "unce"
    else:
        criterion = "ce"
    # the regularizer runs at step 0 too: that is where the first importance is accumulated
    recipe = Recipe(criterion=criterion, regularizer=opts.regularizer)
    if step == 0:
        return recipe
    for name, active, weight, fn, wants in TERM_TABLE:
        if active(opts) and weight(opts) != 0:
            w = wants(opts)
            recipe.terms.append(LossTerm(name, float(weight(opts)), fn, w, w))
    recipe.pseudo = "ssul" if opts.ssul else opts.pseudo
    recipe.init = "unknown" if opts.w_transfer else ("balanced" if opts.init_balanced else None)
    recipe.share_old_softmax = (recipe.pseudo not in (None, "ssul")
                                or (opts.alpha == 1 and any(t.name == "kd" for t in recipe.terms)))
    return recipe


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------
class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    """Runs the epochs of one step. ``model``/``model_old`` may be DDP-wrapped."""

    def __init__(self, model, model_old, device, opts, trainer_state=None, classes=None, step=0,
                 logger=None, scaler=None, threshold_cache_dir=None):
        self.model = model
        self.model_old = model_old
        self.device = device
        self.opts = opts
        self.step = step
        self.logger = logger
        self.classes = list(classes) if classes is not None else None
        self.nb_current = sum(self.classes) if self.classes else opts.num_classes
        self.nb_old = sum(self.classes[:-1]) if self.classes and step > 0 else 0
        if opts.ssul:  # the unknown channel lives inside cls, not in the label space
            self.nb_current -= 1
            self.nb_old = max(self.nb_old - 1, 0)
        self.recipe = build_recipe(opts, step)
        self.amp_dtype, _ = amp_settings(opts.opt_level, device)
        self.scaler = scaler
        self.thresholds = None  # per-class pseudo-label thresholds, set by before()
        self.max_entropy = None
        self.threshold_cache_dir = threshold_cache_dir
        self.nan_skips = 0
        self.global_iter = 0
        self.keep_context = False  # benchmarks read the last batch's Context
        self._old_executor = None
        self.last_context = None

        self.regularizer = None
        if self.recipe.regularizer is not None:
            state = (trainer_state or {}).get("regularizer")
            self.regularizer = get_regularizer(_unwrap(model), _unwrap(model_old), device, opts, state)

    # ------------------------------------------------------------------ bookkeeping
    def state_dict(self) -> dict:
        reg = self.regularizer.state_dict() if self.regularizer is not None else None
        return {"regularizer": reg, "nan_skips": self.nan_skips, "global_iter": self.global_iter}

    def load_state_dict(self, state: dict) -> None:
        if self.regularizer is not None and state.get("regularizer") is not None:
            self.regularizer.load_state_dict(state["regularizer"])
        self.nan_skips = int(state.get("nan_skips", 0))
        self.global_iter = int(state.get("global_iter", 0))

    # ------------------------------------------------------------------ before the first epoch
    def before(self, train_loader, logger=None) -> None:
        """Per-class pseudo-label thresholds (PLOP ``median``/``entropy`` modes), once per step.

        Cached under ``threshold_cache_dir`` keyed by the old weights and everything else they
        depend on, so a re-run of the step does not pay the pass over the training set twice.
        """
        mode = self.recipe.pseudo
        if self.model_old is None or mode in (None, "ssul") or pseudo_utils.threshold_statistic(mode) is None:
            return
        o = self.opts

        def compute():
            return pseudo_utils.find_thresholds(
                self.model_old, train_loader, self.device, mode=mode, nb_old_classes=self.nb_old,
                nb_current_classes=self.nb_current, nb_bins=o.pseudo_nb_bins,
                legacy=o.pseudo_median_legacy, threshold=o.threshold, step=self.step,
                step_threshold=o.step_threshold, logger=logger)

        if self.threshold_cache_dir is None:
            found = compute()
        else:
            key = pseudo_utils.ThresholdKey(
                weights=pseudo_utils.weights_fingerprint(_unwrap(self.model_old)), dataset=o.dataset,
                task=o.task, step=self.step, mode=mode, nb_bins=o.pseudo_nb_bins,
                legacy=o.pseudo_median_legacy, threshold=o.threshold, step_threshold=o.step_threshold,
                nb_old_classes=self.nb_old, nb_current_classes=self.nb_current,
                dataset_len=len(train_loader.dataset),
                extra={"crop_size": o.crop_size, "seed": o.random_seed, "overlap": o.overlap,
                       "data_masking": o.data_masking, "world_size": dist_utils.get_world_size(),
                       "batch_size": o.batch_size})
            found = pseudo_utils.ThresholdCache(self.threshold_cache_dir).get_or_compute(
                key, compute, device=self.device)
        self.thresholds, self.max_entropy = found.thresholds, found.max_entropy

    # ------------------------------------------------------------------ targets
    def make_targets(self, labels, old_logits, saliency=None, old_probs=None):
        """Labels for the main criterion: pseudo-labels for PLOP/SATS, unknown/bg for SSUL.
        ``old_probs`` is ``softmax(old_logits)`` when already computed.

        Returns ``(targets, pixel_weights or None, per-image factor or None)``.
        """
        mode = self.recipe.pseudo
        if self.opts.ssul:
            targets = ssul_utils.ssul_targets(labels, saliency, self.opts.dataset)
            if old_logits is not None:
                targets = ssul_utils.ssul_pseudo_label(targets, old_logits,
                                                       threshold=self.opts.ssul_pseudo_threshold)
            return targets, None, None
        if mode is None or old_logits is None:
            return labels, None, None
        out = pseudo_utils.pseudo_label(
            labels, old_logits, mode, nb_old_classes=self.nb_old, nb_current_classes=self.nb_current,
            thresholds=self.thresholds, max_entropy=self.max_entropy,
            adaptive_factor=self.opts.classif_adaptive_factor,
            adaptive_min_factor=self.opts.classif_adaptive_min_factor,
            keep_old_gt=bool(self.opts.mem_size),  # memory samples keep their old-class labels
            probs_old=old_probs,
        )
        return out.labels, out.pixel_weights, out.adaptive_factor

    # ------------------------------------------------------------------ criterion
    def criterion_map(self, logits, targets, old_logits=None, log_probs=None) -> torch.Tensor:
        """Per-pixel main loss ``(B, H, W)``, ignored pixels 0 (SSUL: its scalar mean over valid pixels).
        ``log_probs`` is ``log_softmax(logits)`` when already computed."""
        logits = logits.float()
        kind = self.recipe.criterion
        if kind == "ce":  # = F.cross_entropy(logits, targets), whose first op is this log-softmax
            log_probs = torch.log_softmax(logits, dim=1) if log_probs is None else log_probs
            return F.nll_loss(log_probs, targets, ignore_index=IGNORE, reduction="none")
        if kind == "unce":
            return L.UnbiasedCrossEntropy(old_cl=self.nb_old, reduction="none")(logits, targets)
        if kind == "bce":
            return L.BCEWithLogitsLossWithIgnoreIndex(reduction="none")(logits, targets)
        if kind == "icarl_disjoint":
            loss = L.IcarlLoss(reduction="none", bkg=self.opts.icarl_bkg)
            return loss(logits, targets, torch.sigmoid(old_logits.float()))
        if kind == "ssul":
            return ssul_utils.ssul_bce_loss(logits, targets)
        raise ValueError(kind)

    # ------------------------------------------------------------------ one epoch
    def train(self, cur_epoch, optim, train_loader, scheduler=None, logger=None, exemplar_loader=None):
        """Train one epoch; returns the epoch mean of every loss term (identical on every rank)."""
        self.model.train()
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(cur_epoch)
        memory_iter = _cycle(exemplar_loader, cur_epoch) if exemplar_loader is not None else None
        sums: dict = {}
        n_batches = 0
        bar = tqdm(train_loader, desc=f"step {self.step} epoch {cur_epoch + 1}", leave=False,
                   disable=not dist_utils.is_main_process() or not self.opts.progress)
        try:
            for batch in bar:
                if memory_iter is not None:
                    batch = _mix_in_memory(batch, next(memory_iter))
                terms = self.train_iteration(batch, optim, scheduler)
                n_batches += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()})
                if logger is not None:
                    for k, v in terms.items():
                        logger.add_scalar(f"Train/{k}", v, self.global_iter)
                    logger.add_scalar("Train/lr", optim.param_groups[0]["lr"], self.global_iter)
        finally:
            self.close()  # no idle thread left behind between epochs (loader workers fork there)
        means = {k: v / max(n_batches, 1) for k, v in sums.items()}
        return _all_reduce_dict(means, self.device)

    def train_iteration(self, batch, optim, scheduler=None) -> dict:
        images, labels, saliency = _unpack(batch, self.device)
        recipe = self.recipe

        # The frozen old model and the targets built from it (pseudo-labels) run on a side thread
        # while this one runs the new model's forward: they do not depend on it, and a CPU step
        # leaves cores idle between small ops.
        uses_old = self.model_old is not None and recipe.needs_old_model
        if uses_old and not self.opts.sequential_old_model:
            pending = self._old_thread().submit(self._old_outputs_and_targets, images, labels, saliency)
        else:
            pending = Future()
            pending.set_result(self._old_outputs_and_targets(images, labels, saliency))

        optim.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp_dtype):
            logits, extras = self.model(images, wants=recipe.new_wants)

        (old_logits, old_extras, old_probs), (targets, pixel_weights, image_factor) = pending.result()
        with fp32(self.device):
            ctx = Context(images, targets, logits, extras, old_logits, old_extras,
                          self.nb_old, self.nb_current, self.opts, old_probs)
            log_probs = ctx.log_probs if recipe.criterion == "ce" else None
            loss_map = self.criterion_map(logits, targets, old_logits, log_probs)
            if pixel_weights is not None:
                loss_map = loss_map * pixel_weights
            if image_factor is not None:
                loss_map = loss_map * image_factor  # (B, 1, 1): PLOP's classif_adaptive_factor
            values = {"ce": loss_map.mean()}
            for term in recipe.terms:
                values[term.name] = term.weight * term.fn(ctx)
            if self.keep_context:
                self.last_context = ctx
            total = sum(values.values())

        if not self._all_finite(total):
            return self._skip_nonfinite(optim, values)
        self._backward(total)
        if self.regularizer is not None:
            values["reg"] = self._regularizer_step(optim)
        self._optimizer_step(optim)
        if scheduler is not None:
            scheduler.step()
        self.global_iter += 1
        return {k: float(v.detach()) for k, v in values.items()}

    def _old_outputs_and_targets(self, images, labels, saliency):
        """``((old logits (fp32), old extras, their softmax if the recipe shares it), make_targets(...))``.

        Grad mode, autocast and the current CUDA device are per thread: all are set here."""
        old_logits, old_extras, old_probs = None, {}, None
        if self.model_old is not None and self.recipe.needs_old_model:
            device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
            with device, torch.no_grad(), autocast(self.device, self.amp_dtype):
                old_logits, old_extras = self.model_old(images, wants=self.recipe.old_wants)
                old_logits = old_logits.float()
                if self.recipe.share_old_softmax:
                    old_probs = torch.softmax(old_logits, dim=1)
        return (old_logits, old_extras, old_probs), self.make_targets(labels, old_logits, saliency, old_probs)

    def _old_thread(self) -> ThreadPoolExecutor:
        if self._old_executor is None:
            self._old_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="old-model")
        return self._old_executor

    def close(self) -> None:
        """Stop the old model's side thread (a new one starts if the trainer is used again)."""
        if self._old_executor is not None:
            self._old_executor.shutdown(wait=True)
            self._old_executor = None

    def _backward(self, loss):
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _regularizer_step(self, optim) -> torch.Tensor:
        """Importance update on the criterion's gradients, then the penalty's own backward (MiB)."""
        if self.scaler is not None:
            self.scaler.unscale_(optim)  # the importance reads true gradients
        if dist_utils.get_rank() == 0:
            self.regularizer.update()
        penalty = self.opts.reg_importance * self.regularizer.penalty()
        if torch.is_tensor(penalty) and penalty.requires_grad:
            penalty.backward()
        return penalty if torch.is_tensor(penalty) else torch.tensor(float(penalty))

    def _optimizer_step(self, optim):
        if self.scaler is not None:
            self.scaler.step(optim)
            self.scaler.update()
        else:
            optim.step()

    def _all_finite(self, total) -> bool:
        flag = torch.tensor([0.0 if torch.isfinite(total.detach()) else 1.0], device=self.device)
        if dist_utils.get_world_size() > 1:  # every rank skips together, or none does
            torch.distributed.all_reduce(flag)
        return flag.item() == 0

    def _skip_nonfinite(self, optim, values) -> dict:
        self.nan_skips += 1
        optim.zero_grad(set_to_none=True)
        names = [k for k, v in values.items() if not torch.isfinite(v.detach())]
        msg = (f"non-finite loss ({', '.join(names) or 'another rank'}) at iteration "
               f"{self.global_iter}: update skipped ({self.nan_skips} so far)")
        if self.logger is not None:
            self.logger.info(msg)
        if self.nan_skips > self.opts.max_nan_skips:
            raise NonFiniteLossError(
                f"{self.nan_skips} updates skipped because the loss was NaN/Inf (limit "
                f"--max_nan_skips {self.opts.max_nan_skips}). Lower --lr, use --opt_level O0, or "
                f"check the data.")
        self.global_iter += 1
        return {}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def validate(self, loader, metrics, logger=None, end_task=False):
        """Evaluate on ``loader``; returns ``(losses, score)`` (identical on every rank).

        ``--align_weight`` (PLOP) rescales the newest classifier first, at every validation
        (``--align_weight_frequency epoch``) or before the end-of-step test (``task``).
        """
        frequency = self.opts.align_weight_frequency
        if self.opts.align_weight and self.step > 0 and (frequency == "epoch" or (frequency == "task" and end_task)):
            _unwrap(self.model).align_weight(self.opts.align_weight)
        self.model.eval()
        metrics.reset()
        ce_sum = torch.zeros(2, device=self.device, dtype=torch.float64)
        for batch in tqdm(loader, desc="test" if end_task else "val", leave=False,
                          disable=not dist_utils.is_main_process() or not self.opts.progress):
            images, labels, _ = _unpack(batch, self.device)
            with autocast(self.device, self.amp_dtype):
                logits, _ = self.model(images)
            logits = logits.float()
            if not self.opts.ssul:
                ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
                ce_sum += torch.stack([ce.mean(dim=(1, 2)).sum().double(),
                                       torch.tensor(float(images.shape[0]), device=self.device,
                                                    dtype=torch.float64)])
            metrics.update(labels, self.predict(logits))
        metrics.synch(self.device)
        if dist_utils.get_world_size() > 1:
            torch.distributed.all_reduce(ce_sum)
        losses = {"ce": (ce_sum[0] / ce_sum[1].clamp_min(1)).item()} if not self.opts.ssul else {}
        return losses, metrics.get_results()

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        if self.opts.ssul:
            return channel_argmax(ssul_utils.ssul_fold_unknown(logits))
        return channel_argmax(logits)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _unwrap(model):
    return getattr(model, "module", model) if model is not None else None


def _unpack(batch, device):
    """A batch is ``(images, labels)`` or ``(images, labels, saliency)``."""
    images = batch[0].to(device, non_blocking=True)
    labels = batch[1].to(device, non_blocking=True).long()
    saliency = None
    if len(batch) >= 3 and batch[2].dim() == 3:
        saliency = batch[2].to(device, non_blocking=True)
    return images, labels, saliency


def _cycle(loader, epoch):
    """Endless iteration over the memory loader, reshuffled at each pass."""
    n = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch * 1000 + n)
        yield from loader
        n += 1


def _mix_in_memory(batch, memory_batch):
    """SSUL-M mixing: a random half of the batch is replaced by memory samples (same indices)."""
    b = batch[0].shape[0]
    idx = torch.randperm(b)[: b // 2]
    idx = idx[idx < memory_batch[0].shape[0]]
    mixed = []
    for x, m in zip(batch, memory_batch):
        x = x.clone()
        x[idx] = m[idx].to(x.dtype)
        mixed.append(x)
    return type(batch)(mixed) if isinstance(batch, tuple) else mixed


def _all_reduce_dict(values: dict, device) -> dict:
    if dist_utils.get_world_size() <= 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    t /= dist_utils.get_world_size()
    return dict(zip(keys, t.tolist()))
