"""Pieces several methods share: the optimiser groups, the ``--name`` / ``--no_name`` switches and
the one ``--help`` section of the techniques (NeST, EWF)."""
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
    (``lr × --lr_head``; the old classifiers ``× --lr_old`` when given), the cosine scale.
    At step 0, ``--lr_body0`` / ``--lr_head0`` replace the body's and the head's rates."""
    groups = []
    head_lr = opts.lr * opts.lr_head
    body_lr = opts.lr
    if step == 0:
        body_lr = opts.lr_body0 if opts.lr_body0 is not None else body_lr
        head_lr = opts.lr_head0 if opts.lr_head0 is not None else head_lr

    def add(params, lr):
        params = [p for p in params if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr, "weight_decay": opts.weight_decay})

    if not (opts.freeze and step > 0):
        add(model.body.parameters(), body_lr)
    add(model.head.parameters(), head_lr)
    if opts.lr_old is not None and step > 0:
        add([p for c in model.cls[:-1] for p in c.parameters()], head_lr * opts.lr_old)
        add(model.cls[-1].parameters(), head_lr)
    else:
        add(model.cls.parameters(), head_lr)
    if getattr(model, "scalar", None) is not None:
        add([model.scalar], head_lr)
    return groups


TECHNIQUES_TITLE = "Techniques (--method BASE+NeST sets --nest; BASE+EWF sets --weight_fusion --fix_pre_cls)"


def technique_group(parser):
    """The ``--help`` section shared by the techniques (created on first use): one heading for
    NeST's and EWF's options keeps the help short."""
    for group in parser._action_groups:
        if group.title == TECHNIQUES_TITLE:
            return group
    return parser.add_argument_group(TECHNIQUES_TITLE)


def hidden_switch(group, name) -> None:
    """``--name`` / ``--no_name`` on one destination, both left out of ``--help`` (set by a preset
    or an expert switch; the README lists them)."""
    group.add_argument(f"--{name}", dest=name, action="store_true", default=False, help=argparse.SUPPRESS)
    group.add_argument(f"--no_{name}", dest=name, action="store_false", default=False, help=argparse.SUPPRESS)
