"""Shared core of the class-incremental segmentation datasets (VOC and ADE differ only in layout).

A *step* of a task sees the classes ``labels`` (current) after ``labels_old`` (earlier steps); both
lists come from ``tasks.get_task_labels`` and never contain 0 once stripped. This module decides

1. **which images** a step uses (``select_images``, the originals' ``filter_images``), from the set
   ``C_i`` of class ids present in the mask of image ``i``:

   - overlap:  keep ``i`` iff ``C_i ∩ labels ≠ ∅``;
   - disjoint: keep ``i`` iff ``C_i ∩ labels ≠ ∅`` and ``C_i ⊆ labels ∪ labels_old ∪ {0, 255}``.

2. **which label** each pixel gets (``label_lut``, PLOP's dataset-level mapping): with
   ``order = [0] + labels_old + labels`` a kept class ``c`` becomes ``order.index(c)`` (its output
   channel), 255 stays 255, every other class becomes the masking value (0, or 255 for
   ``data_masking="new"`` and ``ignore_test_bg``).

The per-image class sets come from one scan of every mask of a split (``scan_class_presence``,
a process pool with a progress bar), which also compares each mask's size with its image's (read
from the image header), so a mismatch stops the run before training, naming the files. The scan
result and the selected indices are cached on disk next to the originals' index files
(``<path_base>/train-<step>.npy``) together with a JSON sidecar holding a fingerprint of the split
list and its files; a changed list, file, task table or overlap flag rebuilds them (the originals
silently reused stale files).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import multiprocessing
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision import tv_tensors

from utils.io import atomic_write, atomic_write_text

from .skips import SkipCounter, SkippedSample, UnreadableSampleError

logger = logging.getLogger(__name__)

VOID = 255
DATA_MASKING_MODES = ("current", "current+old", "all", "new")
INVALID = -1  # LUT entry of a value that is not a class id of the dataset

# Scans are shared by the datasets built over the same split list in one process (val and test).
_PRESENCE_MEMO: dict[str, np.ndarray] = {}


@dataclass(frozen=True)
class SampleFiles:
    """The samples of one split, in index order (index ``i`` of every cache file = ``images[i]``).

    ``source`` names what defined the list (split file or image folder) for error messages.
    """

    root: str
    split: str
    source: str
    images: tuple
    masks: tuple
    saliency: Optional[tuple] = None

    def __len__(self):
        return len(self.images)


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def require_files(paths: Sequence[str], what: str, source: str) -> None:
    """Raise ``FileNotFoundError`` listing the first missing files among ``paths``."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = "\n  ".join(missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(
            f"{len(missing)} {what} listed by {source} do not exist:\n  {shown}{more}"
        )


