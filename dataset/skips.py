"""Unreadable samples: left out, counted, reported; never replaced by another sample.

A file that exists but cannot be decoded (a truncated JPEG, a damaged PNG) must not stop a run of
several hours, and must not be hidden either: a stand-in image would train on, or score, a sample
twice without anyone knowing. The mechanism, which works with DataLoader worker processes:

1. ``dataset[i]`` returns a :class:`SkippedSample` (index, path, reason) instead of the sample;
2. :func:`skip_collate` (the loader's ``collate_fn``) collates the other samples of the batch
   and returns a :class:`CollatedBatch` holding them and the markers: the markers travel to the
   main process with the batch they were drawn for;
3. :class:`SkipAwareLoader` (a ``DataLoader`` using that collate) records the markers in the
   dataset's :class:`SkipCounter` and yields the collated samples exactly as a plain loader
   would (a batch whose samples were all unreadable is not yielded). Validation and test metrics
   therefore leave the sample out; a training batch is one image shorter.

The counter keeps each unreadable path once (with how often it was met: a training file is met
every epoch), raises :class:`TooManySkippedSamples` when more distinct files than its ``limit``
could not be read, merges over ranks (:meth:`SkipCounter.gathered`) and reports to a logger
(:func:`report_skips`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import torch
from torch.utils.data import DataLoader
from torch.utils.data import default_collate

logger = logging.getLogger(__name__)

__all__ = [
    "UnreadableSampleError",
    "TooManySkippedSamples",
    "SkippedSample",
    "CollatedBatch",
    "skip_collate",
    "SkipCounter",
    "SkipAwareLoader",
    "skip_counter_of",
    "report_skips",
]


class UnreadableSampleError(OSError):
    """An image, mask or saliency file that exists but cannot be decoded; ``path`` names it."""

    def __init__(self, message: str, path: Optional[str] = None):
        super().__init__(message)
        self.path = path


class TooManySkippedSamples(ValueError):
    """More distinct files of one dataset could not be read than ``--max_skipped_samples``."""


@dataclass(frozen=True)
class SkippedSample:
    """What ``dataset[index]`` returns for a sample whose file cannot be decoded.

    Using it as a sample (indexing or unpacking it) raises :class:`UnreadableSampleError` naming
    the file, so code that reads the dataset directly fails with that message.
    """

    index: int
    path: str
    reason: str

    def _refuse(self):
        raise UnreadableSampleError(f"sample {self.index} cannot be read: {self.reason}", self.path)

    def __getitem__(self, item):
        self._refuse()

    def __iter__(self):
        self._refuse()


class CollatedBatch:
    """:func:`skip_collate`'s result: ``data`` (the collated readable samples, None when there
    were none), ``skipped`` (the markers) and ``kept`` (the batch positions of the samples in
    ``data``). Pinned by the loader through :meth:`pin_memory`, which keeps the markers."""

    def __init__(self, data, skipped: tuple = (), kept: tuple = ()):
        self.data = data
        self.skipped = tuple(skipped)
        self.kept = tuple(kept)

    def pin_memory(self):
        return CollatedBatch(_pin(self.data), self.skipped, self.kept)


def _pin(data):
    if isinstance(data, torch.Tensor):
        return data.pin_memory()
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # named tuple, e.g. RawLabelSample
        return type(data)(*(_pin(item) for item in data))
    if isinstance(data, (tuple, list)):
        return type(data)(_pin(item) for item in data)
    if isinstance(data, dict):
        return {key: _pin(value) for key, value in data.items()}
    return data


def skip_collate(samples) -> CollatedBatch:
    """``default_collate`` of the samples that are not :class:`SkippedSample`, plus the markers."""
    kept = tuple(position for position, sample in enumerate(samples)
                 if not isinstance(sample, SkippedSample))
    skipped = tuple(sample for sample in samples if isinstance(sample, SkippedSample))
    data = default_collate([samples[position] for position in kept]) if kept else None
    return CollatedBatch(data, skipped, kept)


class SkipCounter:
    """The unreadable files of one dataset, seen from the main process.

    ``name`` says which dataset (e.g. ``"val"``) in messages. ``limit``: the most distinct
    unreadable files tolerated; one more raises :class:`TooManySkippedSamples` from
    :meth:`record` (None: no limit).
    """

    def __init__(self, name: str = "dataset", limit: Optional[int] = None):
        self.name = name
        self.limit = limit
        self._files: dict[str, dict] = {}

    # ---- counting ----------------------------------------------------------------------
    def record(self, skipped: Iterable[SkippedSample]) -> None:
        for sample in skipped:
            entry = self._files.setdefault(sample.path, {"reason": sample.reason, "times": 0})
            entry["times"] += 1
        self.check()

    @property
    def count(self) -> int:
        """Distinct files that could not be read."""
        return len(self._files)

    @property
    def occurrences(self) -> int:
        """How many times a sample was left out (a training file counts once per epoch)."""
        return sum(entry["times"] for entry in self._files.values())

    @property
    def paths(self) -> list:
        return sorted(self._files)

    def check(self, limit: Optional[int] = None) -> None:
        """Raise :class:`TooManySkippedSamples` when more than ``limit`` (default
        ``self.limit``) distinct files could not be read; the message lists them."""
        limit = self.limit if limit is None else limit
        if limit is None or self.count <= limit:
            return
        raise TooManySkippedSamples(
            f"{self.count} samples of the {self.name} set could not be read, more than "
            f"--max_skipped_samples {limit} allows:\n  {self._listing()}\n"
            f"Replace or remove these files (or drop them from the split list), or raise "
            f"--max_skipped_samples.")

    def _listing(self, at_most: int = 10) -> str:
        lines = [f"{path} ({entry['reason']})" for path, entry in sorted(self._files.items())]
        more = [f"... and {len(lines) - at_most} more"] if len(lines) > at_most else []
        return "\n  ".join(lines[:at_most] + more)

    # ---- reporting ---------------------------------------------------------------------
    def summary(self) -> str:
        """One line for logs and the printed summary."""
        if not self._files:
            return f"{self.name}: every sample could be read"
        noun = "image" if self.count == 1 else "images"
        times = f" ({self.occurrences} times)" if self.occurrences != self.count else ""
        return (f"{self.name}: {self.count} {noun} skipped{times}: "
                + "; ".join(f"{path} ({entry['reason']})" for path, entry in sorted(self._files.items())))

    def as_dict(self) -> dict:
        """JSON-ready: ``{"count", "occurrences", "files": [{"path", "reason", "times"}, ...]}``."""
        return {"count": self.count, "occurrences": self.occurrences,
                "files": [{"path": path, **entry} for path, entry in sorted(self._files.items())]}

    def gathered(self) -> "SkipCounter":
        """A counter holding the files of every rank (this one when not distributed).

        Collective: every rank must call it at the same point.
        """
        import torch.distributed as dist

        merged = SkipCounter(self.name, self.limit)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self._files)
        else:
            parts = [self._files]
        for files in parts:
            for path, entry in files.items():
                target = merged._files.setdefault(path, {"reason": entry["reason"], "times": 0})
                target["times"] += entry["times"]
        return merged


def skip_counter_of(dataset) -> Optional[SkipCounter]:
    """The :class:`SkipCounter` of ``dataset`` (its ``skips`` attribute), looking through the
    wrappers this project uses (``Subset.dataset``, ``MemoryDataset.base``); None if it has none."""
    seen = set()
    while dataset is not None and id(dataset) not in seen:
        seen.add(id(dataset))
        counter = getattr(dataset, "skips", None)
        if isinstance(counter, SkipCounter):
            return counter
        inner = getattr(dataset, "dataset", None)
        dataset = inner if inner is not None else getattr(dataset, "base", None)
    return None


class SkipAwareLoader(DataLoader):
    """A ``DataLoader`` that leaves unreadable samples out (module docstring).

    Iterating yields what a plain ``DataLoader`` yields for the readable samples; the markers are
    recorded in ``self.skips``: the dataset's counter (:func:`skip_counter_of`), else a new one,
    or the ``skips`` given. ``max_skipped`` sets that counter's ``limit``. ``collate_fn`` cannot
    be given (the loader's collate is :func:`skip_collate`).
    """

    def __init__(self, dataset, *args, skips: Optional[SkipCounter] = None,
                 max_skipped: Optional[int] = None, **kwargs):
        if kwargs.get("collate_fn") is not None:
            raise ValueError("SkipAwareLoader collates with skip_collate; collate_fn cannot be given")
        kwargs["collate_fn"] = skip_collate
        super().__init__(dataset, *args, **kwargs)
        counter = skips if skips is not None else skip_counter_of(dataset)
        if counter is None:
            counter = SkipCounter(type(dataset).__name__)
        if max_skipped is not None:
            counter.limit = max_skipped
        self.skips = counter

    def __iter__(self):
        for batch in super().__iter__():
            if batch.skipped:
                self.skips.record(batch.skipped)
            if batch.data is not None:
                yield batch.data


def report_skips(counters: Mapping[str, SkipCounter], log=None, step: Optional[int] = None) -> dict:
    """Log every counter and return ``{split: counter.as_dict()}`` for the results JSON.

    ``log``: an object with ``info``/``warning`` and optionally ``add_scalar`` (the project's
    ``Logger``: log.txt and TensorBoard, tag ``Skipped/<split>``); the module logger otherwise.
    Counters should already be :meth:`SkipCounter.gathered` in a distributed run.
    """
    log = log if log is not None else logger
    report = {}
    for split, counter in counters.items():
        report[split] = counter.as_dict()
        if counter.count:
            log.warning(counter.summary())
        else:
            log.info(counter.summary())
        if hasattr(log, "add_scalar"):
            log.add_scalar(f"Skipped/{split}", counter.count, step)
    return report
