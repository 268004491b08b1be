"""Process-group set-up and small collective helpers (torch.distributed, NCCL on CUDA, gloo on CPU).

Launchers understood:
- ``torchrun`` and ``python -m torch.distributed.launch --use-env``: ``LOCAL_RANK``, ``RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment;
- the legacy ``torch.distributed.launch`` without ``--use-env``: the same variables except
  ``LOCAL_RANK``, which it passes as ``--local_rank`` / ``--local-rank`` (``opts.local_rank``);
- no launcher: a world of one process, no process group.

Every helper works without a process group (rank 0 of a world of 1), so single-process code needs
no special case. The process-group timeout (``CSS_DIST_TIMEOUT`` seconds, default 600) makes the
surviving ranks fail within minutes when one rank dies instead of waiting forever.
"""

import datetime
import os

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "init_distributed",
    "is_dist_initialized",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "all_reduce_sum",
    "all_reduce_mean",
    "broadcast_object",
    "cleanup",
    "unwrap",
]

DEFAULT_TIMEOUT_S = 600


def _env_int(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _timeout():
    seconds = os.environ.get("CSS_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(seconds)
    except ValueError:
        raise ValueError(f"CSS_DIST_TIMEOUT={seconds!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"CSS_DIST_TIMEOUT must be positive, got {seconds}")
    return datetime.timedelta(seconds=seconds)


def is_dist_initialized():
    return dist.is_available() and dist.is_initialized()


def init_distributed(opts=None):
    """Join the process group the launcher describes; returns ``(device, rank, world_size)``.

    ``LOCAL_RANK`` (environment) wins over ``opts.local_rank`` (legacy launcher argument). With
    ``WORLD_SIZE > 1`` the group is created with NCCL when CUDA is available (each process on
    ``cuda:LOCAL_RANK``), else gloo on the CPU, ``init_method='env://'`` and the timeout above.
    Without a launcher (or ``WORLD_SIZE=1``) no group is created: the device is ``cuda:LOCAL_RANK``
    when CUDA is available, else the CPU. An already initialised group is reused.
    """
    local_rank = _env_int("LOCAL_RANK", None)
    if local_rank is None:
        local_rank = int(getattr(opts, "local_rank", 0) or 0)
    world_size = _env_int("WORLD_SIZE", 1)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible "
                "(check CUDA_VISIBLE_DEVICES and --nproc_per_node)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    if world_size > 1 and not is_dist_initialized():
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: start the run with "
                "torchrun or python -m torch.distributed.launch")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", init_method="env://", timeout=_timeout(),
            **({"device_id": device} if use_cuda else {}))
    return device, get_rank(), get_world_size()


def get_rank():
    return dist.get_rank() if is_dist_initialized() else 0


def get_world_size():
    return dist.get_world_size() if is_dist_initialized() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    """Wait for every rank (no-op in a world of one)."""
    if not is_dist_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum of ``tensor`` over ranks, as a new tensor (the input is left unchanged).

    The tensor must live where the backend reduces: on this rank's GPU for NCCL, on the CPU for gloo.
    """
    result = tensor.detach().clone()
    if is_dist_initialized() and get_world_size() > 1:
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
    return result


def all_reduce_mean(tensor):
    """Mean of ``tensor`` over ranks, as a new floating tensor: ``sum over ranks / world_size``."""
    total = all_reduce_sum(tensor if tensor.is_floating_point() else tensor.double())
    return total / get_world_size()


def broadcast_object(obj, src=0):
    """``obj`` of rank ``src`` on every rank (any picklable object)."""
    if not is_dist_initialized() or get_world_size() == 1:
        return obj
    holder = [obj if get_rank() == src else None]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(holder, src=src, device=device)
    return holder[0]


def cleanup():
    """Leave the process group, if one was joined."""
    if is_dist_initialized():
        dist.destroy_process_group()


def unwrap(model):
    """The module inside a DistributedDataParallel (or DataParallel) wrapper; None stays None."""
    return getattr(model, "module", model) if model is not None else None

