"""Class-balanced exemplar memory (SSUL-M, Cha et al., NeurIPS 2021), usable with every method
through ``--mem_size N``.

At the start of step t >= 1 a memory of ``mem_size`` training images of past steps is chosen:

1. Candidates: the training images of step t - 1, each described by the set of old classes it
   shows. At t = 1 that is its ground truth; at t > 1 its ground truth after pseudo-labelling by
   the previous model (threshold 0.7), and the memory chosen at step t - 1 joins the pool
   (listed first, with the classes recorded then).
2. Selection (:func:`select_exemplars`): SSUL's round-robin over a random class order.
3. The chosen files are trained on with the same label mapping and transforms as the current
   training samples, labels covering all classes seen so far (old ground truth kept). SSUL's
   released code skipped its +1 shift / unknown marking for memory samples; that is not copied.

The list of chosen files is saved as JSON (:func:`save_memory`), so the next step can extend it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dataset.skips import SkipCounter, skip_collate, skip_counter_of
from utils.io import atomic_write_text
from utils.reduce import channel_max
from utils.ssul import ssul_pseudo_label

__all__ = [
    "MemoryEntry",
    "select_exemplars",
    "classes_in_label",
    "softmax_memory_pseudo_labels",
    "ssul_memory_pseudo_labels",
    "collect_candidates",
    "build_memory",
    "MemoryDataset",
    "memory_file_list",
    "save_memory",
    "load_memory",
]

# SSUL's confidence threshold for pseudo-labelling memory candidates.
MEMORY_PSEUDO_THRESHOLD = 0.7
_MEMORY_FORMAT = 1


@dataclass(frozen=True)
class MemoryEntry:
    """One memory candidate: its file name and the old classes (>= 1) it shows."""

    name: str
    classes: tuple[int, ...]


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------

def select_exemplars(candidate_classes: Sequence[Sequence[int]], old_classes: Sequence[int],
                     mem_size: int, seed: int) -> list[int]:
    """SSUL's class-balanced round-robin selection; returns candidate indices.

    With ``rng = numpy.random.RandomState(seed)``: shuffle the candidate order, then shuffle
    ``old_classes`` (in that order of draws). Repeat passes over the shuffled classes; for each
    class take the first remaining candidate (in shuffled order) whose class set contains it and
    remove it from the pool; stop as soon as ``mem_size`` candidates are taken, or after a pass
    that took nothing (the pool has no candidate left for any class; SSUL looped forever there).

    The result is grouped by class in the order of ``old_classes`` as given, in pick order within
    a class: SSUL stores its memory in that order, which fixes the next step's candidate pool.
    Pass ``old_classes`` ascending (1 .. C_o - 1) to reproduce SSUL.
    """
    if mem_size < 0:
        raise ValueError(f"mem_size must be >= 0, got {mem_size}")
    old_classes = [int(c) for c in old_classes]
    if len(set(old_classes)) != len(old_classes):
        raise ValueError(f"old_classes has duplicates: {old_classes}")
    if mem_size == 0 or not old_classes:
        return []
    class_sets = [frozenset(int(c) for c in classes) for classes in candidate_classes]

    rng = np.random.RandomState(seed)
    pool = list(range(len(class_sets)))
    rng.shuffle(pool)
    class_order = list(old_classes)
    rng.shuffle(class_order)

    picked: dict[int, list[int]] = {c: [] for c in old_classes}
    taken = 0
    while taken < mem_size:
        taken_this_pass = 0
        for cls in class_order:
            position = next((p for p, index in enumerate(pool) if cls in class_sets[index]), None)
            if position is not None:
                picked[cls].append(pool.pop(position))
                taken += 1
                taken_this_pass += 1
            if taken >= mem_size:
                break
        if taken_this_pass == 0:
            break
    return [index for cls in old_classes for index in picked[cls]]


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------

def classes_in_label(label: torch.Tensor, ignore_index: int = 255) -> tuple[int, ...]:
    """Sorted classes of a label map, background (0) and ``ignore_index`` excluded."""
    values = torch.unique(label).tolist()
    return tuple(int(v) for v in values if v != 0 and v != ignore_index)


def softmax_memory_pseudo_labels(labels: torch.Tensor, logits_old: torch.Tensor,
                                 threshold: float = MEMORY_PSEUDO_THRESHOLD) -> torch.Tensor:
    """SSUL's memory pseudo-labels for a softmax model (its ``ce_loss`` branch), label space in
    and out: ``p = softmax(z_old)``; background pixels (0) where ``argmax p > 0`` and
    ``max p >= threshold`` get ``argmax p``."""
    scores, predicted = channel_max(torch.softmax(logits_old.float(), dim=1))
    relabel = (labels == 0) & (predicted > 0) & (scores >= threshold)
    return torch.where(relabel, predicted, labels)


def ssul_memory_pseudo_labels(labels: torch.Tensor, logits_old: torch.Tensor,
                              threshold: float = MEMORY_PSEUDO_THRESHOLD) -> torch.Tensor:
    """The same for an SSUL model (sigmoid, channels [unknown, background, classes...]), label
    space in and out: background pixels where the best sigmoid score is an old class (channel
    ``k + 1``) with score ``>= threshold`` get class ``k``."""
    shifted = torch.where(labels == 255, labels, labels + 1)
    relabelled = ssul_pseudo_label(shifted, logits_old, threshold)
    return torch.where(relabelled == 255, relabelled, relabelled - 1)


PseudoFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def collect_candidates(candidate_dataset: Dataset, names: Sequence[str], old_model=None,
                       pseudo_fn: Optional[PseudoFn] = None, device: torch.device | str = "cpu",
                       batch_size: int = 1, num_workers: int = 0) -> list[MemoryEntry]:
    """One :class:`MemoryEntry` per readable sample of ``candidate_dataset`` (in dataset order).

    Samples are ``(image, label, ...)`` with labels in the step's label space. Without
    ``old_model`` the classes come from the label; with it, from
    ``pseudo_fn(label, logits_old)`` where ``logits_old, _ = old_model(images)``.
    ``batch_size > 1`` needs images of one size (e.g. SSUL's resize + centre crop). A sample
    that cannot be read (see ``dataset.skips``) is no candidate; it is recorded in the dataset's
    skip counter.
    """
    if len(names) != len(candidate_dataset):
        raise ValueError(f"{len(names)} names for {len(candidate_dataset)} candidate samples")
    if old_model is not None and pseudo_fn is None:
        raise ValueError("collect_candidates with an old model needs pseudo_fn")
    device = torch.device(device)
    if old_model is not None:
        was_training = old_model.training
        old_model.eval()
    # skip_collate keeps each readable sample's batch position, so names stay aligned
    loader = DataLoader(candidate_dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=skip_collate)
    skips = skip_counter_of(candidate_dataset) or SkipCounter("memory candidates")
    entries: list[MemoryEntry] = []
    start = 0
    try:
        for collated in loader:
            skips.record(collated.skipped)
            batch, first = collated.data, start
            start += len(collated.kept) + len(collated.skipped)
            if batch is None:
                continue
            labels = batch[1].to(device, dtype=torch.long)
            if old_model is not None:
                logits_old, _ = old_model(batch[0].to(device, dtype=torch.float32))
                labels = pseudo_fn(labels, logits_old)
            for position, label in zip(collated.kept, labels):
                entries.append(MemoryEntry(names[first + position], classes_in_label(label)))
    finally:
        if old_model is not None:
            old_model.train(was_training)
    return entries


def build_memory(old_model, candidate_dataset: Dataset, step: int, mem_size: int, seed: int,
                 device: torch.device | str, nb_old_classes: int,
                 previous_memory: Optional[Sequence[MemoryEntry]] = None,
                 pseudo_fn: Optional[PseudoFn] = None, names: Optional[Sequence[str]] = None,
                 batch_size: int = 1, num_workers: int = 0) -> list[MemoryEntry]:
    """Choose the memory of step ``step`` >= 1 (SSUL's ``memory_sampling_balanced``).

    ``candidate_dataset``: the training images of step ``step - 1`` (labels in that step's
    space; SSUL uses a resize + centre-crop transform); ``names`` its file names (default: its
    ``file_names`` attribute, else ``image_path(i)`` for every index). ``nb_old_classes`` =
    ``C_o`` (old classes incl. background): the balanced classes are ``1 .. C_o - 1``. At step 1 class sets come from the ground truth and
    ``old_model`` is not used; at step > 1 from ``pseudo_fn(labels, old_model logits)``
    (default :func:`softmax_memory_pseudo_labels`; pass :func:`ssul_memory_pseudo_labels` for
    SSUL models), and ``previous_memory`` (the entries chosen at step - 1) is prepended to the
    pool. Returns the chosen entries in SSUL's stored order (see :func:`select_exemplars`).
    """
    if step < 1:
        raise ValueError(f"the memory is built at steps >= 1, got step {step}")
    if nb_old_classes < 2:
        raise ValueError(f"nb_old_classes must count background and at least one class, got {nb_old_classes}")
    if names is None:
        names = _dataset_names(candidate_dataset)
    if step > 1 and old_model is None:
        raise ValueError(f"build_memory at step {step} needs the previous model to pseudo-label candidates")
    use_model = old_model if step > 1 else None
    candidates = collect_candidates(
        candidate_dataset, names, use_model, (pseudo_fn or softmax_memory_pseudo_labels) if use_model else None,
        device=device, batch_size=batch_size, num_workers=num_workers,
    )
    pool = (list(previous_memory) if step > 1 and previous_memory else []) + candidates
    chosen = select_exemplars([entry.classes for entry in pool], range(1, nb_old_classes), mem_size, seed)
    return [pool[index] for index in chosen]


def _dataset_names(dataset: Dataset) -> list[str]:
    """The candidates' identifiers: ``dataset.file_names``, else ``dataset.image_path(i)``."""
    names = getattr(dataset, "file_names", None)
    if names is not None:
        return list(names)
    if callable(getattr(dataset, "image_path", None)):
        return [str(dataset.image_path(i)) for i in range(len(dataset))]
    raise ValueError("build_memory needs the candidates' file names: pass names=, or give the dataset "
                     "a file_names attribute or an image_path(index) method")


# --------------------------------------------------------------------------------------------
# Dataset and files
# --------------------------------------------------------------------------------------------

class MemoryDataset(Dataset):
    """The memory samples of ``base`` (indices ``indices``, default all), repeated as SSUL does:
    the list is doubled until it holds at least ``min_len`` items (the batch size, so that a
    ``drop_last`` loader yields batches).

    ``base`` must already give memory samples the current training treatment: train transforms,
    labels mapped to all classes seen so far.
    """

    def __init__(self, base: Dataset, indices: Optional[Sequence[int]] = None, min_len: int = 1):
        items = list(range(len(base))) if indices is None else [int(i) for i in indices]
        if not items:
            raise ValueError("the exemplar memory is empty")
        out_of_range = [i for i in items if not 0 <= i < len(base)]
        if out_of_range:
            raise ValueError(f"memory indices {out_of_range[:5]} outside the base dataset of length {len(base)}")
        while len(items) < min_len:
            items = items * 2
        self.base = base
        self.indices = items

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.base[self.indices[index]]


def memory_file_list(entries: Sequence[MemoryEntry]) -> list[str]:
    """File names of the memory, sorted (SSUL's ``memory_list``)."""
    return sorted(entry.name for entry in entries)


def save_memory(path: str | os.PathLike, entries: Sequence[MemoryEntry], meta: Optional[dict] = None) -> Path:
    """Write the memory as JSON atomically: entries (name, classes) in stored order, the sorted
    file list and optional ``meta`` (step, task, seed, ...)."""
    path = Path(path)
    payload = {
        "format": _MEMORY_FORMAT,
        "meta": dict(meta or {}),
        "entries": [{"name": entry.name, "classes": list(entry.classes)} for entry in entries],
        "files": memory_file_list(entries),
    }
    atomic_write_text(path, json.dumps(payload, indent=1))
    return path


def load_memory(path: str | os.PathLike) -> list[MemoryEntry]:
    """Read a file written by :func:`save_memory`; entries in stored order."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"memory file {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"memory file {path} is not valid JSON: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != _MEMORY_FORMAT or "entries" not in payload:
        raise ValueError(f"memory file {path} is not a memory file of format {_MEMORY_FORMAT}")
    entries = []
    for position, item in enumerate(payload["entries"]):
        try:
            entries.append(MemoryEntry(str(item["name"]), tuple(int(c) for c in item["classes"])))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"memory file {path}: entry {position} is malformed: {item!r}") from None
    return entries