def _open_single_channel(path: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise UnreadableSampleError(f"cannot decode mask/saliency file {path}: {error}", path) from error
    if image.mode not in ("P", "L"):
        raise ValueError(
            f"{path}: expected a single-channel PNG (palette 'P' or grayscale 'L' mode holding "
            f"class ids), got mode {image.mode!r}"
        )
    return image


def read_mask(path: str) -> np.ndarray:
    """Class-id array ``(H, W) uint8`` of a palette or grayscale PNG (palette indices, not colours)."""
    return np.asarray(_open_single_channel(path), dtype=np.uint8)


def read_image(path: str) -> Image.Image:
    """RGB image; a file that cannot be decoded raises ``UnreadableSampleError`` naming it."""
    try:
        image = Image.open(path)
        return image.convert("RGB")
    except FileNotFoundError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise UnreadableSampleError(f"cannot decode image file {path}: {error}", path) from error


def check_class_ids(present: np.ndarray, n_classes: int, path: str) -> None:
    """Raise if a mask holds a value outside ``[0, n_classes) ∪ {255}``."""
    bad = np.flatnonzero(present[n_classes:VOID])
    if bad.size:
        raise ValueError(
            f"{path}: mask values {(bad + n_classes).tolist()} are not class ids; expected values "
            f"in [0, {n_classes - 1}] or {VOID} (void)"
        )


def class_presence(path: str, n_classes: int) -> np.ndarray:
    """Boolean vector of length 256: entry ``c`` is True iff value ``c`` occurs in the mask."""
    return _mask_presence(_open_single_channel(path), n_classes, path)


def _mask_presence(mask: Image.Image, n_classes: int, path: str) -> np.ndarray:
    # PIL's C histogram of the palette indices (faster than np.unique on the pixels)
    present = np.asarray(mask.histogram()[:256]) > 0
    check_class_ids(present, n_classes, path)
    return present


def image_size(path: str) -> Optional[tuple]:
    """``(width, height)`` from the image file's header (nothing decoded); None when the header
    cannot be read (the sample is then left out when it is loaded, see ``dataset.skips``)."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return None


def size_mismatch(mask_path: str, mask_size: tuple, image_path: str) -> Optional[str]:
    """The message naming both files when the mask's ``(width, height)`` is not the image's."""
    size = image_size(image_path)
    if size is None or tuple(size) == tuple(mask_size):
        return None
    return (f"{mask_path} is {mask_size[0]}x{mask_size[1]} but its image {image_path} is "
            f"{size[0]}x{size[1]}")


def _scan_worker(args):
    """Presence vector of one mask and, when its image is given, the size mismatch (or None)."""
    mask_path, image_path, n_classes = args
    mask = _open_single_channel(mask_path)
    mismatch = size_mismatch(mask_path, mask.size, image_path) if image_path else None
    return _mask_presence(mask, n_classes, mask_path), mismatch


def scan_class_presence(
    mask_paths: Sequence[str], n_classes: int, workers: int = 2, desc: str = "scanning masks",
    image_paths: Optional[Sequence[str]] = None, source: str = "the split list",
) -> np.ndarray:
    """Read every mask once; ``(N, 256) bool`` matrix of the values present in each.

    With ``image_paths`` (same order) each image's size is read from its header and compared with
    its mask's; after the scan one ``ValueError`` lists every pair that differs (``source`` names
    the list in the message).
    """
    from tqdm import tqdm

    if image_paths is not None and len(image_paths) != len(mask_paths):
        raise ValueError(f"{len(image_paths)} images for {len(mask_paths)} masks")
    presence = np.zeros((len(mask_paths), 256), dtype=bool)
    images = image_paths if image_paths is not None else [None] * len(mask_paths)
    jobs = [(m, i, n_classes) for m, i in zip(mask_paths, images)]
    mismatches = []
    progress = tqdm(total=len(jobs), desc=desc, unit="mask", leave=False, mininterval=1.0)
    if workers <= 1 or len(jobs) < 64:
        results = map(_scan_worker, jobs)
        pool = None
    else:
        # fork keeps worker start-up cheap; the workers only touch PIL and numpy.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        chunk = max(16, min(256, len(jobs) // (workers * 8)))
        pool = context.Pool(workers)
        results = pool.imap(_scan_worker, jobs, chunksize=chunk)
    try:
        for i, (row, mismatch) in enumerate(results):
            presence[i] = row
            if mismatch:
                mismatches.append(mismatch)
            progress.update()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        progress.close()
    if mismatches:
        _raise_size_mismatches(mismatches, source)
    return presence


def _raise_size_mismatches(mismatches: list, source: str, at_most: int = 10) -> None:
    more = [f"... and {len(mismatches) - at_most} more"] if len(mismatches) > at_most else []
    raise ValueError(
        f"{len(mismatches)} masks listed by {source} do not have their image's size:\n  "
        + "\n  ".join(mismatches[:at_most] + more)
        + "\na mask must have its image's size; fix these files or remove them from the list")


def split_fingerprint(files: SampleFiles) -> str:
    """SHA-1 over the split's files: root-relative path, size and modification time of each mask
    and image.

    Index ``i`` of a cache file is a line number of the split list, so the cache is valid only
    for the same list of the same files; regenerating or replacing a mask or an image changes
    size/mtime, and a new scan then checks the classes and the mask/image sizes again.
    """
    digest = hashlib.sha1()
    for mask, image in zip(files.masks, files.images):
        for path in (mask, image):
            stat = os.stat(path)
            rel = os.path.relpath(path, files.root)
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Atomic cache files
# --------------------------------------------------------------------------------------------


def _save_npy(path: str, array: np.ndarray) -> None:
    atomic_write(path, lambda stream: np.save(stream, array))


def _save_json(path: str, content: dict) -> None:
    atomic_write_text(path, json.dumps(content, indent=1))


def _load_json(path: str) -> Optional[dict]:
    try:
        with open(path) as stream:
            return json.load(stream)
    except (OSError, json.JSONDecodeError):
        return None


def sidecar_path(npy_path: str) -> str:
    """``train-0.npy`` -> ``train-0.json`` (the fingerprint kept beside an index file)."""
    stem = npy_path[:-4] if npy_path.endswith(".npy") else npy_path
    return stem + ".json"


def load_class_presence(
    files: SampleFiles, n_classes: int, cache_dir: Optional[str] = None, workers: int = 2
) -> np.ndarray:
    """Class presence of every image of ``files``: memo in this process, then disk, then a scan.

    On disk: ``<cache_dir>/classes-<split>.npy`` (bit-packed rows) + ``.json`` fingerprint.
    """
    fingerprint = split_fingerprint(files)
    memo_key = f"{fingerprint}:{n_classes}"
    if memo_key in _PRESENCE_MEMO:
        return _PRESENCE_MEMO[memo_key]

    npy = os.path.join(cache_dir, f"classes-{files.split}.npy") if cache_dir else None
    expected = {"fingerprint": fingerprint, "n_images": len(files), "n_classes": n_classes}
    presence = None
    if npy and os.path.isfile(npy) and _load_json(sidecar_path(npy)) == expected:
        packed = np.load(npy)
        if packed.shape == (len(files), 32):
            presence = np.unpackbits(packed, axis=1).astype(bool)
    if presence is None:
        presence = scan_class_presence(
            files.masks, n_classes, workers, desc=f"class scan of {len(files)} masks ({files.source})",
            image_paths=files.images, source=files.source,
        )
        if npy:
            _save_npy(npy, np.packbits(presence, axis=1))
            _save_json(sidecar_path(npy), expected)
    _PRESENCE_MEMO[memo_key] = presence
    return presence


# --------------------------------------------------------------------------------------------
# Selection and label mapping
# --------------------------------------------------------------------------------------------


def strip_background(labels: Optional[Sequence[int]]) -> list:
    """A copy without class 0 (the originals removed it in place from the caller's list)."""
    return [int(c) for c in (labels or []) if int(c) != 0]


def check_label_lists(labels: Sequence[int], labels_old: Sequence[int], n_classes: int) -> None:
    overlap = sorted(set(labels) & set(labels_old))
    if overlap:
        raise ValueError(f"labels and labels_old must be disjoint; both contain {overlap}")
    for name, values in (("labels", labels), ("labels_old", labels_old)):
        wrong = [c for c in values if not 0 < c < n_classes]
        if wrong:
            raise ValueError(f"{name} holds {wrong}, not class ids of a {n_classes}-class dataset")
        if len(set(values)) != len(values):
            raise ValueError(f"{name} lists a class twice: {list(values)}")


def select_images(
    presence: np.ndarray, labels: Sequence[int], labels_old: Sequence[int], overlap: bool
) -> np.ndarray:
    """Ascending indices of the images a step trains on (module docstring, rule 1).

    ``presence``: ``(N, 256) bool``; ``labels``/``labels_old`` without class 0.
    """
    labels = strip_background(labels)
    current = presence[:, labels].any(axis=1) if labels else np.zeros(len(presence), dtype=bool)
    if overlap:
        keep = current
    else:
        allowed = np.zeros(256, dtype=bool)
        allowed[[0, VOID] + labels + strip_background(labels_old)] = True
        keep = current & ~presence[:, ~allowed].any(axis=1)
    return np.flatnonzero(keep).astype(np.int64)


def label_lut(
    labels: Sequence[int],
    labels_old: Sequence[int] = (),
    n_classes: int = 21,
    data_masking: str = "current",
    masking: bool = True,
    ignore_test_bg: bool = False,
    labels_future: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """256-entry lookup table ``raw class id -> training label`` (``INVALID`` for non-class ids).

    ``order = [0] + labels_old + labels``; a kept class ``c`` maps to ``order.index(c)``:

    - ``current``: kept = {0} ∪ labels; old and future classes -> 0;
    - ``current+old``: kept = {0} ∪ labels_old ∪ labels; future classes -> 0;
    - ``new``: kept = {0} ∪ labels; old and future classes -> 255 (ignored);
    - ``all``: nothing masked: ``order`` is extended with ``labels_future`` (default: every other
      class in id order), so future classes keep labels ``>= len(order)`` — the label space of the
      whole task; the model then needs all of the task's channels;
    - ``masking=False``: kept = {0} ∪ labels_old ∪ labels (PLOP's unmasked reorder), future -> 0.

    ``ignore_test_bg`` (PLOP's ADE test option, here for both datasets): 0 and every masked
    class -> 255, so only seen foreground classes are scored. 255 always stays 255.
    """
    if data_masking not in DATA_MASKING_MODES:
        raise ValueError(f"data_masking={data_masking!r}; choose one of {DATA_MASKING_MODES}")
    labels, labels_old = strip_background(labels), strip_background(labels_old)
    check_label_lists(labels, labels_old, n_classes)
    order = [0] + labels_old + labels
    if not masking or data_masking == "current+old":
        kept = set(order)
    elif data_masking == "all":
        seen = set(order)
        future = strip_background(labels_future) if labels_future is not None else [
            c for c in range(1, n_classes) if c not in seen
        ]
        check_label_lists(future, order[1:], n_classes)
        order = order + future
        kept = set(order)
    else:  # current, new
        kept = {0, *labels}
    fill = VOID if (masking and data_masking == "new") or ignore_test_bg else 0

    lut = np.full(256, INVALID, dtype=np.int16)
    lut[:n_classes] = fill
    for position, c in enumerate(order):
        if c in kept:
            lut[c] = position
    if ignore_test_bg:
        lut[0] = VOID
    lut[VOID] = VOID
    return lut


def identity_lut(n_classes: int) -> np.ndarray:
    """Raw ids kept (dataset built without ``labels``), non-class ids flagged ``INVALID``."""
    lut = np.full(256, INVALID, dtype=np.int16)
    lut[:n_classes] = np.arange(n_classes)
    lut[VOID] = VOID
    return lut


def apply_lut(lut: np.ndarray, mask: np.ndarray, path: str, n_classes: int) -> np.ndarray:
    """``lut[mask]`` as uint8; a value the LUT flags ``INVALID`` raises naming the file."""
    mapped = lut[mask]
    if (mapped == INVALID).any():
        bad = np.unique(mask[mapped == INVALID]).tolist()
        raise ValueError(
            f"{path}: mask values {bad} are not class ids; expected values in "
            f"[0, {n_classes - 1}] or {VOID} (void)"
        )
    return mapped.astype(np.uint8)


def split_test_on_val(indices: np.ndarray, train: bool) -> np.ndarray:
    """``--test_on_val``: shuffle with ``RandomState(1)``; train keeps the first 80 %, else the rest."""
    shuffled = [int(i) for i in indices]
    np.random.RandomState(1).shuffle(shuffled)
    cut = int(0.8 * len(shuffled))
    return np.asarray(shuffled[:cut] if train else shuffled[cut:], dtype=np.int64)


def cached_indices(
    idxs_path: Optional[str],
    files: SampleFiles,
    n_classes: int,
    selection: dict,
    select: Callable[[np.ndarray], np.ndarray],
    workers: int = 2,
) -> np.ndarray:
    """Selected indices, from ``idxs_path`` when its sidecar matches, else computed and saved.

    ``selection`` (labels, labels_old, overlap) and the split fingerprint are stored in the
    sidecar; any difference rebuilds the file. An index file without sidecar (e.g. shipped with
    the originals, or MiB's hand-made ADE partitions) is used as it is, with a warning.
    """
    cache_dir = os.path.dirname(idxs_path) if idxs_path else None
    fingerprint = None
    if idxs_path and os.path.isfile(idxs_path):
        meta = _load_json(sidecar_path(idxs_path))
        if meta is None:
            indices = np.load(idxs_path).astype(np.int64).reshape(-1)
            if indices.size and (indices.min() < 0 or indices.max() >= len(files)):
                raise ValueError(
                    f"{idxs_path}: indices reach {int(indices.max())} but {files.source} lists "
                    f"{len(files)} images; delete the file to rebuild it"
                )
            logger.warning(
                "%s has no fingerprint file (%s); using it unchecked. Delete it to rebuild it from "
                "%s.", idxs_path, os.path.basename(sidecar_path(idxs_path)), files.source,
            )
            return indices
        fingerprint = split_fingerprint(files)
        expected = dict(selection, fingerprint=fingerprint, n_images=len(files))
        if meta == expected:
            return np.load(idxs_path).astype(np.int64).reshape(-1)
        logger.info("%s is stale (split list or selection changed); rebuilding", idxs_path)

    presence = load_class_presence(files, n_classes, cache_dir, workers)
    indices = select(presence)
    if idxs_path:
        _save_npy(idxs_path, indices)
        fingerprint = fingerprint or split_fingerprint(files)
        expected = dict(selection, fingerprint=fingerprint, n_images=len(files))
        _save_json(sidecar_path(idxs_path), expected)
    return indices


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


class RawLabelSample(NamedTuple):
    """A sample of a dataset made by :func:`with_raw_labels`: the step's mapped ``label`` and the
    mask's own class ids ``raw_label`` (same transform, so pixel ``(i, j)`` of both is the same
    source pixel). The DataLoader's collation keeps the field names (``batch.raw_label``)."""

    image: torch.Tensor
    label: torch.Tensor
    raw_label: torch.Tensor


def with_raw_labels(dataset):
    """A view of ``dataset`` whose samples are :class:`RawLabelSample` (image, mapped label, raw
    label), for the pass that computes pseudo-label thresholds on raw labels.

    ``dataset`` is an :class:`IncrementalSegmentationDataset` or a ``Subset`` of one (the
    ``--cross_val`` training set); the view shares its files, indices, transform and skip counter
    and leaves ``dataset`` unchanged. The saliency map, when the dataset has one, is left out.
    """
    if isinstance(dataset, Subset):
        return Subset(with_raw_labels(dataset.dataset), dataset.indices)
    if not isinstance(dataset, IncrementalSegmentationDataset):
        raise TypeError(f"with_raw_labels needs an IncrementalSegmentationDataset (or a Subset of "
                        f"one), got {type(dataset).__name__}")
    view = copy.copy(dataset)
    view.return_raw_label = True
    return view


def _to_plain(tensor) -> torch.Tensor:
    return tensor.as_subclass(torch.Tensor) if isinstance(tensor, torch.Tensor) else torch.as_tensor(tensor)


class IncrementalSegmentationDataset(Dataset):
    """The images of one step with labels mapped to the step's label space.

    Built by ``VOCSegmentationIncremental`` / ``AdeSegmentationIncremental`` from a
    ``SampleFiles`` list. With ``labels=None`` every image is used and raw class ids are kept.

    A sample is ``(image, label)`` or, with saliency files, ``(image, label, saliency)``:
    image ``FloatTensor (3, H, W)`` as the transform makes it (uint8 without transform), label
    ``LongTensor (H, W)``, saliency ``LongTensor (H, W)`` in {0, 1} (1 where the saliency map
    is > 0, as SSUL thresholds it). The LUT is applied before the spatial transforms: these only
    pick and move mask pixels (nearest-exact, no padding), so mapping first gives the same labels.
    With ``return_raw_label`` (see :func:`with_raw_labels`) a sample is a
    :class:`RawLabelSample` ``(image, label, raw_label)``, ``raw_label`` the mask's class ids.

    A sample whose image, mask or saliency file cannot be decoded is never replaced by another:
    ``dataset[i]`` logs it and returns a :class:`~dataset.skips.SkippedSample`, which a
    :class:`~dataset.skips.SkipAwareLoader` leaves out of the batch and records in ``skips``, this
    dataset's :class:`~dataset.skips.SkipCounter` (in the main process; see ``dataset.skips``).
    """

    def __init__(
        self,
        files: SampleFiles,
        n_classes: int,
        train: bool = True,
        transform=None,
        labels=None,
        labels_old=None,
        idxs_path: Optional[str] = None,
        masking: bool = True,
        overlap: bool = True,
        data_masking: str = "current",
        test_on_val: bool = False,
        ignore_test_bg: bool = False,
        labels_future=None,
        scan_workers: int = 2,
        return_raw_label: bool = False,
    ):
        self.files = files
        self.return_raw_label = bool(return_raw_label)
        self.n_classes = n_classes
        self.train = train
        self.transform = transform
        self.skips = SkipCounter("train" if train else "val")
        self.labels = strip_background(labels)
        self.labels_old = strip_background(labels_old)
        self.scan_workers = scan_workers
        self.cache_dir = os.path.dirname(idxs_path) if idxs_path else None

        if labels is None:
            self.order = list(range(n_classes))
            self.lut = identity_lut(n_classes)
            indices = np.arange(len(files), dtype=np.int64)
        else:
            self.lut = label_lut(
                self.labels, self.labels_old, n_classes, data_masking, masking, ignore_test_bg,
                labels_future,
            )
            self.order = [0] + self.labels_old + self.labels
            selection = {
                "labels": self.labels, "labels_old": self.labels_old, "overlap": bool(overlap),
            }
            indices = cached_indices(
                idxs_path, files, n_classes, selection,
                lambda presence: select_images(presence, self.labels, self.labels_old, overlap),
                scan_workers,
            )
        if test_on_val:
            indices = split_test_on_val(indices, train)
        self.indices = indices

    # ---- file access -------------------------------------------------------------------

    def __len__(self):
        return len(self.indices)

    def image_path(self, index: int) -> str:
        return self.files.images[self.indices[index]]

    def mask_path(self, index: int) -> str:
        return self.files.masks[self.indices[index]]

    def class_presence(self) -> np.ndarray:
        """``(len(self), 256) bool``: raw class ids present in each selected image's mask."""
        presence = load_class_presence(self.files, self.n_classes, self.cache_dir, self.scan_workers)
        return presence[self.indices]

    def load_raw(self, index: int):
        """Untransformed ``(image uint8 (3,H,W), mapped label uint8 (H,W)[, saliency])`` tensors,
        plus the unmapped mask (uint8 (H,W)) last when ``return_raw_label`` is set."""
        file_index = int(self.indices[index])
        image_file, mask_file = self.files.images[file_index], self.files.masks[file_index]
        image = read_image(image_file)
        mask = read_mask(mask_file)
        label = apply_lut(self.lut, mask, mask_file, self.n_classes)
        if label.shape != (image.height, image.width):
            raise ValueError(
                f"{mask_file} is {label.shape[1]}x{label.shape[0]} but its image {image_file} is "
                f"{image.width}x{image.height}; a mask must have the image's size"
            )
        sample = [
            tv_tensors.Image(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)),
            tv_tensors.Mask(torch.from_numpy(label)),
        ]
        if self.files.saliency is not None and not self.return_raw_label:
            sample.append(tv_tensors.Mask(self._read_saliency(file_index, label.shape)))
        if self.return_raw_label:
            sample.append(tv_tensors.Mask(torch.from_numpy(mask.copy())))
        return tuple(sample)

    def _read_saliency(self, file_index: int, shape) -> torch.Tensor:
        path = self.files.saliency[file_index]
        if path is None:  # dataset without saliency maps (SSUL's ADE): every pixel salient
            return torch.ones(shape, dtype=torch.uint8)
        saliency = read_mask(path)
        if saliency.shape != shape:
            raise ValueError(f"{path} is {saliency.shape[::-1]} but its mask is {shape[::-1]}")
        return torch.from_numpy((saliency > 0).astype(np.uint8))

    def _transformed(self, index: int):
        sample = self.load_raw(index)
        if self.transform is not None:
            sample = self.transform(*sample)
        image = _to_plain(sample[0])
        masks = tuple(_to_plain(t).long() for t in sample[1:])
        if self.return_raw_label:
            return RawLabelSample(image, *masks)
        return (image,) + masks

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            if -len(self) <= index < 0:
                index += len(self)
            else:
                raise IndexError(f"index {index} out of range for {len(self)} samples")
        try:
            return self._transformed(index)
        except UnreadableSampleError as error:
            path = error.path or self.image_path(index)
            logger.warning("sample %d left out: %s", index, error)
            return SkippedSample(index, path, str(error))
