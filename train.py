"""The Trainer: one continual-learning step, method-agnostic.

What a method changes comes from its module as a :class:`methods.Recipe` (the main criterion, the
weighted loss terms with their options bound, the target builder, the regularizer, the prediction
rule). The training iteration reads top to bottom and never names a method:

    old_out, targets = old_model(images, wants), recipe.targets(labels, old_out)   (side thread)
    out    = model(images, wants)                                   (meanwhile, this thread)
    losses = {criterion.name: mean(criterion(ctx))} | {t.name: t.weight * t(ctx) for t in terms}
    all ranks finite? (the regularizer's penalty included) ; backward ; regularizer ; step ; LR step
"""
from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F
from tqdm import tqdm

import methods
from methods import Context, Targets
from utils import distributed as dist_utils
from utils.distributed import unwrap
from utils.errors import UserError
from utils.regularizer import get_regularizer

IGNORE = 255


def build_recipe(opts, step: int, classes=None):
    """The recipe of step ``step`` (see :func:`methods.build_recipe`)."""
    return methods.build_recipe(opts, step, classes)


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
    """Region where the losses are computed in fp32 even inside an autocast block."""
    return torch.autocast(device_type=device.type, enabled=False)


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------
class NonFiniteLossError(UserError):
    """Too many updates skipped for a NaN/Inf loss (the message says what to change)."""


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
        info = methods.step_info(opts, step, self.classes)
        self.nb_old, self.nb_current = info.nb_old, info.nb_current
        self.recipe = methods.build_recipe(opts, step, self.classes)
        self.amp_dtype, _ = amp_settings(opts.opt_level, device)
        self.scaler = scaler
        self.threshold_cache_dir = threshold_cache_dir
        self.nan_skips = 0
        self.scaler_skips = 0  # iterations whose scaled gradients overflowed (GradScaler skipped them)
        self.global_iter = 0
        self.keep_context = False  # benchmarks read the last batch's Context
        self.last_context = None
        self._old_executor = None
        self._old_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

        self.regularizer = None
        if self.recipe.regularizer is not None:
            state = (trainer_state or {}).get("regularizer")
            self.regularizer = get_regularizer(unwrap(model), unwrap(model_old), device, opts, state)

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
        """Once per step, before the first epoch: the target builder's preparation (e.g. per-class
        pseudo-label thresholds from a pass of the old model over the training set)."""
        if self.model_old is not None and self.recipe.targets is not None:
            self.recipe.targets.before(self, train_loader, logger)

    # ------------------------------------------------------------------ targets and criterion
    def make_targets(self, labels, old_logits, saliency=None, old_probs=None) -> Targets:
        """The criterion's targets (labels, pixel weights or None, per-image factor or None).
        ``old_probs`` is ``softmax(old_logits)`` when already computed."""
        if self.recipe.targets is None:
            return Targets(labels)
        return self.recipe.targets(labels, old_logits, saliency, old_probs)

    def criterion_map(self, ctx: Context) -> torch.Tensor:
        """The main loss per pixel ``(B, H, W)``, ignored pixels 0 (or a criterion's own scalar)."""
        return self.recipe.criterion(ctx)

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

        # The frozen old model and the targets built from it run on a side thread while this one
        # runs the new model's forward: they do not depend on it, and a step leaves the device idle
        # between small ops.
        uses_old = self.model_old is not None and recipe.needs_old_model
        if uses_old and not self.opts.sequential_old_model:
            pending = self._old_thread().submit(self._old_outputs_and_targets, images, labels, saliency,
                                                self._current_stream())
        else:
            pending = Future()
            pending.set_result(self._old_outputs_and_targets(images, labels, saliency))

        optim.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp_dtype):
            logits, extras = self.model(images, wants=recipe.new_wants)

        (old_logits, old_extras, old_probs), targets = pending.result()
        if self._old_stream is not None and uses_old:
            torch.cuda.current_stream(self.device).wait_stream(self._old_stream)
        with fp32(self.device):
            ctx = Context(images, targets.labels, logits, extras, old_logits, old_extras,
                          self.nb_old, self.nb_current, old_probs)
            loss_map = self.criterion_map(ctx)
            if targets.pixel_weights is not None:
                loss_map = loss_map * targets.pixel_weights
            if targets.image_factor is not None:
                loss_map = loss_map * targets.image_factor  # (B, 1, 1): a per-image factor
            values = {recipe.criterion.name: loss_map.mean()}
            for term in recipe.terms:
                values[term.name] = term.weight * term(ctx)
            if self.keep_context:
                self.last_context = ctx
            total = sum(values.values())
            penalty = self._penalty()

        check = total if penalty is None else total + penalty.detach()
        if not self._all_finite(check):
            return self._skip_nonfinite(optim, values if penalty is None else {**values, "reg": penalty})
        self._backward(total)
        if penalty is not None:
            values["reg"] = self._regularizer_step(optim, penalty)
        self._optimizer_step(optim)
        if scheduler is not None:
            scheduler.step()
        self.global_iter += 1
        return {k: float(v.detach()) for k, v in values.items()}

    def _current_stream(self):
        return torch.cuda.current_stream(self.device) if self._old_stream is not None else None

    def _old_outputs_and_targets(self, images, labels, saliency, main_stream=None):
        """``((old logits (fp32), old extras, their softmax if the recipe shares it), targets)``.

        Grad mode, autocast and the current CUDA device are per thread: all are set here. On CUDA
        the work runs on the trainer's own stream, after the main stream's pending work (the
        batch's host-to-device copies)."""
        old_logits, old_extras, old_probs = None, {}, None
        recipe = self.recipe
        if self.model_old is None or not recipe.needs_old_model:
            return (old_logits, old_extras, old_probs), self.make_targets(labels, None, saliency)
        with self._old_device_context(main_stream), torch.no_grad():
            with autocast(self.device, self.amp_dtype):
                old_logits, old_extras = self.model_old(images, wants=recipe.old_wants)
                old_logits = old_logits.float()
                if recipe.share_old_softmax:
                    old_probs = torch.softmax(old_logits, dim=1)
            targets = self.make_targets(labels, old_logits, saliency, old_probs)  # on the same stream
        return (old_logits, old_extras, old_probs), targets

    @contextlib.contextmanager
    def _old_device_context(self, main_stream):
        if self.device.type != "cuda":
            yield
            return
        with torch.cuda.device(self.device):
            if main_stream is None:  # in line: the main stream itself
                yield
                return
            self._old_stream.wait_stream(main_stream)
            with torch.cuda.stream(self._old_stream):
                yield

    def _old_thread(self) -> ThreadPoolExecutor:
        if self._old_executor is None:
            self._old_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="old-model")
        return self._old_executor

    def close(self) -> None:
        """Stop the old model's side thread (a new one starts if the trainer is used again)."""
        if self._old_executor is not None:
            self._old_executor.shutdown(wait=True)
            self._old_executor = None

    # ------------------------------------------------------------------ backward and step
    def _backward(self, loss):
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _penalty(self):
        """``reg_importance × penalty()`` of the regularizer (None without one), computed before the
        backward so that its value enters the all-ranks finiteness check."""
        if self.regularizer is None:
            return None
        penalty = self.opts.reg_importance * self.regularizer.penalty()
        return penalty if torch.is_tensor(penalty) else torch.tensor(float(penalty), device=self.device)

    def _regularizer_step(self, optim, penalty) -> torch.Tensor:
        """Importance update on the criterion's true gradients, then the penalty's own backward.

        Under a GradScaler the gradients are unscaled first (those of parameters outside the
        optimiser too, e.g. with ``--freeze``); on an iteration whose scaled gradients overflowed
        (the scaler will skip the step) the importance is not updated."""
        finite = True
        if self.scaler is not None:
            finite = self._unscale_all(optim)
        if finite and dist_utils.get_rank() == 0:
            self.regularizer.update()
        if penalty.requires_grad:
            penalty.backward()
        return penalty

    def _unscale_all(self, optim) -> bool:
        """``scaler.unscale_(optim)`` plus the gradients of trainable parameters outside ``optim``;
        returns whether every gradient is finite."""
        self.scaler.unscale_(optim)
        found = sum(float(v) for v in self.scaler._found_inf_per_device(optim).values())
        in_optim = {id(p) for group in optim.param_groups for p in group["params"]}
        inverse = 1.0 / self.scaler.get_scale()
        for p in unwrap(self.model).parameters():
            if p.grad is not None and id(p) not in in_optim:
                p.grad.mul_(inverse)
                found += float(not torch.isfinite(p.grad).all())
        if dist_utils.get_world_size() > 1:
            flag = torch.tensor([found], device=self.device)
            torch.distributed.all_reduce(flag)
            found = float(flag.item())
        if found:
            self.scaler_skips += 1
        return found == 0

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
            advice = "use --opt_level O0, " if self.opts.opt_level != "O0" else ""
            raise NonFiniteLossError(
                f"{self.nan_skips} updates skipped because the loss was NaN/Inf (limit "
                f"--max_nan_skips {self.opts.max_nan_skips}). Lower --lr, {advice}or check the data.")
        self.global_iter += 1
        return {}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def validate(self, loader, metrics, logger=None, end_task=False):
        """Evaluate on ``loader``; returns ``(losses, score)`` (identical on every rank).

        ``--align_weight`` rescales the newest classifier first, at every validation
        (``--align_weight_frequency epoch``) or before the end-of-step test (``task``).
        """
        frequency = self.opts.align_weight_frequency
        if self.opts.align_weight and self.step > 0 and (frequency == "epoch" or (frequency == "task" and end_task)):
            unwrap(self.model).align_weight(self.opts.align_weight)
        self.model.eval()
        metrics.reset()
        with_loss = self.recipe.eval_loss
        ce_sum = torch.zeros(2, device=self.device, dtype=torch.float64)
        for batch in tqdm(loader, desc="test" if end_task else "val", leave=False,
                          disable=not dist_utils.is_main_process() or not self.opts.progress):
            images, labels, _ = _unpack(batch, self.device)
            with autocast(self.device, self.amp_dtype):
                logits, _ = self.model(images)
            logits = logits.float()
            if with_loss:
                ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
                ce_sum += torch.stack([ce.mean(dim=(1, 2)).sum().double(),
                                       torch.tensor(float(images.shape[0]), device=self.device,
                                                    dtype=torch.float64)])
            metrics.update(labels, self.predict(logits))
        metrics.synch(self.device)
        if dist_utils.get_world_size() > 1:
            torch.distributed.all_reduce(ce_sum)
        losses = {"ce": (ce_sum[0] / ce_sum[1].clamp_min(1)).item()} if with_loss else {}
        return losses, metrics.get_results()

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """The predicted label map of ``logits`` (the method's rule; argmax by default)."""
        return self.recipe.predict(logits)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
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
    """Memory mixing: a random half of the batch is replaced by memory samples (same indices)."""
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
