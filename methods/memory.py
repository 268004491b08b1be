"""The class-balanced exemplar memory (SSUL-M; any method with ``--mem_size``, the ``-M`` methods).

Chosen once per step with the previous model among the previous step's training images, saved
beside the checkpoint (reused on resume) and mixed into every training batch.
"""
from __future__ import annotations

import os
from copy import deepcopy

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

import methods
import tasks
from methods import register_component
from methods.base import Component
from utils import distributed as dist_utils
from utils.checkpoint import checkpoint_path


class ExemplarMemory(Component):
    name = "memory"

    def add_options(self, parser):
        g = parser.add_argument_group("Exemplar memory")
        g.add_argument("--mem_size", type=int, default=0,
                       help="images kept from previous steps in a class-balanced exemplar memory; 0 = none. "
                            "The -M methods set 100 (VOC) / 300 (ADE)")

    def check(self, opts):
        if opts.mem_size < 0:
            raise ValueError(f"--mem_size must be >= 0, got {opts.mem_size}")


register_component(ExemplarMemory())


def memory_path(opts, step: int) -> str:
    return checkpoint_path(opts, step)[: -len(".pth")] + "_memory.json"


def build_memory_loader(opts, step, model_old, train_dst, device, rank, world, logger):
    """The memory's loader for step ``step`` (None without a memory or at step 0)."""
    if not opts.mem_size or step == 0:
        return None
    from dataset import memory as mem

    path = memory_path(opts, step)
    if os.path.isfile(path):
        entries = mem.load_memory(path)
        logger.info(f"Exemplar memory of step {step} read from {path}")
    else:
        entries = choose_memory(opts, step, model_old, device, logger)
        if rank == 0:
            mem.save_memory(path, entries, meta={"task": opts.task, "dataset": opts.dataset, "step": step,
                                                 "mem_size": opts.mem_size, "seed": opts.random_seed})
    dist_utils.barrier()
    counts = {}
    for entry in entries:
        for c in entry.classes:
            counts[c] = counts.get(c, 0) + 1
    logger.info(f"Exemplar memory: {len(entries)} images; images per class {dict(sorted(counts.items()))}")
    memory_dst = mem.MemoryDataset(memory_base_dataset(opts, step, entries), min_len=opts.batch_size)
    from dataset import SkipAwareLoader

    return SkipAwareLoader(memory_dst, batch_size=opts.batch_size,
                           sampler=DistributedSampler(memory_dst, num_replicas=world, rank=rank, seed=opts.random_seed),
                           num_workers=opts.num_workers, drop_last=True, max_skipped=opts.max_skipped_samples)


def choose_memory(opts, step, model_old, device, logger):
    """SSUL's selection: candidates are step-1's training images (centre crops); their classes come
    from the ground truth at step 1 and from the old model's pseudo-labels later."""
    import dataset as datasets
    from dataset import memory as mem

    prev_opts = deepcopy(opts)
    prev_opts.step = step - 1
    candidates = _unwrap_subset(datasets.get_dataset(prev_opts)[0])
    candidates.transform = datasets.transform.val_transform(opts.crop_size, True)
    previous = None
    if step > 1 and os.path.isfile(memory_path(opts, step - 1)):
        previous = mem.load_memory(memory_path(opts, step - 1))
    nb_old = sum(tasks.get_per_task_classes(opts.dataset, opts.task, step - 1))
    logger.info(f"Choosing {opts.mem_size} exemplars among {len(candidates)} images of step {step - 1}")
    return mem.build_memory(model_old, candidates, step, opts.mem_size, opts.random_seed, device, nb_old,
                            previous_memory=previous, pseudo_fn=methods.memory_pseudo_labels(opts),
                            batch_size=opts.batch_size)


def memory_base_dataset(opts, step, entries):
    """The memory images with this step's training treatment, old classes' ground truth kept."""
    import dataset as datasets

    mem_opts = deepcopy(opts)
    mem_opts.step = step
    mem_opts.data_masking = "current+old"
    mem_opts.cross_val = False
    base = datasets.get_dataset(mem_opts)[0]
    position = {path: i for i, path in enumerate(base.files.images)}
    missing = [e.name for e in entries if e.name not in position]
    if missing:
        raise FileNotFoundError(f"exemplar memory lists images that are not in the training split: {missing[:3]}")
    base.indices = np.array([position[e.name] for e in entries], dtype=np.int64)
    return base


def _unwrap_subset(dst):
    return dst.dataset if isinstance(dst, torch.utils.data.Subset) else dst
