"""Learning-rate schedules, stepped once per optimiser iteration (as in SATS/PLOP/MiB ``run.py``)."""

from torch.optim.lr_scheduler import LRScheduler, StepLR

__all__ = ["PolyLR", "WarmupPolyLR", "get_scheduler", "WARMUP_FRACTION", "WARMUP_START_FACTOR"]

# ``--lr_policy warm_poly``: the warm-up covers this fraction of the step's iterations (rounded
# down) and starts from this multiple of the base learning rate (SSUL's ADE schedule).
WARMUP_FRACTION = 0.1
WARMUP_START_FACTOR = 0.001


def _poly_factor(iteration, max_iters, power):
    """``(1 - i / max_iters) ** power``, held at 0 from ``max_iters`` on.

    Clamping avoids raising a negative number to a fractional power, which in the originals
    turned the learning rate into a complex number (or raised) past the last iteration.
    """
    return max(0.0, 1.0 - iteration / max_iters) ** power


class PolyLR(LRScheduler):
    """Polynomial decay without warm-up.

    After ``i`` calls to ``step()``: ``lr_i = max(base_lr * (1 - i / max_iters) ** power, min_lr)``.
    It reaches 0 at ``i = max_iters`` (with the default ``min_lr = 0``, as the originals). Past
    ``max_iters`` the factor stays 0.
    """

    def __init__(self, optimizer, max_iters, power=0.9, min_lr=0.0, last_epoch=-1):
        if max_iters <= 0:
            raise ValueError(f"PolyLR needs max_iters > 0, got {max_iters}")
        if min_lr < 0:
            raise ValueError(f"PolyLR needs min_lr >= 0, got {min_lr}")
        self.max_iters = max_iters
        self.power = power
        self.min_lr = min_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        factor = _poly_factor(self.last_epoch, self.max_iters, self.power)
        return [max(base_lr * factor, self.min_lr) for base_lr in self.base_lrs]

    _get_closed_form_lr = get_lr


class WarmupPolyLR(LRScheduler):
    """Linear warm-up multiplied onto a poly decay that runs over the whole step.

    After ``i`` calls to ``step()``, with ``W = warmup_iters`` and ``f0 = warmup_factor``::

        w_i  = f0 * (1 - i / W) + i / W     for i < W,   1 from i = W on
        lr_i = base_lr * w_i * (1 - i / max_iters) ** power

    The poly term counts from iteration 0, not from the end of the warm-up: the warm-up only
    scales the first ``W`` iterations of the same curve, so from ``i = W`` on the learning rate
    equals :class:`PolyLR`'s (at ``i = W`` it is ``base_lr * (1 - W / max_iters) ** power``, not
    ``base_lr``). With ``W = 0`` this is :class:`PolyLR`. The factor stays 0 from ``max_iters`` on.
    """

    def __init__(self, optimizer, max_iters, warmup_iters, warmup_factor=WARMUP_START_FACTOR,
                 power=0.9, last_epoch=-1):
        if max_iters <= 0:
            raise ValueError(f"WarmupPolyLR needs max_iters > 0, got {max_iters}")
        if not 0 <= warmup_iters <= max_iters:
            raise ValueError(f"WarmupPolyLR needs 0 <= warmup_iters <= max_iters ({max_iters}), "
                             f"got {warmup_iters}")
        if not 0 < warmup_factor <= 1:
            raise ValueError(f"WarmupPolyLR needs 0 < warmup_factor <= 1, got {warmup_factor}")
        self.max_iters = max_iters
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        self.power = power
        super().__init__(optimizer, last_epoch)

    def warmup_multiplier(self, iteration):
        """``w_i`` of the class docstring."""
        if iteration >= self.warmup_iters:
            return 1.0
        alpha = iteration / self.warmup_iters
        return self.warmup_factor * (1.0 - alpha) + alpha

    def get_lr(self):
        factor = (self.warmup_multiplier(self.last_epoch)
                  * _poly_factor(self.last_epoch, self.max_iters, self.power))
        return [base_lr * factor for base_lr in self.base_lrs]

    _get_closed_form_lr = get_lr


def get_scheduler(opts, optimizer, max_iters):
    """The scheduler named by ``opts.lr_policy``; ``max_iters`` is the step's iteration count.

    - ``poly``: ``PolyLR(optimizer, max_iters, power=opts.lr_power)``;
    - ``warm_poly``: ``WarmupPolyLR`` with ``W = int(0.1 * max_iters)`` warm-up iterations from a
      factor 0.001, then the same poly (``power=opts.lr_power``); SSUL's ADE schedule, restarted
      at every step since each step builds its own scheduler;
    - ``step``: ``StepLR(optimizer, step_size=opts.lr_decay_step, gamma=opts.lr_decay_factor)``,
      also stepped per iteration (so ``lr_decay_step`` counts iterations, as in the originals).
    """
    policy = getattr(opts, "lr_policy", "poly")
    if policy == "poly":
        return PolyLR(optimizer, max_iters, power=opts.lr_power)
    if policy == "warm_poly":
        fraction = getattr(opts, "lr_warmup", None) or WARMUP_FRACTION
        return WarmupPolyLR(optimizer, max_iters, warmup_iters=int(fraction * max_iters),
                            warmup_factor=WARMUP_START_FACTOR, power=opts.lr_power)
    if policy == "step":
        return StepLR(optimizer, step_size=opts.lr_decay_step, gamma=opts.lr_decay_factor)
    raise ValueError(f"unknown lr_policy {policy!r}; valid: 'poly', 'step', 'warm_poly'")
