"""Learning-rate schedules, stepped once per optimiser iteration (as in SATS/PLOP/MiB ``run.py``)."""

from torch.optim.lr_scheduler import LRScheduler, StepLR

__all__ = ["PolyLR", "get_scheduler"]


class PolyLR(LRScheduler):
    """Polynomial decay without warm-up.

    After ``i`` calls to ``step()``: ``lr_i = max(base_lr * (1 - i / max_iters) ** power, min_lr)``.
    It reaches 0 at ``i = max_iters`` (with the default ``min_lr = 0``, as the originals). Past
    ``max_iters`` the factor stays 0 instead of raising a negative number to a fractional power,
    which in the originals turned the learning rate into a complex number.
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
        factor = max(0.0, 1.0 - self.last_epoch / self.max_iters) ** self.power
        return [max(base_lr * factor, self.min_lr) for base_lr in self.base_lrs]

    _get_closed_form_lr = get_lr


def get_scheduler(opts, optimizer, max_iters):
    """The scheduler named by ``opts.lr_policy``.

    - ``poly``: ``PolyLR(optimizer, max_iters, power=opts.lr_power)``;
    - ``step``: ``StepLR(optimizer, step_size=opts.lr_decay_step, gamma=opts.lr_decay_factor)``,
      also stepped per iteration (so ``lr_decay_step`` counts iterations, as in the originals).
    """
    policy = getattr(opts, "lr_policy", "poly")
    if policy == "poly":
        return PolyLR(optimizer, max_iters, power=opts.lr_power)
    if policy == "step":
        return StepLR(optimizer, step_size=opts.lr_decay_step, gamma=opts.lr_decay_factor)
    raise ValueError(f"unknown lr_policy {policy!r}; valid: 'poly', 'step'")
