"""Time the one-off class scan of a VOC-sized split.

``python -m dataset.scan_benchmark --out DIR [--n 10582] [--height 375] [--width 500]
[--workers 2]`` writes ``n`` generated palette masks of VOC's typical size (500x375, 1-4 objects
with a void border, as ``dataset.synthetic`` draws them) plus a ``splits/train_aug.txt`` list
into ``DIR`` (kept for later runs), then times ``scan_class_presence`` over them, the step every
new index folder pays once (``data/<dataset>/<task>[-ov]/classes-<split>.npy``).
"""

import argparse
import multiprocessing
import os
import time

import numpy as np
from PIL import Image

from .incremental import scan_class_presence
from .synthetic import STYLES, class_looks, render_scene, voc_palette


def _write_mask(job):
    out, index, height, width, seed = job
    rng = np.random.default_rng([seed, index])
    n_fg = STYLES["voc"].n_foreground
    classes = rng.integers(1, n_fg + 1, size=int(rng.integers(1, 5))).tolist()
    _, label, _ = render_scene(rng, height, width, classes, class_looks("voc"), True, paint=False)
    mask = Image.fromarray(label).convert("P")
    mask.putpalette(voc_palette())
    path = os.path.join(out, "SegmentationClassAug", f"bench_{index:06d}.png")
    mask.save(path)
    return path


def write_masks(out: str, n: int, height: int, width: int, workers: int, seed: int = 0) -> list:
    """Write (or reuse) ``n`` masks under ``out/SegmentationClassAug``; their paths in order."""
    os.makedirs(os.path.join(out, "SegmentationClassAug"), exist_ok=True)
    os.makedirs(os.path.join(out, "splits"), exist_ok=True)
    paths = [os.path.join(out, "SegmentationClassAug", f"bench_{i:06d}.png") for i in range(n)]
    todo = [(out, i, height, width, seed) for i, p in enumerate(paths) if not os.path.isfile(p)]
    if todo:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with context.Pool(max(1, workers)) as pool:
            for _ in pool.imap_unordered(_write_mask, todo, chunksize=64):
                pass
    with open(os.path.join(out, "splits", "train_aug.txt"), "w") as stream:
        for i in range(n):
            stream.write(f"/JPEGImages/bench_{i:06d}.jpg /SegmentationClassAug/bench_{i:06d}.png\n")
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dataset.scan_benchmark", description=__doc__)
    parser.add_argument("--out", required=True, help="folder for the generated masks (reused)")
    parser.add_argument("--n", type=int, default=10582, help="number of masks (VOC train_aug: 10582)")
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2, help="scan processes")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    paths = write_masks(args.out, args.n, args.height, args.width, args.workers)
    print(f"masks ready in {time.perf_counter() - start:.1f} s ({args.n} x {args.width}x{args.height})")

    start = time.perf_counter()
    presence = scan_class_presence(paths, n_classes=21, workers=args.workers)
    elapsed = time.perf_counter() - start
    print(
        f"scan of {len(paths)} masks with {args.workers} workers: {elapsed:.1f} s "
        f"({1e3 * elapsed / len(paths):.2f} ms per mask); "
        f"{int(presence[:, 1:21].any(axis=1).sum())} masks hold a foreground class"
    )


if __name__ == "__main__":
    main()
