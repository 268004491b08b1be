"""Pieces several methods share: the optimiser groups and the ``--name`` / ``--no_name`` switch."""
from __future__ import annotations

import argparse


def add_switch(group, name, help_text, default=False):
    """``--name`` (on) and ``--no_name`` (off) on one destination, so a preset can be undone; the
    help shows one line for both."""
    group.add_argument(f"--{name}", dest=name, action="store_true", default=default,
                       help=f"{help_text} [--no_{name}: off]")
    group.add_argument(f"--no_{name}", dest=name, action="store_false", default=default, help=argparse.SUPPRESS)


def default_param_groups(model, opts, step: int) -> list:
    """SGD groups: body (left out with ``--freeze`` at step > 0), head and classifiers
    (``lr × --lr_head``; the old classifiers ``× --lr_old`` when given), the cosine scale."""
    groups = []

    def add(params, lr_scale):
        params = [p for p in params if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": opts.lr * lr_scale, "weight_decay": opts.weight_decay})

    if not (opts.freeze and step > 0):
        add(model.body.parameters(), 1.0)
    add(model.head.parameters(), opts.lr_head)
    if opts.lr_old is not None and step > 0:
        add([p for c in model.cls[:-1] for p in c.parameters()], opts.lr_head * opts.lr_old)
        add(model.cls[-1].parameters(), opts.lr_head)
    else:
        add(model.cls.parameters(), opts.lr_head)
    if getattr(model, "scalar", None) is not None:
        add([model.scalar], opts.lr_head)
    return groups
