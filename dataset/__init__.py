"""Datasets of the class-incremental protocols: VOC and ADE20K (real or generated), transforms.

``get_dataset(opts)`` builds the three datasets of step ``opts.step`` as the originals' run.py:

- train: train split, images selected for the current classes (``overlap`` decides whether
  future classes may appear), labels masked with ``opts.data_masking``;
- val: val split, current classes, always overlapped selection, same masking as train; with
  ``opts.cross_val`` a random 80/20 split of the train images instead (its 20 % get the val
  transform; the originals kept the train augmentation there);
- test: val split (train split with ``val_on_trainset``), every seen class, only never-seen
  classes -> 0 (-> 255 with ``ignore_test_bg``).

Index files go to ``data/<dataset>/<task>[-ov]/`` relative to the working directory, as in the
originals, or under ``opts.idxs_dir`` in its place when that option is set.
"""

import os

import torch
from torch.utils.data import Subset

from . import transform
from .ade import AdeSegmentationIncremental
from .incremental import RawLabelSample, with_raw_labels
from .skips import SkipAwareLoader, SkipCounter, TooManySkippedSamples, report_skips, skip_counter_of
from .voc import VOCSegmentationIncremental

__all__ = [
    "VOCSegmentationIncremental",
    "AdeSegmentationIncremental",
    "transform",
    "get_dataset",
    "dataset_class",
    "index_folder",
    "with_raw_labels",
    "RawLabelSample",
    "SkipAwareLoader",
    "SkipCounter",
    "TooManySkippedSamples",
    "report_skips",
    "skip_counter_of",
]

_DATASETS = {"voc": VOCSegmentationIncremental, "ade": AdeSegmentationIncremental}


def dataset_class(name: str):
    """``VOCSegmentationIncremental`` for ``"voc"``, ``AdeSegmentationIncremental`` for ``"ade"``."""
    try:
        return _DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(_DATASETS)}") from None


def index_folder(opts, path_base: str) -> str:
    """``path_base`` (``data/<dataset>/<task>``) + ``-ov`` with overlap, under ``opts.idxs_dir``
    instead of ``data/`` when that option is set. Not created here: the cache writers create it once
    the scan has read the data, so a run refused for bad data leaves no folder behind."""
    idxs_dir = getattr(opts, "idxs_dir", None)
    if idxs_dir:
        path_base = os.path.join(idxs_dir, os.path.relpath(path_base, "data"))
    if opts.overlap:
        path_base += "-ov"
    return path_base


def _wants_saliency(opts) -> bool:
    return getattr(opts, "method", None) == "SSUL" or bool(getattr(opts, "saliency", False))


def _cross_val_split(train_dst, val_dst, seed: int):
    """80/20 split of the same images: training part from ``train_dst``, rest from ``val_dst``."""
    n_train = int(0.8 * len(train_dst))
    order = torch.randperm(len(train_dst), generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(train_dst, order[:n_train]), Subset(val_dst, order[n_train:])


def get_dataset(opts):
    """``(train_dst, val_dst, test_dst, n_classes_seen)`` for step ``opts.step`` (module docstring).

    ``n_classes_seen = len(labels_old + labels)``, background included.
    """
    import tasks

    step = int(opts.step)
    labels, labels_old, path_base = tasks.get_task_labels(opts.dataset, opts.task, step)
    labels_cum = labels_old + labels
    labels_future = [c for c in tasks.get_order(opts.dataset, opts.task) if c not in labels_cum]
    folder = index_folder(opts, path_base)
    build = dataset_class(opts.dataset)
    masking = not getattr(opts, "no_mask", False)
    train_tf = transform.train_transform(opts.crop_size)
    val_tf = transform.val_transform(opts.crop_size, opts.crop_val)

    # what the train and val sets of this step share: the classes and how labels are mapped
    step_data = dict(root=opts.data_root, labels=list(labels), labels_old=list(labels_old),
                     masking=masking, data_masking=opts.data_masking, labels_future=labels_future)
    train_idxs = os.path.join(folder, f"train-{step}.npy")
    train_dst = build(train=True, transform=train_tf, idxs_path=train_idxs, overlap=opts.overlap,
                      test_on_val=opts.test_on_val, saliency=_wants_saliency(opts), **step_data)
    if opts.cross_val:
        train_view = build(train=True, transform=val_tf, idxs_path=train_idxs, overlap=opts.overlap,
                           test_on_val=opts.test_on_val, **step_data)
        train_dst, val_dst = _cross_val_split(train_dst, train_view, opts.random_seed)
    else:
        val_dst = build(train=False, transform=val_tf, idxs_path=os.path.join(folder, f"val-{step}.npy"),
                        overlap=True, **step_data)

    image_set = "train" if opts.val_on_trainset else "val"
    test_dst = build(
        root=opts.data_root,
        train=opts.val_on_trainset,
        transform=val_tf,
        labels=list(labels_cum),
        idxs_path=os.path.join(folder, f"test_on_{image_set}-{step}.npy"),
        test_on_val=opts.test_on_val,
        ignore_test_bg=opts.ignore_test_bg,
    )
    for split, dst in (("train", train_dst), ("val", val_dst), ("test", test_dst)):
        skip_counter_of(dst).name = split  # how skipped samples are named in reports
    return train_dst, val_dst, test_dst, len(labels_cum)
