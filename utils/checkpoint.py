"""Checkpoint files: atomic saves (``utils.io``), ``weights_only`` loads, the MiB/PLOP file name.

A checkpoint is a dict (keys ``epoch``, ``model_state``, ``optimizer_state``, ``scheduler_state``,
``best_score``, ``trainer_state``, plus ``opts`` and ``classes`` here). Everything is converted to
types that ``torch.load(..., weights_only=True)`` accepts *before* writing (see ``to_safe``), so a
file this module writes always loads back; a value that cannot be converted fails at save time,
naming its key, instead of at the next step's load.
"""

import argparse
import os
import pathlib
from collections import OrderedDict

import numpy as np
import torch

from .io import atomic_write  # re-exported: callers import it from here
from .errors import UserError

__all__ = [
    "atomic_write",
    "save_atomic",
    "load_checkpoint",
    "to_safe",
    "options_to_dict",
    "strip_prefix",
    "checkpoint_name",
    "checkpoint_path",
]

_PRIMITIVES = (bool, int, float, str, bytes, type(None))


def _numpy_scalar_globals():
    """What unpickling a numpy number needs: the originals stored ``best_score`` as np.float64.

    Rebuilding a numpy scalar from its dtype and raw bytes runs no user code, so allowing these
    keeps ``weights_only`` safe while old MiB/PLOP/SATS files still load.
    """
    core = getattr(np, "_core", None) or np.core
    dtype_names = ["Bool", "Float16", "Float32", "Float64", "Int8", "Int16", "Int32", "Int64",
                   "UInt8", "UInt16", "UInt32", "UInt64"]
    dtype_classes = [getattr(np.dtypes, f"{name}DType") for name in dtype_names
                     if hasattr(np, "dtypes") and hasattr(np.dtypes, f"{name}DType")]
    return [core.multiarray.scalar, np.dtype, *dtype_classes]


def options_to_dict(opts):
    """An ``argparse.Namespace`` (or dict) of options as a plain dict of checkpoint-safe values."""
    if isinstance(opts, argparse.Namespace):
        opts = vars(opts)
    if not isinstance(opts, dict):
        raise TypeError(f"options must be an argparse.Namespace or a dict, got {type(opts).__name__}")
    return to_safe(opts, "opts")


def to_safe(obj, where="checkpoint"):
    """Copy of ``obj`` made of what ``weights_only`` loading accepts.

    Tensors, Python scalars, strings, None, lists, tuples, dicts (incl. OrderedDict) are kept;
    numpy scalars become Python numbers, numpy arrays become tensors, ``argparse.Namespace`` a dict,
    paths strings, sets sorted lists. Anything else raises ``TypeError`` naming where it was.
    """
    if isinstance(obj, np.generic):  # before the primitives: np.float64 subclasses float
        return obj.item()
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PRIMITIVES):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, (pathlib.PurePath, torch.device, torch.dtype)):
        return str(obj)
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        items = ((key, to_safe(value, f"{where}[{key!r}]")) for key, value in obj.items())
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, (set, frozenset)):
        return sorted(to_safe(value, where) for value in obj)
    if isinstance(obj, (list, tuple)):
        converted = [to_safe(value, f"{where}[{i}]") for i, value in enumerate(obj)]
        return converted if isinstance(obj, list) else tuple(converted)
    raise TypeError(
        f"{where}: a {type(obj).__name__} cannot be stored in a checkpoint that loads with "
        "weights_only=True; store tensors, numbers, strings, lists or dicts")


def save_atomic(obj, path):
    """``torch.save(to_safe(obj))`` to ``path`` through a temporary file (``utils.io.atomic_write``)."""
    safe = to_safe(obj)
    atomic_write(path, lambda handle: torch.save(safe, handle))


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with ``torch.load(..., weights_only=True)``.

    Numpy scalars, which the originals' files contain, are allowed (see ``_numpy_scalar_globals``).
    Raises ``FileNotFoundError`` naming the path when it is missing, and ``RuntimeError`` naming it
    when it is truncated, corrupt or holds objects that ``weights_only`` refuses
    (:class:`CorruptCheckpointError`, a user error that is also a ``RuntimeError``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise  # unreadable file (permissions, I/O): the OS message says it best
    except Exception as error:  # noqa: BLE001 - garbage bytes make the unpickler fail in many ways
        # (UnpicklingError, EOFError, IndexError, struct.error, UnicodeDecodeError, ...)
        raise CorruptCheckpointError(
            f"cannot load checkpoint {path}: it is truncated or corrupt, or holds objects that "
            f"weights_only loading refuses ({type(error).__name__}: {error})") from error


class CorruptCheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot be read back: a user error (``error:``, exit 2) that callers
    may still catch as the ``RuntimeError`` ``torch.load`` raises."""


def strip_prefix(state_dict, prefix="module."):
    """Copy of ``state_dict`` with ``prefix`` removed from the keys that start with it.

    Checkpoints saved from a DistributedDataParallel wrapper (MiB/PLOP/SATS files) prefix every
    key with ``module.``; other keys are kept unchanged.
    """
    return OrderedDict(
        (key[len(prefix):] if key.startswith(prefix) else key, value)
        for key, value in state_dict.items())


def checkpoint_name(task, dataset, name, step):
    """MiB/PLOP file name ``{task}-{dataset}_{name}_{step}.pth``."""
    return f"{task}-{dataset}_{name}_{step}.pth"


def checkpoint_path(opts, step):
    """``{opts.checkpoint}/{opts.task}-{opts.dataset}_{opts.name}_{step}.pth``."""
    return os.path.join(opts.checkpoint, checkpoint_name(opts.task, opts.dataset, opts.name, step))
