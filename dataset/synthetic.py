"""A generated stand-in for Pascal-VOC / ADE20K, written in the real layouts the loaders read.

``python -m dataset.synthetic --out DIR [--dataset voc|ade] [--num_train N] [--num_val N]
[--size S] [--seed K] [--workers W]``

VOC layout (``DIR`` is the VOC folder, SATS style): ``JPEGImages/<id>.jpg``,
``SegmentationClassAug/<id>.png`` (palette PNG, VOC palette, 0 background, 1..20 objects, 255 on
object borders), ``saliency_map/<id>.png`` (0/255 foreground), ``splits/train_aug.txt`` and
``splits/val.txt``. ADE layout (``DIR`` is ``ADEChallengeData2016``): ``images/{training,validation}``,
``annotations/...`` (grayscale PNG, 0..150, no void), ``saliency_map/...``. ``SYNTHETIC.json``
records the parameters.

Scenes: a smooth, low-saturation, noisy background (class 0) and 1-4 objects drawn back to front,
so later objects occlude earlier ones (old classes stay visible in the images of new steps, the
background shift of incremental segmentation). Class ``k`` (``j = k - 1``) has a fixed look

    colour = j mod C,   b = j div C,   shape = (colour + b) mod S,   texture = (colour + b) mod 3,

with C colours evenly spaced in hue (VOC: C = 10, S = 5; ADE: C = 25, S = 6), so two classes
share a colour only with different shapes; instances jitter hue (±5°), saturation, value, size,
aspect, rotation and position. Objects have a radius of 16-30 % of the image side (>= 20 px at
128 px) so colour and shape stay readable at low resolution. Every class is the top-most object
of at least ``floor(N / K)`` images of each split (K foreground classes), so every step of the
VOC 15-5 / 15-1 protocols has training images.

Everything is drawn with vectorised numpy from ``numpy.random.default_rng([seed, split, index])``:
the tree depends only on the arguments, not on the number of worker processes.
"""

from __future__ import annotations

import colorsys
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

SHAPES = ("ellipse", "rectangle", "triangle", "cross", "ring", "diamond")
TEXTURES = ("solid", "stripes", "checker")
MARKER = "SYNTHETIC.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class DatasetStyle:
    """Class count and look of a generated dataset."""

    n_foreground: int
    n_colours: int
    n_shapes: int
    void_border: bool


STYLES = {
    "voc": DatasetStyle(n_foreground=20, n_colours=10, n_shapes=5, void_border=True),
    "ade": DatasetStyle(n_foreground=150, n_colours=25, n_shapes=6, void_border=False),
}


@dataclass(frozen=True)
class ClassLook:
    shape: int
    texture: int
    hue: float  # in [0, 1)


def class_looks(dataset: str) -> list:
    """``looks[k - 1]`` is the ``ClassLook`` of foreground class ``k`` (module docstring)."""
    style = STYLES[dataset]
    looks = []
    for j in range(style.n_foreground):
        colour, block = j % style.n_colours, j // style.n_colours
        looks.append(
            ClassLook(
                shape=(colour + block) % style.n_shapes,
                texture=(colour + block) % len(TEXTURES),
                hue=colour / style.n_colours,
            )
        )
    return looks


