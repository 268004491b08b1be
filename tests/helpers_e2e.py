"""Shared pieces of the end-to-end tests of ``run.py``: a tiny generated VOC tree (built once per
session), the common tiny command line, and an in-process runner.

Import what you need in a test module::

    from helpers_e2e import base_args, run_cli, tiny_voc  # noqa: F401  (tiny_voc is a fixture)

``run_cli`` calls ``run.main(argv)`` in this process with the working directory changed to ``cwd``,
so everything ``run.py`` writes relative to it (``checkpoints/step/``, ``logs/``, ``results/``, the
index caches under ``data/``) lands in the test's own folder.
"""
from __future__ import annotations

import datetime

import contextlib
import math
import os
import signal
from pathlib import Path

import pytest

TASK = "15-5"
DATASET = "voc"
TINY_TRAIN, TINY_VAL, TINY_SIZE = 48, 12, 64


# Test modules import ``tiny_voc`` (conftest.py stays untouched), and pytest then keeps one
# session fixture per importing module: this cache makes them share one generated tree.
_TREES: dict = {}


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory) -> str:
    """``--data_root`` of a generated VOC tree (MiB layout: the folder holding ``PascalVOC12/``)
    with 48 training and 12 validation images of 64 x 64 pixels, generated once per session."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _TREES:
        from dataset.synthetic import generate

        root = tmp_path_factory.mktemp("tiny_voc")
        generate(str(root / "PascalVOC12"), dataset=DATASET, num_train=TINY_TRAIN,
                 num_val=TINY_VAL, size=TINY_SIZE, seed=0, workers=1)
        _TREES[key] = str(root)
    return _TREES[key]


def base_args(root, name, method=None) -> list[str]:
    """The command line of a tiny 15-5 run: SegFormer-B0 from random weights, one epoch of 64-px
    crops, batches of 4, no worker processes and no progress bar. Append ``--step``, ``--epochs``
    etc. as needed (argparse keeps the last value of a repeated option)."""
    args = ["--data_root", str(root), "--task", TASK, "--model", "segformer_b0", "--no_pretrained",
            "--epochs", "1", "--batch_size", "4", "--crop_size", "64", "--num_workers", "0",
            "--no_progress", "--name", name, "--lr", "0.01", "--overlap"]
    if method is not None:
        args += ["--method", method]
    return args


@contextlib.contextmanager
def working_directory(path):
    """Run the body with ``path`` as the current directory (restored afterwards)."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield Path(path)
    finally:
        os.chdir(previous)


def run_cli(args, cwd, timeout=None, threads=1):
    """``run.main(args)`` with ``cwd`` as working directory; returns its list of per-step test
    scores (``StreamSegMetrics.get_results()`` dicts: ``"Mean IoU"``, ``"Class IoU"``, ...).

    ``timeout`` (seconds): a run still going after it is interrupted with ``TimeoutError``
    (SIGALRM, so only from the main thread, where pytest runs tests). ``threads``: torch's
    intra-op threads during the run (restored afterwards).
    """
    import run

    with working_directory(cwd), _torch_threads(threads), _alarm(timeout):
        return run.main([str(a) for a in args])


@contextlib.contextmanager
def _torch_threads(n):
    # On 64-px images the per-op work is tiny: extra threads only add synchronisation, and on a
    # shared two-core machine they made a one-epoch run up to ten times slower.
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _alarm(seconds):
    if not seconds:
        yield
        return

    def interrupt(signum, frame):
        raise TimeoutError(f"run.py did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(int(math.ceil(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def checkpoint_file(cwd, name, step, task=TASK, dataset=DATASET) -> Path:
    """The step checkpoint ``run.py`` writes under the default ``--checkpoint checkpoints/step``."""
    return Path(cwd) / "checkpoints" / "step" / f"{task}-{dataset}_{name}_{step}.pth"


def results_csv(cwd, name, task=TASK, dataset=DATASET, date=None) -> Path:
    """The results file ``results/{date}_{dataset}_{task}_{name}.csv`` of a run in ``cwd``
    (``--date`` defaults to today)."""
    date = str(datetime.date.today()) if date is None else date
    return Path(cwd) / "results" / f"{date}_{dataset}_{task}_{name}.csv"


def log_folder(cwd, name, task=TASK, dataset=DATASET) -> Path:
    """``logs/{task}-{dataset}/{name}/``: TensorBoard events and ``log.txt``."""
    return Path(cwd) / "logs" / f"{task}-{dataset}" / name
