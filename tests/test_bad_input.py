"""Every way a run can be given bad input ends the same way: one ``error: ...`` paragraph on stderr
naming the file or option and the fix, exit status 2, no traceback, and nothing left on disk (no
checkpoint folder, TensorBoard run, results row or temporary file) when the input could be checked
before training. Also the two cases that once gave a wrong score with exit status 0: a checkpoint
of another class order, and an unreadable test image replaced by another one.

Probes run through the real entry point (``utils.errors.run_cli(run.main, argv)``) in this process,
except where the interpreter itself matters (argument errors, the other command-line tools), which
run as subprocesses.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_e2e import base_args, checkpoint_file, log_folder, results_csv, run_cli, tiny_voc  # noqa: F401
from helpers_e2e import working_directory
from utils import errors

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--crop_size", "32"]
UNWRITABLE = "/proc/css-probe"  # not creatable even by root


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def probe(args, cwd, capsys):
    """``(exit status, stderr)`` of ``run.py ARGS`` run in ``cwd`` through its real entry point."""
    import run

    capsys.readouterr()
    with working_directory(cwd):
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            status = errors.run_cli(run.main, [str(a) for a in args])
        except SystemExit as exit_:  # argparse's own exit
            status = exit_.code
        finally:
            torch.set_num_threads(previous)
    return status, capsys.readouterr().err


def error_message(err):
    """The ``error: ...`` paragraph at the end of stderr (run-time errors print ``error: ``,
    argument errors ``prog: error: ``; a progress bar's carriage returns end a line)."""
    lines = err.replace("\r", "\n").rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ") or ": error: " in line]
    assert starts, err
    return "\n".join(lines[starts[-1]:])


def assert_user_error(status, err, *named):
    assert status == 2, err
    assert "Traceback" not in err, err
    message = error_message(err)
    for text in named:
        assert str(text) in message, f"{text!r} not in {message!r}"


def leftovers(cwd, data=False):
    """What a failed run may not leave in ``cwd``: its output folders and temporary files."""
    found = [name for name in ("checkpoints", "logs", "results") if (Path(cwd) / name).exists()]
    if data:
        found += ["data"] if (Path(cwd) / "data").exists() else []
    found += [str(p) for p in Path(cwd).rglob(".*.css-tmp-*")]
    return found


@pytest.fixture
def voc(tiny_voc, tmp_path):
    """A private copy of the tiny VOC tree (``--data_root``) that a test may damage."""
    root = tmp_path / "voc"
    shutil.copytree(tiny_voc, root)
    return root


@pytest.fixture(scope="module")
def step0(tiny_voc, tmp_path_factory):
    """A step-0 checkpoint of 15-5 fine-tuning (SegFormer-B0, 32-px crops)."""
    cwd = tmp_path_factory.mktemp("bad_input_step0")
    run_cli(base_args(tiny_voc, "ft") + SMALL + ["--step", "0"], cwd, timeout=300)
    return checkpoint_file(cwd, "ft", 0)


def split_lines(root, split):
    return (Path(root) / "PascalVOC12" / "splits" / f"{split}.txt").read_text().split("\n")


def mask_of(root, split, i):
    return Path(root) / "PascalVOC12" / split_lines(root, split)[i].split()[1].lstrip("/")


def image_of(root, split, i):
    return Path(root) / "PascalVOC12" / split_lines(root, split)[i].split()[0].lstrip("/")


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------
def test_an_argument_error_prints_the_short_usage_line_and_the_message():
    done = subprocess.run([sys.executable, "run.py", "--lr", "fast"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(lines) <= 3, done.stderr  # not the whole usage block
    assert lines[0].startswith("usage: run.py") and "--help" in done.stderr
    assert "argument --lr: invalid float value: 'fast'" in lines[-1]


def test_a_crop_too_small_for_segformer_names_the_minimum(voc, tmp_path, capsys):
    status, err = probe(base_args(voc, "crop") + ["--crop_size", "16"], tmp_path, capsys)
    assert_user_error(status, err, "--crop_size 16", "segformer_b0", "32")
    assert not leftovers(tmp_path, data=True)


# --------------------------------------------------------------------------------------------
# output folders
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["--checkpoint", "--logdir"])
def test_an_unwritable_output_folder_is_found_before_training(voc, tmp_path, capsys, option):
    status, err = probe(base_args(voc, "ro") + [option, UNWRITABLE], tmp_path, capsys)
    assert_user_error(status, err, option, UNWRITABLE)
    assert not leftovers(tmp_path, data=True)


def test_a_checkpoint_option_naming_a_file_is_refused(voc, tmp_path, capsys):
    (tmp_path / "ckpt.txt").write_text("a file, not a folder\n")
    status, err = probe(base_args(voc, "file") + ["--checkpoint", "ckpt.txt"], tmp_path, capsys)
    assert_user_error(status, err, "--checkpoint", "ckpt.txt")
    assert not leftovers(tmp_path, data=True)


def test_a_results_path_that_is_not_a_folder_is_found_before_training(voc, tmp_path, capsys):
    (tmp_path / "results").write_text("in the way\n")
    status, err = probe(base_args(voc, "res"), tmp_path, capsys)
    assert_user_error(status, err, "results")
    (tmp_path / "results").unlink()
    assert not leftovers(tmp_path, data=True)


def test_orphan_temporary_files_of_a_killed_run_are_removed_at_start(voc, tmp_path, capsys):
    folder = tmp_path / "checkpoints" / "step"
    folder.mkdir(parents=True)
    orphan = folder / ".15-5-voc_x_0.pth.css-tmp-0123456789ab"
    orphan.write_bytes(b"half a checkpoint")
    kept = folder / "notes.tmp"  # not the project's temp-name pattern
    kept.write_text("mine")
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    os.utime(kept, (old, old))
    status, err = probe(base_args(voc, "x") + ["--step", "1"], tmp_path, capsys)  # fails: no step 0
    assert status == 2
    assert not orphan.exists() and kept.exists()


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def test_a_missing_data_root_names_it(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    status, err = probe(base_args(missing, "nodata"), tmp_path, capsys)
    assert_user_error(status, err, str(missing))
    assert not leftovers(tmp_path, data=True)  # not even the index-cache folder


def test_a_missing_split_list_names_the_file(voc, tmp_path, capsys):
    (voc / "PascalVOC12" / "splits" / "val.txt").unlink()
    status, err = probe(base_args(voc, "nosplit"), tmp_path, capsys)
    assert_user_error(status, err, "val.txt")
    assert not leftovers(tmp_path)


def test_an_image_without_its_mask_names_the_mask(voc, tmp_path, capsys):
    mask = mask_of(voc, "train_aug", 3)
    mask.unlink()
    status, err = probe(base_args(voc, "nomask"), tmp_path, capsys)
    assert_user_error(status, err, mask.name)
    assert not leftovers(tmp_path)


def test_a_mask_value_outside_the_class_range_names_the_file_and_value(voc, tmp_path, capsys):
    mask = mask_of(voc, "train_aug", 5)
    values = np.array(Image.open(mask))
    values[0, 0] = 40
    Image.fromarray(values).save(mask)
    status, err = probe(base_args(voc, "mask40"), tmp_path, capsys)
    assert_user_error(status, err, mask.name, "40")
    assert not leftovers(tmp_path)


def test_a_validation_mask_of_another_size_is_found_by_the_scan_before_training(voc, tmp_path, capsys):
    mask = mask_of(voc, "val", 2)
    Image.open(mask).resize((48, 48), Image.NEAREST).save(mask)
    status, err = probe(base_args(voc, "valsize"), tmp_path, capsys)
    assert_user_error(status, err, mask.name)
    assert not leftovers(tmp_path)  # found before the first epoch: nothing was trained or logged


def test_a_batch_larger_than_the_training_set_names_the_option(voc, tmp_path, capsys):
    status, err = probe(base_args(voc, "big") + ["--batch_size", "64"], tmp_path, capsys)
    assert_user_error(status, err, "--batch_size")
    assert not leftovers(tmp_path)


# --------------------------------------------------------------------------------------------
# previous-step checkpoints
# --------------------------------------------------------------------------------------------
def test_a_missing_previous_checkpoint_names_the_path_and_step_ckpt(voc, tmp_path, capsys):
    status, err = probe(base_args(voc, "orphan") + ["--step", "1"], tmp_path, capsys)
    assert_user_error(status, err, "checkpoints/step/15-5-voc_orphan_0.pth", "--step_ckpt")
    assert not leftovers(tmp_path)


def test_a_checkpoint_of_another_class_count_names_both(voc, step0, tmp_path, capsys):
    args = base_args(voc, "other") + ["--task", "19-1", "--step", "1", "--step_ckpt", step0]
    status, err = probe(args, tmp_path, capsys)
    assert_user_error(status, err, str(step0), "[16]", "[20]")
    assert not leftovers(tmp_path)


def test_a_checkpoint_of_a_shuffled_class_order_is_refused(voc, step0, tmp_path, capsys):
    """Regression: same class counts (16 + 5) but other classes; it was accepted and scored."""
    args = base_args(voc, "shuffled") + ["--task", "15-5s_b", "--step", "1", "--step_ckpt", step0]
    status, err = probe(args, tmp_path, capsys)
    assert_user_error(status, err, str(step0), "task 15-5", "task 15-5s_b", "labels", "--allow_checkpoint_mismatch")
    assert not leftovers(tmp_path)


def test_allow_checkpoint_mismatch_accepts_it_and_logs_the_difference(voc, step0, tmp_path):
    args = base_args(voc, "meant") + SMALL + ["--task", "15-5s_b", "--step", "1", "--step_ckpt", step0,
                                               "--allow_checkpoint_mismatch"]
    run_cli(args, tmp_path, timeout=300)
    log = (log_folder(tmp_path, "meant", task="15-5s_b") / "log.txt").read_text()
    assert "--allow_checkpoint_mismatch: checkpoint" in log and "task 15-5" in log


def test_a_checkpoint_of_another_model_gives_one_line_naming_both(voc, step0, tmp_path, capsys):
    args = base_args(voc, "b1") + ["--model", "segformer_b1", "--step", "1", "--step_ckpt", step0]
    status, err = probe(args, tmp_path, capsys)
    assert_user_error(status, err, "segformer_b0", "segformer_b1")
    assert len(error_message(err).splitlines()) == 1, err  # not hundreds of shape mismatches
    assert not leftovers(tmp_path)


def test_a_truncated_checkpoint_names_the_file(voc, step0, tmp_path, capsys):
    bad = tmp_path / "truncated.pth"
    data = step0.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    status, err = probe(base_args(voc, "cut") + ["--step", "1", "--step_ckpt", bad], tmp_path, capsys)
    assert_user_error(status, err, str(bad), "truncated or corrupt")
    assert not leftovers(tmp_path)


def test_a_test_only_run_without_its_checkpoint_names_ckpt(voc, tmp_path, capsys):
    status, err = probe(base_args(voc, "t") + ["--test", "--ckpt", tmp_path / "none.pth"], tmp_path, capsys)
    assert_user_error(status, err, "none.pth", "--ckpt")
    assert not leftovers(tmp_path)


def test_resuming_from_a_missing_checkpoint_names_it_before_anything_is_created(voc, tmp_path, capsys):
    status, err = probe(base_args(voc, "res") + ["--ckpt", tmp_path / "gone.pth"], tmp_path, capsys)
    assert_user_error(status, err, "--ckpt", "gone.pth")
    assert not leftovers(tmp_path)


def test_resuming_from_a_checkpoint_of_another_class_order_is_refused(voc, step0, tmp_path, capsys):
    args = base_args(voc, "res") + ["--task", "15-5s_b", "--step", "0", "--ckpt", step0]
    status, err = probe(args, tmp_path, capsys)
    assert_user_error(status, err, str(step0), "labels")
    assert not leftovers(tmp_path)


# --------------------------------------------------------------------------------------------
# unreadable samples: left out, counted, reported; never replaced
# --------------------------------------------------------------------------------------------
def _truncate_jpeg(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_an_unreadable_test_image_is_left_out_and_reported_not_replaced(voc, step0, tmp_path, capsys):
    """Regression: it was replaced by sample 0, which was then scored twice."""
    broken = image_of(voc, "val", 4)
    _truncate_jpeg(broken)
    args = base_args(voc, "skip") + ["--test", "--ckpt", step0, "--step", "0"]
    capsys.readouterr()
    score = run_cli(args, tmp_path)[0]
    out = capsys.readouterr().out
    assert f"test: 1 image skipped: {broken}" in out

    # the score is that of the list without the image (nothing counted twice)
    clean = tmp_path / "clean"
    shutil.copytree(voc, clean)
    val = clean / "PascalVOC12" / "splits" / "val.txt"
    val.write_text("\n".join(line for line in val.read_text().split("\n") if broken.name not in line))
    (tmp_path / "ref_cwd").mkdir()
    reference = run_cli(base_args(clean, "ref") + ["--test", "--ckpt", step0, "--step", "0"], tmp_path / "ref_cwd")[0]
    assert score["Mean IoU"] == reference["Mean IoU"]
    np.testing.assert_array_equal(score["Confusion Matrix"], reference["Confusion Matrix"])

    log = (log_folder(tmp_path, "skip") / "log.txt").read_text()
    assert str(broken) in log
    info = json.loads(results_csv(tmp_path, "skip").with_suffix(".json").read_text())
    assert str(broken) in json.dumps(info)


def test_an_unreadable_training_image_is_skipped_and_reported_in_log_and_json(voc, tmp_path, capsys):
    broken = image_of(voc, "train_aug", 7)
    _truncate_jpeg(broken)
    run_cli(base_args(voc, "trainskip") + SMALL + ["--step", "0"], tmp_path, timeout=300)
    log = (log_folder(tmp_path, "trainskip") / "log.txt").read_text()
    assert str(broken) in log
    info = json.loads(results_csv(tmp_path, "trainskip").with_suffix(".json").read_text())
    assert str(broken) in json.dumps(info)
    events = list(log_folder(tmp_path, "trainskip").glob("events.out.tfevents.*"))
    assert events


def test_more_unreadable_samples_than_allowed_is_an_error_naming_the_option(voc, step0, tmp_path, capsys):
    for i in (1, 2):
        _truncate_jpeg(image_of(voc, "val", i))
    args = base_args(voc, "flood") + ["--test", "--ckpt", step0, "--step", "0", "--max_skipped_samples", "1"]
    status, err = probe(args, tmp_path, capsys)
    assert_user_error(status, err, "--max_skipped_samples", image_of(voc, "val", 1).name)
    assert not (tmp_path / "results").exists()  # no results row for a shrunken test set


# --------------------------------------------------------------------------------------------
# divergence, debugging, internal errors
# --------------------------------------------------------------------------------------------
def test_a_diverging_run_does_not_advise_the_opt_level_it_already_uses(voc, tmp_path, capsys):
    args = base_args(voc, "hot") + SMALL + ["--lr", "1e6", "--max_nan_skips", "0", "--opt_level", "O0"]
    status, err = probe(args, tmp_path, capsys)
    assert_user_error(status, err, "--max_nan_skips", "--lr")
    assert "--opt_level O0" not in err
    assert not checkpoint_file(tmp_path, "hot", 0).exists()


def test_css_debug_shows_the_traceback_of_a_user_error(voc, tmp_path, monkeypatch):
    import run

    monkeypatch.setenv("CSS_DEBUG", "1")
    with working_directory(tmp_path), pytest.raises(FileNotFoundError, match="--step_ckpt"):
        errors.run_cli(run.main, [str(a) for a in base_args(voc, "dbg") + ["--step", "1"]])


def test_an_internal_error_keeps_its_traceback():
    def buggy():
        return {}["missing"]

    with pytest.raises(KeyError):
        errors.run_cli(buggy)


def test_a_value_error_raised_inside_a_library_is_not_taken_for_a_user_error():
    with pytest.raises(json.JSONDecodeError):  # a ValueError, raised in the json module
        errors.run_cli(lambda: json.loads("{"))


# --------------------------------------------------------------------------------------------
# the other command-line tools
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, named", [
    (["average_csv.py", "missing.csv"], "missing.csv"),
    (["-m", "utils.visualize", "curves", "--csv", "missing.csv", "--out", "plots"], "missing.csv"),
    (["-m", "dataset.synthetic", "--dataset", "coco"], "--dataset"),
    (["scripts/benchmark.py", "--methods", "Foo"], "Foo"),
    (["scripts/synth/compare.py", "--methods", "Foo", "--dry_run"], "Foo"),
])
def test_the_other_tools_report_mistakes_as_one_error_line(command, named, tmp_path):
    done = subprocess.run([sys.executable] + command, cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, CSS_DEBUG="0"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3, done.stderr
    assert named in done.stderr


# --------------------------------------------------------------------------------------------
# distributed
# --------------------------------------------------------------------------------------------
def _silent_peer_worker(rank, port, queue):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "CSS_DIST_TIMEOUT": "3", "CUDA_VISIBLE_DEVICES": ""})
    os.environ.pop("LOCAL_RANK", None)
    import argparse
    import io

    from utils import distributed

    distributed.init_distributed(argparse.Namespace(local_rank=rank))
    if rank == 1:
        time.sleep(8)  # a rank that stopped answering
        queue.put((rank, 0, ""))
        return
    stream = io.StringIO()
    try:
        distributed.all_reduce_sum(torch.ones(1))
        queue.put((rank, 0, "the collective returned"))
    except Exception as error:  # noqa: BLE001 - what the entry point would print
        try:
            status = errors.report(error, stream)
        except Exception as raw:  # noqa: BLE001
            status, stream = 1, io.StringIO(f"raw: {raw}")
        queue.put((rank, status, stream.getvalue()))


def test_a_rank_that_stops_answering_is_reported_with_the_timeout_variable():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_silent_peer_worker, args=(port, queue), nprocs=2, start_method="spawn", join=False)
    outputs = dict((rank, (status, text)) for rank, status, text in (queue.get() for _ in range(2)))
    status, text = outputs[0]
    assert status == 2, text
    assert text.startswith("error: rank 0:") and "CSS_DIST_TIMEOUT=3" in text, text