def voc_palette() -> list:
    """The 256-colour VOC palette (flat RGB list): bits of the index spread over R, G, B."""
    palette = []
    for index in range(256):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette += [r, g, b]
    return palette


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in object coordinates ``(u, v)`` normalised by the object radius."""
    name = SHAPES[shape]
    if name == "ellipse":
        return u**2 + (v / 0.6) ** 2 <= 1.0
    if name == "rectangle":
        return (np.abs(u) <= 0.95) & (np.abs(v) <= 0.55)
    if name == "triangle":
        return (v >= -0.5) & (np.abs(u) <= (1.0 - v) / np.sqrt(3.0))
    if name == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if name == "ring":
        radius = np.sqrt(u**2 + v**2)
        return (radius >= 0.55) & (radius <= 1.0)
    return np.abs(u) + np.abs(v) <= 1.0  # diamond


def _texture_factor(texture: int, u_px: np.ndarray, v_px: np.ndarray, period: float) -> np.ndarray:
    """Brightness multiplier of a texture, in pixel units of the object's rotated frame."""
    name = TEXTURES[texture]
    if name == "stripes":
        return np.where(np.sin(2 * np.pi * u_px / period) > 0, 1.0, 0.55)
    if name == "checker":
        cells = np.floor(u_px / period) + np.floor(v_px / period)
        return np.where(cells % 2 == 0, 1.0, 0.55)
    return np.ones_like(u_px)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-saturation colour field with a few random gratings: ``(H, W, 3)`` float32 in [0, 255].

    A grating ``sin(a·x + b·y + c)`` is evaluated as ``sin(a·x)·cos(b·y + c) + cos(a·x)·sin(b·y + c)``,
    outer products of a row and a column, instead of on the full grid.
    """
    x = np.arange(width, dtype=np.float32)
    y = np.arange(height, dtype=np.float32)[:, None]
    field = np.zeros((height, width), dtype=np.float32)
    for _ in range(3):
        angle = rng.uniform(0, np.pi)
        frequency = 2 * np.pi / (rng.uniform(0.25, 1.0) * max(height, width))
        phase = rng.uniform(0, 2 * np.pi)
        along_x = frequency * np.cos(angle) * x
        along_y = frequency * np.sin(angle) * y + phase
        field += np.sin(along_x) * np.cos(along_y) + np.cos(along_x) * np.sin(along_y)
    hsv = (rng.uniform(), rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.7))
    base = 255.0 * np.array(colorsys.hsv_to_rgb(*hsv), dtype=np.float32)
    tint = np.array(colorsys.hsv_to_rgb(rng.uniform(), 0.2, 1.0), dtype=np.float32) + 0.5
    image = base + (0.08 * 255.0) * field[..., None] * tint
    return np.clip(image, 0.0, 255.0, out=image)


def render_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    classes: list,
    looks: list,
    void_border: bool,
    paint: bool = True,
):
    """Draw one scene; ``classes`` are drawn in order (the last one on top).

    Returns ``(image uint8 (H,W,3), label uint8 (H,W), saliency uint8 (H,W) in {0, 255})``;
    ``paint=False`` draws only the label maps (image ``None``, e.g. to time the mask scan).
    Each object is evaluated only inside its bounding square (radius · stretch · 1.25).
    """
    image = _background(rng, height, width) if paint else None
    label = np.zeros((height, width), dtype=np.uint8)
    side = min(height, width)
    period = max(3.0, side / 18.0)
    for k in classes:
        look = looks[k - 1]
        radius = rng.uniform(0.16, 0.30) * side
        stretch = rng.uniform(0.8, 1.25)
        angle = rng.uniform(0, 2 * np.pi)
        cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
        reach = radius * max(stretch, 1.0 / stretch) * 1.25
        top, bottom = max(0, int(cy - reach)), min(height, int(np.ceil(cy + reach)) + 1)
        left, right = max(0, int(cx - reach)), min(width, int(np.ceil(cx + reach)) + 1)
        dy = np.arange(top, bottom, dtype=np.float32)[:, None] - cy
        dx = np.arange(left, right, dtype=np.float32)[None, :] - cx
        u_px = dx * np.cos(angle) + dy * np.sin(angle)
        v_px = -dx * np.sin(angle) + dy * np.cos(angle)
        inside = _shape_mask(look.shape, u_px / (radius * stretch), v_px / (radius / stretch))
        hue = (look.hue + rng.uniform(-5, 5) / 360.0) % 1.0
        colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)))
        box = (slice(top, bottom), slice(left, right))
        label[box][inside] = k
        if paint:
            shading = _texture_factor(look.texture, u_px, v_px, period)
            image[box][inside] = 255.0 * colour[None, :] * shading[inside][:, None]
    saliency = np.where(label > 0, 255, 0).astype(np.uint8)
    if void_border:
        label = _with_void_border(label)
    if not paint:
        return None, label, saliency
    image += 20.0 * (rng.random(size=image.shape, dtype=np.float32) - 0.5)  # uniform, std 5.8
    return np.clip(image, 0, 255, out=image).astype(np.uint8), label, saliency


def _with_void_border(label: np.ndarray) -> np.ndarray:
    """255 on every pixel with a 4-neighbour of another class: a 2-px band on each border."""
    edge = np.zeros(label.shape, dtype=bool)
    vertical = label[1:, :] != label[:-1, :]
    horizontal = label[:, 1:] != label[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return np.where(edge, 255, label).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Scene plans and files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenePlan:
    """What one image shows: file stem, split index, image index, classes in drawing order."""

    stem: str
    split_id: int
    index: int
    classes: tuple


def plan_split(dataset: str, split_id: int, count: int, seed: int, prefix: str) -> list:
    """Balanced class plans: the top class of image ``i`` cycles through a seeded permutation."""
    n_fg = STYLES[dataset].n_foreground
    rng = np.random.default_rng([seed, split_id, 2**31 - 1])
    tops = np.concatenate([rng.permutation(np.arange(1, n_fg + 1)) for _ in range(count // n_fg + 1)])
    plans = []
    for i in range(count):
        n_objects = int(rng.integers(1, 5))
        others = rng.integers(1, n_fg + 1, size=n_objects - 1).tolist()
        plans.append(ScenePlan(f"{prefix}{i:06d}", split_id, i, tuple(others + [int(tops[i])])))
    return plans


@dataclass(frozen=True)
class TreePaths:
    """Folders of one split in the target layout."""

    images: str
    masks: str
    saliency: str


def _render_and_save(job):
    plan, dataset, size, seed, paths = job
    rng = np.random.default_rng([seed, plan.split_id, plan.index])
    width = size + 2 * int(rng.integers(0, size // 6 + 1))
    style = STYLES[dataset]
    image, label, saliency = render_scene(
        rng, size, width, list(plan.classes), class_looks(dataset), style.void_border
    )
    Image.fromarray(image).save(os.path.join(paths.images, plan.stem + ".jpg"), quality=92)
    mask = Image.fromarray(label)
    if dataset == "voc":
        mask = mask.convert("P")
        mask.putpalette(voc_palette())
    mask.save(os.path.join(paths.masks, plan.stem + ".png"))
    Image.fromarray(saliency).save(os.path.join(paths.saliency, plan.stem + ".png"))
    return plan.stem


def _split_layout(root: str, dataset: str, train: bool) -> TreePaths:
    if dataset == "voc":
        return TreePaths(
            os.path.join(root, "JPEGImages"),
            os.path.join(root, "SegmentationClassAug"),
            os.path.join(root, "saliency_map"),
        )
    split = "training" if train else "validation"
    return TreePaths(
        os.path.join(root, "images", split),
        os.path.join(root, "annotations", split),
        os.path.join(root, "saliency_map", split),
    )


def _write_voc_split_list(root: str, train: bool, plans: list) -> None:
    folder = os.path.join(root, "splits")
    os.makedirs(folder, exist_ok=True)
    name = "train_aug.txt" if train else "val.txt"
    with open(os.path.join(folder, name), "w") as stream:
        for plan in plans:
            stream.write(f"/JPEGImages/{plan.stem}.jpg /SegmentationClassAug/{plan.stem}.png\n")


def _run_jobs(jobs: list, workers: int) -> None:
    if workers <= 1 or len(jobs) < 32:
        for job in jobs:
            _render_and_save(job)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with context.Pool(workers) as pool:
        for _ in pool.imap_unordered(_render_and_save, jobs, chunksize=16):
            pass


def _write_tree(root: str, dataset: str, num_train: int, num_val: int, size: int, seed: int,
                workers: int) -> None:
    jobs = []
    for split_id, train, count in ((0, True, num_train), (1, False, num_val)):
        if dataset == "voc":
            prefix = "synth_train_" if train else "synth_val_"
        else:
            prefix = "ADE_train_" if train else "ADE_val_"
        plans = plan_split(dataset, split_id, count, seed, prefix)
        paths = _split_layout(root, dataset, train)
        for folder in (paths.images, paths.masks, paths.saliency):
            os.makedirs(folder, exist_ok=True)
        if dataset == "voc":
            _write_voc_split_list(root, train, plans)
        jobs += [(plan, dataset, size, seed, paths) for plan in plans]
    _run_jobs(jobs, workers)
    parameters = dict(
        format=FORMAT_VERSION, dataset=dataset, num_train=num_train, num_val=num_val, size=size,
        seed=seed,
    )
    with open(os.path.join(root, MARKER), "w") as stream:
        json.dump(parameters, stream, indent=1)


def _check_arguments(dataset: str, num_train: int, num_val: int, size: int) -> None:
    if dataset not in STYLES:
        raise ValueError(f"dataset={dataset!r}; choose one of {sorted(STYLES)}")
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    if size < 32:
        raise ValueError(f"size={size}: images under 32 px leave objects too small to learn")


def generate(out: str, dataset: str = "voc", num_train: int = 1000, num_val: int = 200,
             size: int = 128, seed: int = 0, workers: int = 2) -> str:
    """Write a generated tree at ``out`` (which must not exist, or be an empty folder).

    The tree is written into a temporary sibling folder and renamed into place, so ``out`` is
    either absent or complete. Returns ``out``.
    """
    _check_arguments(dataset, num_train, num_val, size)
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a folder")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-")
    try:
        _write_tree(staging, dataset, num_train, num_val, size, seed, workers)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def ensure_demo_tree(path: str, dataset: str = "voc", num_train: int = 1000, num_val: int = 200,
                     size: int = 128, seed: int = 0, workers: int = 2) -> str:
    """Generate the tree at ``path`` unless a generated tree is already there; returns ``path``.

    Idempotent and safe when several processes call it at once: the first complete rename wins
    and the others keep that tree. A non-empty ``path`` that is not a generated tree is an error.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, MARKER)):
        return path
    try:
        return generate(path, dataset, num_train, num_val, size, seed, workers)
    except OSError:
        if os.path.isfile(os.path.join(path, MARKER)):  # another process finished first
            return path
        raise


def main(argv=None) -> None:
    from utils.errors import ArgumentParser

    parser = ArgumentParser(
        prog="python -m dataset.synthetic",
        description="Write a generated VOC- or ADE-layout dataset that the real loaders read.",
    )
    parser.add_argument("--out", required=True, help="folder to create (the VOC / ADEChallengeData2016 root)")
    parser.add_argument("--dataset", choices=sorted(STYLES), default="voc")
    parser.add_argument("--num_train", type=int, default=1000)
    parser.add_argument("--num_val", type=int, default=200)
    parser.add_argument("--size", type=int, default=128, help="image height in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes drawing the images")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = generate(args.out, args.dataset, args.num_train, args.num_val, args.size, args.seed,
                   args.workers)
    print(f"wrote {args.num_train} + {args.num_val} {args.dataset} images of height {args.size} "
          f"to {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    from utils.errors import run_cli

    sys.exit(run_cli(main))
