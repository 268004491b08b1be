"""Analysis figures: t-SNE of class features, per-step mIoU curves, prediction overlays.

Command line (every sub-command writes PNG files under ``--out`` and prints their paths)::

    python -m utils.visualize tsne    --ckpt NEW.pth [--ckpt_old OLD.pth] --out DIR
                                      [--data_root DIR] [--split test] [--num_images 50]
                                      [--pixels_per_class K] [--skip_background] [--logdir DIR]
    python -m utils.visualize curves  --csv results/a.csv [results/b.csv ...] --out DIR
                                      [--labels A B ...] [--dataset voc --task 15-1]
    python -m utils.visualize overlay --ckpt CKPT.pth --indices 0 5 7 --out DIR
                                      [--data_root DIR] [--split test] [--alpha 0.5]

Checkpoints are those ``run.py`` writes (``utils.checkpoint``): the network is rebuilt from the
stored options and per-step class counts, the images come from ``dataset.get_dataset`` for the
checkpoint's step with its stored options (``--data_root`` / ``--idxs_dir`` override the paths).
Labels, colours and legends are in the step's label space (0 background, ``k`` = ``k``-th class
of the task order, ``tasks.get_order``); legends give the label and the dataset's class name (and
its class id when the order is shuffled). Colours come from the dataset palette (Pascal VOC's
bit-interleaved colour map, ``utils.logger.color_map``), which gives neighbouring labels clearly
different colours (not the near-identical shades of a continuous colour map); ``curves`` names its
lines after the runs and always draws a legend; the confusion matrix has a tick per class, with
its name.

User errors (missing or malformed files, bad options) print ``error: <message>`` and exit with
status 2.

Figures are drawn on matplotlib's Agg canvas without pyplot state, so the module works headless.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import ArgumentParser
from utils.reduce import channel_argmax

__all__ = [
    "ClassFeatures",
    "load_model",
    "check_old_new",
    "build_split",
    "downsample_labels",
    "pooled_class_features",
    "embed_tsne",
    "tsne_figure",
    "class_legend_names",
    "task_class_names",
    "confusion_matrix_figure",
    "run_label",
    "read_step_summaries",
    "base_class_count",
    "curves_figure",
    "denormalize",
    "blend_labels",
    "predict_labels",
    "overlay_figure",
    "save_figure",
    "main",
]

IGNORE_INDEX = 255
SPLITS = ("train", "val", "test")
REQUIRED_CHECKPOINT_KEYS = ("model_state", "classes", "opts")


# ----------------------------------------------------------------------------------- checkpoints
def _checkpoint_step(ckpt, opts, path) -> int:
    step = ckpt.get("step", opts.get("step"))
    if isinstance(step, (list, tuple)):
        raise ValueError(f"checkpoint {path}: its options hold several steps {list(step)} and no "
                         "'step' entry, so its step is unknown")
    if step is None:
        raise ValueError(f"checkpoint {path} records no step")
    return int(step)


def load_model(path, device="cpu"):
    """``(model, opts)`` from a checkpoint written by ``run.py``; the model is in eval mode.

    The network is rebuilt with ``segmentation_module.make_model(opts, ckpt["classes"])`` from the
    stored options (ImageNet weights are not loaded: the checkpoint replaces them) and loaded
    strictly. ``opts`` is an ``argparse.Namespace`` whose ``step`` is the checkpoint's step.

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` when it cannot be read or lacks our keys,
    its class counts differ from the task table's counts for its step, or its weights do not fit
    the rebuilt network.
    """
    import tasks
    from segmentation_module import make_model
    from utils.checkpoint import load_checkpoint, strip_prefix

    try:
        ckpt = load_checkpoint(path)
    except RuntimeError as error:  # truncated, corrupt or not a weights_only file
        raise ValueError(str(error)) from None
    missing = ([key for key in REQUIRED_CHECKPOINT_KEYS if key not in ckpt] if isinstance(ckpt, dict)
               else list(REQUIRED_CHECKPOINT_KEYS))
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}: the tools need a checkpoint written "
                         "by run.py (model_state, per-step classes and the run's opts)")
    if not isinstance(ckpt["opts"], dict) or "model" not in ckpt["opts"]:
        raise ValueError(f"checkpoint {path}: its 'opts' entry holds no run options (no 'model')")
    opts_dict = dict(ckpt["opts"])
    step = _checkpoint_step(ckpt, opts_dict, path)
    opts = argparse.Namespace(**opts_dict)
    opts.step = step
    opts.dataset = ckpt.get("dataset", getattr(opts, "dataset", None))
    opts.task = ckpt.get("task", getattr(opts, "task", None))
    # One process rebuilds the model: no synchronised norms, and no ImageNet file is needed.
    opts.world_size = 1
    opts.no_pretrained = True
    classes = [int(count) for count in ckpt["classes"]]
    expected = tasks.get_per_task_classes(opts.dataset, opts.task, step)
    if classes != expected:
        raise ValueError(
            f"checkpoint {path}: class counts {classes} per step do not match task {opts.task!r} "
            f"of {opts.dataset!r} at step {step}, which has {expected}")
    model = make_model(opts, classes)
    try:
        model.load_state_dict(strip_prefix(ckpt["model_state"]), strict=True)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path}: its weights do not fit a {opts.model} model with "
                           f"classes {classes}: {error}") from error
    return model.to(device).eval(), opts


def check_old_new(opts_old, opts_new, path_old="old checkpoint", path_new="new checkpoint"):
    """``ValueError`` unless the old checkpoint is an earlier step of the new one's protocol:
    same dataset and task, smaller step, and per-step class counts that are a prefix of the new's."""
    import tasks

    if (opts_old.dataset, opts_old.task) != (opts_new.dataset, opts_new.task):
        raise ValueError(
            f"{path_old} is task {opts_old.task!r} of {opts_old.dataset!r} but {path_new} is task "
            f"{opts_new.task!r} of {opts_new.dataset!r}")
    if opts_old.step >= opts_new.step:
        raise ValueError(f"{path_old} is step {opts_old.step}, not earlier than {path_new} "
                         f"(step {opts_new.step}); pass the older model as --ckpt_old")
    old = tasks.get_per_task_classes(opts_old.dataset, opts_old.task, opts_old.step)
    new = tasks.get_per_task_classes(opts_new.dataset, opts_new.task, opts_new.step)
    if new[:len(old)] != old:
        raise ValueError(f"class counts mismatch: {path_old} has {old} per step, {path_new} {new}")


def build_split(opts, split="test", data_root=None, idxs_dir=None):
    """The ``split`` ('train', 'val' or 'test') dataset of ``dataset.get_dataset`` for ``opts.step``.

    ``data_root`` / ``idxs_dir`` replace the checkpoint's paths when given. 'test' holds every
    class seen so far; 'train'/'val' only the step's classes (with its masking), 'train' with the
    training augmentation.
    """
    import dataset as datasets

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    opts = argparse.Namespace(**vars(opts))
    if data_root is not None:
        opts.data_root = data_root
    if idxs_dir is not None:
        opts.idxs_dir = idxs_dir
    if not os.path.isdir(opts.data_root):
        raise FileNotFoundError(f"dataset root {opts.data_root} does not exist; pass --data_root")
    train_dst, val_dst, test_dst, _ = datasets.get_dataset(opts)
    return {"train": train_dst, "val": val_dst, "test": test_dst}[split]


def _image_subset_loader(dataset, num_images, seed):
    """Loader of ``num_images`` images of ``dataset`` drawn without replacement (seeded), batch 1
    because the test transform keeps each image's own size."""
    if len(dataset) == 0:
        raise ValueError("the chosen split holds no image")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)[:num_images].tolist()
    subset = torch.utils.data.Subset(dataset, order)
    return torch.utils.data.DataLoader(subset, batch_size=1, shuffle=False, num_workers=0)


# --------------------------------------------------------------------------------------- t-SNE
class ClassFeatures(NamedTuple):
    """Feature rows for t-SNE: ``features`` (n, C) float32, ``labels`` (n,) class of each row,
    ``pooled`` (n,) True for a per-(image, class) mean, False for a sampled pixel."""

    features: np.ndarray
    labels: np.ndarray
    pooled: np.ndarray


def downsample_labels(labels, size):
    """``(B, H, W)`` labels to ``(B, h, w)`` by nearest-neighbour sampling (no class mixing):
    output pixel ``(i, j)`` takes input pixel ``(floor(i·H/h), floor(j·W/w))``."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    resized = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")
    return resized[:, 0].long()


def _class_rows(features, labels, pixels_per_class, generator, skip_background):
    """Rows of one image: ``features`` (C, h, w), ``labels`` (h, w) on the same grid."""
    pixels = features.flatten(1).T
    flat = labels.flatten()
    rows, classes, pooled = [], [], []
    for cls in flat.unique().tolist():
        if cls == IGNORE_INDEX or (skip_background and cls == 0):
            continue
        members = pixels[flat == cls]
        rows.append(members.mean(dim=0, keepdim=True))
        classes.append(cls)
        pooled.append(True)
        if pixels_per_class > 0:
            chosen = torch.randperm(len(members), generator=generator)[:pixels_per_class]
            rows.append(members[chosen.to(members.device)])
            classes += [cls] * len(chosen)
            pooled += [False] * len(chosen)
    return rows, classes, pooled


@torch.no_grad()
def pooled_class_features(model, loader, device, max_images, pixels_per_class=0, seed=0,
                          skip_background=False):
    """Per-(image, class) mean of the head features ``pre_logits`` over the first ``max_images``
    images of ``loader``.

    For image ``i`` with head features ``f`` (C, h, w) and labels ``y`` resized to (h, w) by nearest
    neighbour, every class ``c`` present (255 excluded, 0 too with ``skip_background``) gives the row
    ``mean_{p: y_p = c} f_p``. With ``pixels_per_class = K`` up to ``K`` of those pixels' own
    feature vectors are added (drawn without replacement from a generator seeded with ``seed``, so
    two models of the same architecture get the same pixels). Returns ``ClassFeatures``.
    """
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if pixels_per_class < 0:
        raise ValueError(f"pixels_per_class must be >= 0, got {pixels_per_class}")
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    rows, classes, pooled = [], [], []
    seen = 0
    for batch in loader:
        images, labels = batch[0][:max_images - seen], batch[1][:max_images - seen]
        _, extras = model(images.to(device, torch.float32), ret_intermediate=True)
        features = extras["pre_logits"].float()
        small_labels = downsample_labels(labels.to(features.device), features.shape[-2:])
        for image_features, image_labels in zip(features, small_labels):
            image_rows, image_classes, image_pooled = _class_rows(
                image_features, image_labels, pixels_per_class, generator, skip_background)
            rows += image_rows
            classes += image_classes
            pooled += image_pooled
        seen += len(images)
        if seen >= max_images:
            break
    model.train(was_training)
    if not rows:
        raise ValueError(f"the {seen} images hold no labelled pixel to pool features from")
    return ClassFeatures(torch.cat(rows).cpu().numpy().astype(np.float32),
                         np.asarray(classes, dtype=np.int64), np.asarray(pooled, dtype=bool))


def embed_tsne(features, seed=0, n_jobs=2):
    """2-D t-SNE of ``features`` (n, d), perplexity ``min(30, (n - 1) / 3)``.

    openTSNE (``TSNE(n_jobs=n_jobs, random_state=seed)``); MulticoreTSNE only when openTSNE is
    missing. On a loaded machine ``n_jobs=1`` can be many times faster than 2 (thread contention).
    """
    features = np.asarray(features, dtype=np.float32)
    n = len(features)
    if features.ndim != 2 or n < 4:
        raise ValueError(f"t-SNE needs at least 4 feature rows (n, d), got shape {features.shape}; "
                         "use more images or --pixels_per_class")
    perplexity = min(30.0, (n - 1) / 3)
    try:
        import openTSNE
    except ImportError:
        openTSNE = None
    if openTSNE is not None:
        embedding = openTSNE.TSNE(n_jobs=n_jobs, random_state=seed, perplexity=perplexity).fit(features)
        return np.asarray(embedding)
    try:
        from MulticoreTSNE import MulticoreTSNE
    except ImportError:
        raise ImportError("t-SNE needs openTSNE (pip install openTSNE) or MulticoreTSNE") from None
    tsne = MulticoreTSNE(n_components=2, n_jobs=n_jobs, random_state=seed, perplexity=perplexity)
    return tsne.fit_transform(features.astype(np.float64))


def _as_class_features(value, name):
    if isinstance(value, ClassFeatures):
        return value
    if not isinstance(value, (tuple, list)) or len(value) not in (2, 3):
        raise TypeError(f"features of {name!r} must be (X, y) or ClassFeatures, got {type(value).__name__}")
    features, labels = np.asarray(value[0]), np.asarray(value[1])
    pooled = np.asarray(value[2], dtype=bool) if len(value) == 3 else np.ones(len(labels), dtype=bool)
    if len(features) != len(labels) or len(pooled) != len(labels):
        raise ValueError(f"{name!r}: {len(features)} feature rows but {len(labels)} labels")
    return ClassFeatures(features, labels.astype(np.int64), pooled)


def _new_figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _colour(palette, cls):
    return tuple(channel / 255.0 for channel in palette[int(cls)])


def _class_legend(figure, classes, palette, class_names, marker="o"):
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="", marker=marker, markersize=7,
                      markerfacecolor=_colour(palette, cls), markeredgecolor="0.3",
                      label=(class_names or {}).get(int(cls), str(int(cls))))
               for cls in classes]
    columns = max(1, math.ceil(len(handles) / 25))  # ADE: up to 151 entries
    figure.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=columns,
                  fontsize="small", title="class", frameon=False)


def tsne_figure(features_by_model, dataset="voc", seed=0, class_names=None, title=None, n_jobs=2):
    """One t-SNE panel per model, side by side, points coloured by label with the dataset palette
    (``color_map(dataset)[label]``: the VOC colour map, whose neighbouring labels differ clearly).

    ``features_by_model``: ``{panel title: (X, y)}`` (or ``ClassFeatures``; sampled pixels are
    drawn as small dots, pooled rows as circles). Each model's features are embedded separately
    (``embed_tsne``: the spaces of two models are not comparable). ``class_names``: optional
    ``{class: legend text}``; ``n_jobs``: t-SNE threads. Returns a matplotlib ``Figure``.
    """
    from utils.logger import color_map

    if not features_by_model:
        raise ValueError("tsne_figure needs the features of at least one model")
    palette = color_map(dataset)
    panels = OrderedDict((name, _as_class_features(value, name)) for name, value in features_by_model.items())
    figure = _new_figure(5.0 * len(panels) + 1.5, 5.0)
    all_classes = sorted(set(np.concatenate([panel.labels for panel in panels.values()]).tolist()))
    for index, (name, panel) in enumerate(panels.items()):
        axes = figure.add_subplot(1, len(panels), index + 1)
        points = embed_tsne(panel.features, seed=seed, n_jobs=n_jobs)
        colours = np.asarray([_colour(palette, cls) for cls in panel.labels])
        pixels = ~panel.pooled
        if pixels.any():
            axes.scatter(points[pixels, 0], points[pixels, 1], c=colours[pixels], s=6, alpha=0.5,
                         linewidths=0)
        axes.scatter(points[panel.pooled, 0], points[panel.pooled, 1], c=colours[panel.pooled], s=28,
                     edgecolors="0.3", linewidths=0.4)
        axes.set_title(name)
        axes.set_xticks([])
        axes.set_yticks([])
    _class_legend(figure, all_classes, palette, class_names)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def task_class_names(dataset, task, n_seen=None):
    """The dataset's class name of each label ``0..n_seen-1`` in task order (all labels of the
    protocol by default): ``task_class_names("voc", "19-1b")[5] == "bus"`` (label 5 is VOC id 6)."""
    import tasks
    from dataset.ade import CLASSES as ADE_CLASSES
    from dataset.voc import CLASSES as VOC_CLASSES

    names = {"voc": VOC_CLASSES, "ade": ADE_CLASSES}
    if dataset not in names:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {sorted(names)}")
    order = tasks.get_order(dataset, task)
    n_seen = len(order) if n_seen is None else int(n_seen)
    if not 1 <= n_seen <= len(order):
        raise ValueError(f"task {task!r} of {dataset!r} has {len(order)} labels, asked for {n_seen}")
    return [names[dataset][order[label]] for label in range(n_seen)]


def class_legend_names(dataset, task, step):
    """``{label: text}`` for the legends: the label and the dataset's class name, ``(id k)`` when
    the task order maps the label to another dataset class id, and ``new`` for the classes added at
    ``step`` (VOC 19-1b step 1: ``{5: "5 bus (id 6)", 20: "20 bottle (id 5) new", ...}``)."""
    import tasks

    order = tasks.get_order(dataset, task)
    counts = tasks.get_per_task_classes(dataset, task, step)
    first_new = sum(counts[:-1]) if step > 0 else sum(counts)
    class_names = task_class_names(dataset, task, sum(counts))
    names = {}
    for label, name in enumerate(class_names):
        text = f"{label} {name}" if order[label] == label else f"{label} {name} (id {order[label]})"
        names[label] = f"{text} new" if label >= first_new else text
    return names


# ----------------------------------------------------------------------------- confusion matrix
def confusion_matrix_figure(cm, class_names=None, normalize=True, title="Confusion Matrix"):
    """Matplotlib figure of a confusion matrix (rows = ground truth, columns = prediction) with a
    tick at every class index, labelled ``"k name"`` when ``class_names`` are given (e.g.
    ``task_class_names(dataset, task, n)``), else ``"k"``.

    With ``normalize`` each row is divided by its sum (rows without pixels stay 0), as the
    originals drew it.
    """
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    n = cm.shape[0]
    if class_names is not None and len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names for a {n}-class matrix")
    if normalize:
        rows = cm.sum(axis=1, keepdims=True)
        cm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = max(4.0, 0.3 * n + (1.5 if class_names is not None else 0.0))
    figure = _new_figure(side, side)
    axes = figure.add_subplot()
    image = axes.imshow(cm, interpolation="nearest", cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    axes.set(title=title, ylabel="true label", xlabel="predicted label")
    ticks = np.arange(n)
    labels = [str(k) for k in ticks] if class_names is None else [f"{k} {name}" for k, name in zip(ticks, class_names)]
    font = "small" if n <= 30 else "x-small"
    axes.set_xticks(ticks, labels=labels, rotation=90, fontsize=font)
    axes.set_yticks(ticks, labels=labels, fontsize=font)
    figure.tight_layout()
    return figure


# -------------------------------------------------------------------------------------- curves
def base_class_count(dataset, task):
    """Classes of step 0, background included (``voc``, ``15-1`` → 16)."""
    import tasks

    return tasks.get_per_task_classes(dataset, task, 0)[0]


def _row_values(cells, path, step):
    """Seen-class IoUs of one CSV row (``X`` → NaN); ``x`` (unseen) cells must close the row."""
    seen = [cell for cell in cells if cell != "x"]
    if cells[:len(seen)] != seen:
        raise ValueError(f"{path}, step {step}: unseen classes ('x') must come after the seen ones")
    try:
        return [math.nan if cell == "X" else float(cell) for cell in seen]
    except ValueError as error:
        raise ValueError(f"{path}, step {step}: {error}") from None


def read_step_summaries(path, n_base=None, n_classes=None):
    """``{"step": [...], "base": [...], "new": [...], "all": [...]}`` of a results CSV.

    Per row, the seen classes are the cells not marked ``x``; ``metrics.summarize_step`` gives
    base = mean IoU of classes ``0..n_base-1``, new = of ``n_base..n_seen-1``, all = of every seen
    class (absent classes ``X`` skipped). Without ``n_base`` it is the number of seen classes in
    the step-0 row. ``n_classes`` checks the row width (the dataset's class count).
    """
    from metrics import summarize_step
    from utils.results import read_results

    if not os.path.isfile(path):
        raise FileNotFoundError(f"results CSV not found: {path}")
    try:
        _, rows = read_results(path)
    except (csv.Error, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a results CSV: {error}") from None
    if not rows:
        raise ValueError(f"{path} holds no result row")
    summaries = {"step": [], "base": [], "new": [], "all": []}
    for row in rows:
        try:
            step, cells = int(row[0]), row[1:-1]
        except ValueError:
            raise ValueError(f"{path}: row {','.join(row)!r} does not start with a step number") from None
        if not cells:
            raise ValueError(f"{path}, step {step}: no class column (expected step, IoUs, mIoU)")
        if n_classes is not None and len(cells) != n_classes:
            raise ValueError(f"{path}: rows have {len(cells)} class columns, the dataset has {n_classes}")
        values = _row_values(cells, path, step)
        if n_base is None:
            if step != 0:
                raise ValueError(f"{path}: the first row is step {step}, not 0, so the base class "
                                 "count is unknown; pass --dataset and --task")
            n_base = len(values)
        if len(values) < n_base:
            raise ValueError(f"{path}, step {step}: {len(values)} seen classes, fewer than the "
                             f"{n_base} base classes (another task?)")
        summary = summarize_step(values, n_base, len(values))
        summaries["step"].append(step)
        for key in ("base", "new", "all"):
            summaries[key].append(summary[key])
    return summaries


def run_label(path, dataset=None, task=None):
    """The name of the run behind a results CSV, for legends.

    ``run.py`` writes ``results/{date}_{dataset}_{task}_{name}.csv`` and beside it a JSON with the
    options of each step (``utils.results.write_run_info``): the label is the ``name`` of its last
    step; without a readable JSON, the file name after ``_{dataset}_{task}_`` (with ``dataset`` and
    ``task`` given) or after ``{date}_{dataset}_`` (the label then starts with the task); else the
    file name without ``.csv``.
    """
    from utils.results import run_info_path

    try:
        with open(run_info_path(path)) as handle:
            steps = json.load(handle)["steps"]
        name = steps[max(steps, key=int)]["options"]["name"]
        if isinstance(name, str) and name:
            return name
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no companion, or not ours: the file name is the next best label
    stem = os.path.splitext(os.path.basename(path))[0]
    if dataset and task and f"_{dataset}_{task}_" in stem:
        return stem.split(f"_{dataset}_{task}_", 1)[1]
    match = re.match(r"^[^_]+_(?:voc|ade)_(.+)$", stem)
    return match[1] if match else stem


def _unique_labels(labels, paths):
    """Labels shared by several files (seeds of one run name) get the file name appended."""
    counts = {label: labels.count(label) for label in labels}
    return [f"{label} ({os.path.basename(path)})" if counts[label] > 1 else label
            for label, path in zip(labels, paths)]


def curves_figure(csv_paths, labels=None, n_base=None, n_classes=None, title=None, dataset=None, task=None):
    """Three panels (all / base / new mIoU in %, against the step), one line per CSV file, and one
    legend beside them naming the lines (always drawn, even for a single run).

    ``labels`` name the lines (default: ``run_label`` of each file, with ``dataset``/``task`` to
    read run names from file names); ``n_base`` / ``n_classes`` as in ``read_step_summaries``.
    Returns a matplotlib ``Figure``.
    """
    if not csv_paths:
        raise ValueError("curves_figure needs at least one results CSV")
    if labels is None:
        labels = _unique_labels([run_label(path, dataset, task) for path in csv_paths], csv_paths)
    labels = list(labels)
    if len(labels) != len(csv_paths):
        raise ValueError(f"{len(labels)} labels for {len(csv_paths)} CSV files")
    summaries = [read_step_summaries(path, n_base, n_classes) for path in csv_paths]
    steps = sorted({step for summary in summaries for step in summary["step"]})
    figure = _new_figure(13.0 + 0.08 * max(len(label) for label in labels), 4.0)
    panels = (("all", "all classes"), ("base", "base classes"), ("new", "new classes"))
    markers = "osD^vP*X"
    for index, (key, name) in enumerate(panels):
        axes = figure.add_subplot(1, 3, index + 1)
        for line, (label, summary) in enumerate(zip(labels, summaries)):
            values = 100.0 * np.asarray(summary[key], dtype=np.float64)
            axes.plot(summary["step"], values, marker=markers[line // 10 % len(markers)], label=label,
                      color=f"C{line % 10}")
        axes.set(title=name, xlabel="step", ylabel="mIoU (%)", xlim=(steps[0] - 0.5, steps[-1] + 0.5))
        axes.set_xticks(steps)
        axes.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    # The legend sits right of the panels, in space tight_layout leaves free, so that it never
    # hides a curve and is part of the canvas TensorBoard renders.
    share = 13.0 / figure.get_figwidth()
    figure.tight_layout(rect=(0.0, 0.0, share * 0.86, 1.0))
    handles, names = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="center left", bbox_to_anchor=(share * 0.86, 0.5),
                  fontsize="small", title="run", frameon=False)
    return figure


# ------------------------------------------------------------------------------------ overlays
def denormalize(image):
    """``(3, H, W)`` ImageNet-normalised tensor → ``(H, W, 3)`` uint8: ``x·std + mean``, ×255."""
    from dataset.transform import IMAGENET_MEAN, IMAGENET_STD

    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image.detach().cpu().float() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def blend_labels(image, label, palette, alpha=0.5):
    """``(1 - alpha)·image + alpha·palette[label]`` on labelled pixels; background (0) is left as
    the image so that the scene stays visible. ``image`` (H, W, 3) uint8, ``label`` (H, W)."""
    from utils.logger import label_to_color

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    label = label.detach().cpu().numpy() if hasattr(label, "detach") else np.asarray(label)
    if label.shape != image.shape[:2]:
        raise ValueError(f"label shape {label.shape} differs from image shape {image.shape[:2]}")
    colours = label_to_color(label.astype(np.int64), palette).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    out = np.where((label != 0)[..., None], blended, image.astype(np.float32))
    return out.round().astype(np.uint8)


@torch.no_grad()
def predict_labels(model, image, device="cpu"):
    """Arg-max label map ``(H, W)`` of one ``(3, H, W)`` image; with SSUL's unknown channel the
    logits are first folded back to the label space (``utils.ssul.ssul_fold_unknown``)."""
    logits, _ = model(image[None].to(device, torch.float32))
    if getattr(model, "unknown", False):
        from utils.ssul import ssul_fold_unknown

        logits = ssul_fold_unknown(logits)
    return channel_argmax(logits)[0].cpu()


def overlay_figure(model, dataset, indices, device="cpu", dataset_name="voc", alpha=0.5,
                   class_names=None):
    """One row per index of ``dataset``: the image, the ground truth and the prediction blended
    over it (``blend_labels``), with a legend of the classes shown in the row."""
    from utils.logger import color_map

    indices = [int(index) for index in indices]
    if not indices:
        raise ValueError("overlay_figure needs at least one image index")
    wrong = [index for index in indices if not 0 <= index < len(dataset)]
    if wrong:
        raise IndexError(f"image indices {wrong} are out of range: the split has {len(dataset)} images")
    palette = color_map(dataset_name)
    was_training = model.training
    model.eval()
    figure = _new_figure(10.5, 3.2 * len(indices))
    for row, index in enumerate(indices):
        sample = dataset[index]
        image, label = sample[0], sample[1]
        prediction = predict_labels(model, image, device)
        rgb = denormalize(image)
        panels = (("image", rgb), ("ground truth", blend_labels(rgb, label, palette, alpha)),
                  ("prediction", blend_labels(rgb, prediction, palette, alpha)))
        for column, (name, picture) in enumerate(panels):
            axes = figure.add_subplot(len(indices), 3, 3 * row + column + 1)
            axes.imshow(picture)
            axes.set_title(f"#{index} {name}", fontsize="small")
            axes.axis("off")
        shown = sorted(set(torch.as_tensor(label).unique().tolist()) | set(prediction.unique().tolist()))
        _row_legend(axes, [cls for cls in shown if cls not in (0, IGNORE_INDEX)], palette, class_names)
    model.train(was_training)
    figure.tight_layout()
    return figure


def _row_legend(axes, classes, palette, class_names):
    from matplotlib.patches import Patch

    if not classes:
        return
    handles = [Patch(facecolor=_colour(palette, cls), edgecolor="0.3",
                     label=(class_names or {}).get(int(cls), str(int(cls)))) for cls in classes]
    axes.legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="x-small",
                ncol=max(1, math.ceil(len(handles) / 15)), frameon=False)


# --------------------------------------------------------------------------------------- output
def save_figure(figure, path, dpi=120):
    """Writes ``figure`` as PNG to ``path`` atomically (folders created); returns ``path``."""
    from utils.checkpoint import atomic_write

    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=dpi,
                                                     bbox_inches="tight"))
    return path


def _log_figure(logdir, tag, figure, step):
    from utils.logger import Logger

    logger = Logger(logdir, rank=0, step=step)
    try:
        logger.add_figure(tag, figure, step)
    finally:
        logger.close()


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_tsne(args):
    model, opts = load_model(args.ckpt, args.device)
    models = [(f"new: {opts.model}, step {opts.step}", model)]
    if args.ckpt_old:
        model_old, opts_old = load_model(args.ckpt_old, args.device)
        check_old_new(opts_old, opts, args.ckpt_old, args.ckpt)
        models.insert(0, (f"old: {opts_old.model}, step {opts_old.step}", model_old))
    data = build_split(opts, args.split, args.data_root, args.idxs_dir)
    features = OrderedDict()
    for name, network in models:
        loader = _image_subset_loader(data, args.num_images, args.seed)
        features[name] = pooled_class_features(network, loader, args.device, args.num_images,
                                               args.pixels_per_class, args.seed, args.skip_background)
    title = f"{opts.dataset} {opts.task}: {args.split} split, {min(args.num_images, len(data))} images"
    figure = tsne_figure(features, opts.dataset, args.seed,
                         class_legend_names(opts.dataset, opts.task, opts.step), title, args.n_jobs)
    path = save_figure(figure, os.path.join(args.out, f"tsne_{opts.task}-{opts.dataset}_step{opts.step}.png"))
    if args.logdir:
        _log_figure(args.logdir, "tsne", figure, opts.step)
    return [path]


def _run_curves(args):
    import tasks

    n_base = base_class_count(args.dataset, args.task) if args.task else None
    n_classes = tasks.num_classes(args.dataset) if args.dataset else None
    title = f"{args.dataset} {args.task}" if args.task else None
    figure = curves_figure(args.csv, args.labels, n_base, n_classes, title, args.dataset, args.task)
    return [save_figure(figure, os.path.join(args.out, args.name))]


def _run_overlay(args):
    model, opts = load_model(args.ckpt, args.device)
    data = build_split(opts, args.split, args.data_root, args.idxs_dir)
    figure = overlay_figure(model, data, args.indices, args.device, opts.dataset, args.alpha,
                            class_legend_names(opts.dataset, opts.task, opts.step))
    path = save_figure(figure, os.path.join(args.out, f"overlay_{opts.task}-{opts.dataset}_step{opts.step}.png"))
    if args.logdir:
        _log_figure(args.logdir, "overlay", figure, opts.step)
    return [path]


def _add_data_arguments(parser):
    parser.add_argument("--data_root", default=None, help="dataset root (default: the checkpoint's)")
    parser.add_argument("--idxs_dir", default=None, help="index-cache folder (default: the checkpoint's)")
    parser.add_argument("--split", default="test", choices=SPLITS,
                        help="images of the checkpoint's step: test = every seen class")
    parser.add_argument("--device", default=_default_device(), help="torch device")
    parser.add_argument("--logdir", default=None, help="also log the figure to TensorBoard there")


def get_argparser():
    parser = ArgumentParser(prog="python -m utils.visualize", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    tsne = commands.add_parser("tsne", help="t-SNE of per-class pooled head features")
    tsne.add_argument("--ckpt", required=True, help="checkpoint of the (new) model")
    tsne.add_argument("--ckpt_old", default=None, help="checkpoint of an earlier step, drawn on the left")
    tsne.add_argument("--out", required=True, help="output folder")
    tsne.add_argument("--num_images", type=int, default=50, help="images drawn from the split")
    tsne.add_argument("--pixels_per_class", type=int, default=0,
                      help="also embed up to K individual pixels per (image, class)")
    tsne.add_argument("--skip_background", action="store_true", help="leave class 0 out")
    tsne.add_argument("--seed", type=int, default=0, help="image choice, pixel sampling and t-SNE seed")
    tsne.add_argument("--n_jobs", type=int, default=2, help="t-SNE threads")
    _add_data_arguments(tsne)

    curves = commands.add_parser("curves", help="per-step all/base/new mIoU from results CSVs")
    curves.add_argument("--csv", nargs="+", required=True, help="results/*.csv files, one line each")
    curves.add_argument("--labels", nargs="+", default=None,
                        help="line names (default: the run names, from the JSON beside each CSV or "
                             "the file name results/{date}_{dataset}_{task}_{name}.csv)")
    curves.add_argument("--dataset", default=None, choices=("voc", "ade"),
                        help="with --task: base classes from the task table")
    curves.add_argument("--task", default=None, help="with --dataset (default: step-0 row's classes)")
    curves.add_argument("--out", required=True, help="output folder")
    curves.add_argument("--name", default="curves.png", help="output file name")

    overlay = commands.add_parser("overlay", help="ground truth and prediction over chosen images")
    overlay.add_argument("--ckpt", required=True, help="checkpoint of the model")
    overlay.add_argument("--indices", type=int, nargs="+", required=True, help="image indices in the split")
    overlay.add_argument("--out", required=True, help="output folder")
    overlay.add_argument("--alpha", type=float, default=0.5, help="label colour weight in the blend")
    _add_data_arguments(overlay)
    return parser


def _check_arguments(parser, args):
    if getattr(args, "num_images", 1) < 1:
        parser.error(f"--num_images must be >= 1, got {args.num_images}")
    if getattr(args, "n_jobs", 1) < 1:
        parser.error(f"--n_jobs must be >= 1, got {args.n_jobs}")
    if getattr(args, "pixels_per_class", 0) < 0:
        parser.error(f"--pixels_per_class must be >= 0, got {args.pixels_per_class}")
    if not 0.0 <= getattr(args, "alpha", 0.5) <= 1.0:
        parser.error(f"--alpha must lie in [0, 1], got {args.alpha}")
    if hasattr(args, "device"):
        _check_device(parser, args.device)
    if args.command == "curves":
        _check_task(parser, args.dataset, args.task)


def _check_device(parser, device):
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as error:
        parser.error(f"--device {device}: {error}")
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA device is available here; use --device cpu")


def _check_task(parser, dataset, task):
    import tasks

    if (dataset is None) != (task is None):
        parser.error("--dataset and --task go together (the base class count comes from the task table)")
    if task is not None:
        try:
            tasks.get_per_task_classes(dataset, task, 0)
        except ValueError as error:
            parser.error(str(error))


def main(argv=None):
    """CLI entry point (module docstring); returns the written PNG paths."""
    import matplotlib

    matplotlib.use("Agg")  # TensorBoard's figure logging goes through pyplot
    parser = get_argparser()
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    runners = {"tsne": _run_tsne, "curves": _run_curves, "overlay": _run_overlay}
    try:
        paths = runners[args.command](args)
    except (OSError, ValueError, IndexError, ImportError) as error:
        # the user's files or options: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
