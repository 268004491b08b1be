"""Throughput of the training data pipeline alone, per DataLoader worker.

Run through ``python scripts/benchmark.py --data`` (options there). A VOC-layout tree of generated
JPEG images and palette masks of VOC's typical size (500x375) is written to a temporary folder,
then the project's own training path reads it: ``VOCSegmentationIncremental`` (JPEG and PNG
decode, label mapping) with ``transform.train_transform(crop)`` (random resized crop to
``crop x crop``, horizontal flip, float conversion, ImageNet normalisation), batched by the
training loader (``SkipAwareLoader``). Measured:

- per image, in this process with one torch thread (what a DataLoader worker runs): the decode
  time (``load_raw``) and the whole sample (``dataset[i]``), medians over the images;
  ``per_worker_images_per_s = 1000 / total_ms`` is what one worker delivers;
- for each worker count, a loader pass over all images (``num_workers=0``: in the main process):
  images per second from the iterator's creation to the last batch, worker start included.

With ``feed_images_per_s`` (the images per second a training step consumes, e.g. the model
benchmark's ``images_per_s`` on a GPU) the report adds ``workers_needed``:
``ceil(feed / per_worker_images_per_s)``, the worker processes (hence CPU cores) that keep it fed.
"""
from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

from . import transform
from .skips import SkipAwareLoader
from .synthetic import STYLES, class_looks, render_scene, voc_palette
from .voc import VOCSegmentationIncremental

__all__ = ["LoaderBenchmark", "write_voc_images", "run_loader_benchmark"]


@dataclass(frozen=True)
class LoaderBenchmark:
    """What is measured: ``images`` generated ``width x height`` JPEGs (``quality``), cropped to
    ``crop_size``, in batches of ``batch_size``, with each of ``workers`` loader worker counts."""

    images: int = 64
    width: int = 500
    height: int = 375
    crop_size: int = 512
    batch_size: int = 8
    workers: tuple = (0, 1, 2)
    quality: int = 90
    seed: int = 0
    feed_images_per_s: float | None = None
    folder: str | None = field(default=None, compare=False)  # None: a temporary folder

    def check(self) -> None:
        if self.images < 1 or self.batch_size < 1 or self.images < self.batch_size:
            raise ValueError(f"--data_images ({self.images}) must be >= --batch_size "
                             f"({self.batch_size}) >= 1")
        if min(self.width, self.height) < 32 or self.crop_size < 1:
            raise ValueError(f"images of {self.width}x{self.height} are too small (>= 32 px), or "
                             f"crop {self.crop_size} < 1")
        if not self.workers or min(self.workers) < 0:
            raise ValueError(f"--data_workers must be counts >= 0, got {list(self.workers)}")
        if self.feed_images_per_s is not None and self.feed_images_per_s <= 0:
            raise ValueError(f"--feed_images_per_s must be > 0, got {self.feed_images_per_s}")


def _write_one(root: str, index: int, settings: LoaderBenchmark) -> str:
    rng = np.random.default_rng([settings.seed, index])
    n_fg = STYLES["voc"].n_foreground
    classes = rng.integers(1, n_fg + 1, size=int(rng.integers(1, 5))).tolist()
    image, label, _ = render_scene(rng, settings.height, settings.width, classes,
                                   class_looks("voc"), True)
    stem = f"loader_{index:06d}"
    Image.fromarray(image).save(os.path.join(root, "JPEGImages", stem + ".jpg"),
                                quality=settings.quality)
    mask = Image.fromarray(label).convert("P")
    mask.putpalette(voc_palette())
    mask.save(os.path.join(root, "SegmentationClassAug", stem + ".png"))
    return stem


def write_voc_images(root: str, settings: LoaderBenchmark) -> str:
    """A VOC tree (SATS layout) at ``root`` with ``settings.images`` generated samples listed in
    both ``splits/train_aug.txt`` and ``splits/val.txt``; returns ``root``."""
    for folder in ("JPEGImages", "SegmentationClassAug", "splits"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    stems = [_write_one(root, i, settings) for i in range(settings.images)]
    lines = "".join(f"/JPEGImages/{s}.jpg /SegmentationClassAug/{s}.png\n" for s in stems)
    for name in ("train_aug.txt", "val.txt"):
        with open(os.path.join(root, "splits", name), "w") as stream:
            stream.write(lines)
    return root


def _per_image_ms(dataset) -> dict:
    """Median decode and whole-sample times (ms) over the dataset, one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what PyTorch sets in each DataLoader worker
    try:
        decode, total = [], []
        for i in range(len(dataset)):
            start = time.perf_counter()
            dataset.load_raw(i)
            decode.append(time.perf_counter() - start)
        for i in range(len(dataset)):
            start = time.perf_counter()
            dataset[i]
            total.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    decode_ms, total_ms = 1e3 * statistics.median(decode), 1e3 * statistics.median(total)
    return {"decode": decode_ms, "transform": max(total_ms - decode_ms, 0.0), "total": total_ms}


def _loader_pass(dataset, settings: LoaderBenchmark, workers: int) -> dict:
    loader = SkipAwareLoader(dataset, batch_size=settings.batch_size, shuffle=True,
                             num_workers=workers, drop_last=True, persistent_workers=False,
                             generator=torch.Generator().manual_seed(settings.seed))
    start = time.perf_counter()
    images, shapes = 0, set()
    for batch in loader:
        images += batch[0].shape[0]
        shapes.add((tuple(batch[0].shape[1:]), tuple(batch[1].shape[1:])))
    seconds = time.perf_counter() - start
    rate = images / seconds
    (image_shape, label_shape), = shapes  # every sample is cropped to the same size
    return {"workers": workers, "images": images, "seconds": seconds, "images_per_s": rate,
            "images_per_s_per_worker": rate / max(workers, 1), "image_shape": list(image_shape),
            "label_shape": list(label_shape)}


def run_loader_benchmark(settings: LoaderBenchmark) -> dict:
    """Generate the images, measure (module docstring) and return the report as a dict."""
    settings.check()
    torch.manual_seed(settings.seed)
    with tempfile.TemporaryDirectory(prefix="css-loader-bench-", dir=settings.folder) as tmp:
        start = time.perf_counter()
        root = write_voc_images(os.path.join(tmp, "PascalVOC12"), settings)
        generated_s = time.perf_counter() - start
        dataset = VOCSegmentationIncremental(
            root, train=True, transform=transform.train_transform(settings.crop_size))
        per_image = _per_image_ms(dataset)
        loaders = [_loader_pass(dataset, settings, w) for w in settings.workers]
    per_worker = 1e3 / per_image["total"]
    report = {
        "settings": {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in asdict(settings).items() if k != "folder"},
        "generation_s": generated_s,
        "per_image_ms": per_image,
        "per_worker_images_per_s": per_worker,
        "loaders": loaders,
    }
    if settings.feed_images_per_s is not None:
        report["feed"] = {"images_per_s": settings.feed_images_per_s,
                          "workers_needed": math.ceil(settings.feed_images_per_s / per_worker)}
    return report


def format_report(report: dict) -> str:
    """The report as the lines ``scripts/benchmark.py --data`` prints."""
    s = report["settings"]
    ms = report["per_image_ms"]
    lines = [
        f"training data pipeline: {s['images']} JPEGs of {s['width']}x{s['height']} (quality "
        f"{s['quality']}), train transform to {s['crop_size']} px, batches of {s['batch_size']}",
        f"per image, one worker: decode {ms['decode']:.1f} ms + crop/flip/normalise "
        f"{ms['transform']:.1f} ms = {ms['total']:.1f} ms -> "
        f"{report['per_worker_images_per_s']:.1f} images/s per worker",
        f"{'workers':>8} {'images/s':>9} {'per worker':>11} {'seconds':>8}",
    ]
    for row in report["loaders"]:
        lines.append(f"{row['workers']:>8} {row['images_per_s']:>9.1f} "
                     f"{row['images_per_s_per_worker']:>11.1f} {row['seconds']:>8.2f}")
    if "feed" in report:
        feed = report["feed"]
        lines.append(f"to feed {feed['images_per_s']:.1f} images/s: {feed['workers_needed']} "
                     f"workers (one CPU core each)")
    return "\n".join(lines)
