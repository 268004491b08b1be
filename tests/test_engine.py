"""End-to-end tests of the engine (``run.py`` + ``train.py``) on a tiny generated VOC tree:
the files a two-step run leaves behind, test-only evaluation, resuming, CPU mixed precision,
preset overrides in the log, and a clear error for each kind of bad input.

Runs are in-process (``helpers_e2e.run_cli``) with SegFormer-B0 from random weights on 64-px images
(32-px crops where the numbers do not matter), one thread, no DataLoader workers.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from helpers_e2e import base_args, checkpoint_file, log_folder, results_csv, run_cli, tiny_voc  # noqa: F401
from utils.results import read_results

ROOT = Path(__file__).resolve().parents[1]
N_CLASSES = 21  # VOC, background included
STEP0_SEEN = 16  # 15-5: background + 15 base classes
CHECKPOINT_KEYS = {"epoch", "model_state", "optimizer_state", "scheduler_state", "scaler_state",
                   "best_score", "trainer_state", "classes", "opts"}
SMALL = ["--crop_size", "32"]  # runs whose scores are not compared with anything outside the test


def class_iou_list(score):
    return [score["Class IoU"][c] for c in sorted(score["Class IoU"])]


def assert_same_score(a, b):
    assert a["Mean IoU"] == b["Mean IoU"]
    np.testing.assert_array_equal(class_iou_list(a), class_iou_list(b))  # NaN == NaN here


@pytest.fixture(scope="module")
def ft_run(tiny_voc, tmp_path_factory):
    """Steps 0 and 1 of 15-5 fine-tuning in one invocation (the default checkpoint folder)."""
    cwd = tmp_path_factory.mktemp("ft_run")
    scores = run_cli(base_args(tiny_voc, "ft") + ["--step", "0", "1"], cwd, timeout=300)
    return {"cwd": cwd, "scores": scores, "root": tiny_voc}


# --------------------------------------------------------------------------------------------
# 1. what a two-step run writes
# --------------------------------------------------------------------------------------------
def test_two_step_run_writes_both_step_checkpoints_with_the_documented_keys(ft_run):
    for step, classes in ((0, [16]), (1, [16, 5])):
        path = checkpoint_file(ft_run["cwd"], "ft", step)
        assert path.name == f"15-5-voc_ft_{step}.pth"
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert CHECKPOINT_KEYS <= set(ckpt)
        assert ckpt["classes"] == classes
        assert ckpt["epoch"] == 0  # one epoch, index 0
        assert ckpt["opts"]["task"] == "15-5" and ckpt["opts"]["name"] == "ft"
        assert ckpt["scaler_state"] is None  # no GradScaler on the CPU
        assert ckpt["trainer_state"]["nan_skips"] == 0
        assert ckpt["trainer_state"]["global_iter"] > 0
        assert all(torch.isfinite(t).all() for t in ckpt["model_state"].values() if t.is_floating_point())
        n_outputs = sum(classes)
        assert ckpt["model_state"][f"cls.{len(classes) - 1}.weight"].shape[0] == classes[-1]
        assert sum(ckpt["model_state"][f"cls.{i}.weight"].shape[0] for i in range(len(classes))) == n_outputs


def test_two_step_run_writes_one_results_row_per_step_with_x_for_unseen_classes(ft_run):
    header, rows = read_results(results_csv(ft_run["cwd"], "ft"))
    assert header == ["step", *map(str, range(N_CLASSES)), "mIoU"]
    assert [row[0] for row in rows] == ["0", "1"]
    for row, score, n_seen in zip(rows, ft_run["scores"], (STEP0_SEEN, N_CLASSES)):
        cells = row[1:-1]
        assert cells[n_seen:] == ["x"] * (N_CLASSES - n_seen)
        assert "x" not in cells[:n_seen]
        written = [math.nan if c == "X" else float(c) for c in cells[:n_seen]]
        np.testing.assert_array_equal(written, class_iou_list(score))
        assert float(row[-1]) == score["Mean IoU"]
        assert 0.0 <= score["Mean IoU"] <= 1.0

    info = json.loads(results_csv(ft_run["cwd"], "ft").with_suffix(".json").read_text())
    assert sorted(info["steps"]) == ["0", "1"]
    assert info["steps"]["1"]["world_size"] == 1
    assert info["steps"]["1"]["global_batch_size"] == 4


def test_two_step_run_writes_tensorboard_events_and_a_text_log(ft_run):
    folder = log_folder(ft_run["cwd"], "ft")
    events = sorted(folder.glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file in {folder}"
    content = b"".join(path.read_bytes() for path in events)
    # tags are stored as plain strings in the event protobuf; the /step suffix separates steps
    for tag in (b"Test/MeanIoU/0", b"Test/MeanIoU/1", b"Val/MeanIoU/0", b"Train/ce/1"):
        assert tag in content
    log = (folder / "log.txt").read_text()
    assert "Loaded step 0 weights from checkpoints/step/15-5-voc_ft_0.pth" in log
    assert "Mean IoU" in log  # the full test metrics go to the text log


# --------------------------------------------------------------------------------------------
# 2. test-only evaluation
# --------------------------------------------------------------------------------------------
def test_test_only_run_reproduces_the_end_of_step_scores_and_replaces_its_row(ft_run):
    cwd, csv_path = ft_run["cwd"], results_csv(ft_run["cwd"], "ft")
    original = csv_path.read_text()
    header, rows = read_results(csv_path)
    rows[1][-1] = "0.5"  # a stale row for step 1 that the test run must replace, not duplicate
    csv_path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")

    ckpt = checkpoint_file(cwd, "ft", 1)
    scores = run_cli(base_args(ft_run["root"], "ft")
                     + ["--step", "1", "--test", "--ckpt", str(ckpt)], cwd, timeout=120)

    assert len(scores) == 1
    assert_same_score(scores[0], ft_run["scores"][1])
    assert csv_path.read_text() == original


# --------------------------------------------------------------------------------------------
# 3. resuming
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_epoch_run(tiny_voc, tmp_path_factory):
    """An uninterrupted two-epoch step-0 run: the reference of the resume tests."""
    cwd = tmp_path_factory.mktemp("straight")
    scores = run_cli(base_args(tiny_voc, "resume") + SMALL + ["--step", "0", "--epochs", "2"], cwd,
                     timeout=300)
    ckpt = torch.load(checkpoint_file(cwd, "resume", 0), weights_only=True)
    return {"ckpt": ckpt, "score": scores[0]}


def assert_same_training_state(resumed, straight):
    assert resumed["epoch"] == straight["epoch"] == 1
    assert resumed["model_state"].keys() == straight["model_state"].keys()
    for key, tensor in straight["model_state"].items():
        assert torch.equal(resumed["model_state"][key], tensor), key
    momentum = [s["momentum_buffer"] for s in straight["optimizer_state"]["state"].values()]
    resumed_momentum = [s["momentum_buffer"] for s in resumed["optimizer_state"]["state"].values()]
    assert len(momentum) == len(resumed_momentum) > 0
    assert all(torch.equal(a, b) for a, b in zip(resumed_momentum, momentum))
    assert resumed["scheduler_state"] == straight["scheduler_state"]
    assert resumed["trainer_state"] == straight["trainer_state"]


def test_stop_after_epochs_then_resume_equals_an_uninterrupted_run(tiny_voc, tmp_path, two_epoch_run):
    args = base_args(tiny_voc, "resume") + SMALL + ["--step", "0", "--epochs", "2"]
    with pytest.raises(SystemExit) as stopped:
        run_cli(args + ["--stop_after_epochs", "1"], tmp_path, timeout=300)
    assert stopped.value.code == 0
    ckpt_path = checkpoint_file(tmp_path, "resume", 0)
    assert torch.load(ckpt_path, weights_only=True)["epoch"] == 0
    assert not results_csv(tmp_path, "resume").exists()  # stopped before the test

    scores = run_cli(args + ["--ckpt", str(ckpt_path)], tmp_path, timeout=300)

    assert_same_training_state(torch.load(ckpt_path, weights_only=True), two_epoch_run["ckpt"])
    assert_same_score(scores[0], two_epoch_run["score"])
    assert f"Resuming from {ckpt_path} at epoch 2" in (log_folder(tmp_path, "resume") / "log.txt").read_text()


def test_resume_after_a_sigkill_during_the_second_epoch_equals_an_uninterrupted_run(
        tiny_voc, tmp_path, two_epoch_run):
    args = base_args(tiny_voc, "resume") + SMALL + ["--step", "0", "--epochs", "2"]
    ckpt_path = checkpoint_file(tmp_path, "resume", 0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(tmp_path / "killed.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            # The file appears (atomically) after the first epoch's validation; the second epoch
            # takes about a second, so polling every 20 ms kills the run in the middle of it.
            while not ckpt_path.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=60)
    output = (tmp_path / "killed.out").read_text(errors="replace")
    assert ckpt_path.exists(), output
    assert proc.returncode == -signal.SIGKILL, output  # killed, not finished
    assert torch.load(ckpt_path, weights_only=True)["epoch"] == 0, output

    run_cli(args + ["--ckpt", str(ckpt_path)], tmp_path, timeout=300)

    assert_same_training_state(torch.load(ckpt_path, weights_only=True), two_epoch_run["ckpt"])


# --------------------------------------------------------------------------------------------
# 4. mixed precision on the CPU
# --------------------------------------------------------------------------------------------
def test_opt_level_o1_on_the_cpu_trains_under_bfloat16_autocast_with_finite_results(
        tiny_voc, tmp_path, monkeypatch):
    dtypes = []
    real_autocast = train.autocast

    def recording_autocast(device, dtype):
        dtypes.append(dtype)
        return real_autocast(device, dtype)

    monkeypatch.setattr(train, "autocast", recording_autocast)
    scores = run_cli(base_args(tiny_voc, "amp") + SMALL + ["--step", "0", "--opt_level", "O1"], tmp_path,
                     timeout=300)

    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert math.isfinite(scores[0]["Mean IoU"]) and math.isfinite(scores[0]["Overall Acc"])
    ckpt = torch.load(checkpoint_file(tmp_path, "amp", 0), weights_only=True)
    assert ckpt["scaler_state"] is None  # bf16 needs no loss scaling
    assert ckpt["trainer_state"]["nan_skips"] == 0
    assert all(t.dtype != torch.bfloat16 for t in ckpt["model_state"].values())  # weights stay fp32
    assert all(torch.isfinite(t).all() for t in ckpt["model_state"].values() if t.is_floating_point())


# --------------------------------------------------------------------------------------------
# 5. a command-line value that beats a preset is logged
# --------------------------------------------------------------------------------------------
def test_an_explicit_option_beating_the_method_preset_is_logged(ft_run, tmp_path, capsys):
    root = ft_run["root"]
    step0 = checkpoint_file(ft_run["cwd"], "ft", 0)
    run_cli(base_args(root, "mib", method="MiB") + ["--loss_kd", "10", "--step", "0", "--test",
                                                    "--ckpt", str(step0)], tmp_path, timeout=120)

    message = "preset MiB sets loss_kd=40; using 10 from the command line"
    assert message in capsys.readouterr().err
    assert message in (log_folder(tmp_path, "mib") / "log.txt").read_text()
    run_info = json.loads(results_csv(tmp_path, "mib").with_suffix(".json").read_text())
    options = run_info["steps"]["0"]["options"]
    assert options["loss_kd"] == 10 and options["unkd"] is True  # the rest of the preset still applies


# --------------------------------------------------------------------------------------------
# 6. bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--method", "Foo"], "unknown method 'Foo'; valid methods"),
    (["--task", "foo"], "unknown task 'foo' for dataset 'voc'"),
    (["--dataset", "coco"], "argument --dataset: invalid choice: 'coco'"),
    (["--step", "2"], "step 2 is out of range for task '15-5' on 'voc': valid steps are 0..1"),
    (["--opt_level", "O4"], "argument --opt_level: invalid choice: 'O4'"),
])
def test_bad_options_stop_with_an_argparse_error_naming_them(tiny_voc, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as error:
        run_cli(base_args(tiny_voc, "bad") + extra, tmp_path)
    assert error.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()  # refused before anything was written


def test_step_1_without_the_previous_checkpoint_names_the_expected_path_and_step_ckpt(tiny_voc, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        run_cli(base_args(tiny_voc, "orphan") + ["--step", "1"], tmp_path)
    text = str(error.value)
    assert "expected at checkpoints/step/15-5-voc_orphan_0.pth" in text
    assert "--step_ckpt PATH" in text


def test_a_previous_step_checkpoint_of_another_task_is_refused_naming_the_classes(ft_run, tmp_path):
    step0_of_15_5 = checkpoint_file(ft_run["cwd"], "ft", 0)
    args = base_args(ft_run["root"], "other") + ["--task", "19-1", "--step", "1", "--batch_size", "1",
                                                         "--step_ckpt", str(step0_of_15_5)]
    with pytest.raises(ValueError, match=r"trained with classes \[16\] per step, but task 19-1 on voc "
                                         r"expects \[20\]"):
        run_cli(args, tmp_path)


def test_a_batch_larger_than_the_training_set_is_refused(tiny_voc, tmp_path):
    with pytest.raises(ValueError, match=r"step 0 has 44 training images, fewer than one global batch "
                                         r"\(64 x 1 processes\); lower --batch_size"):
        run_cli(base_args(tiny_voc, "big") + ["--step", "0", "--batch_size", "64"], tmp_path)


def test_a_nan_loss_is_skipped_until_max_nan_skips_then_stops_the_run(tiny_voc, tmp_path, monkeypatch):
    real_criterion = train.Trainer.criterion_map

    def nan_criterion(self, ctx):
        return real_criterion(self, ctx) * float("nan")

    monkeypatch.setattr(train.Trainer, "criterion_map", nan_criterion)
    with pytest.raises(train.NonFiniteLossError,
                       match=r"3 updates skipped because the loss was NaN/Inf \(limit --max_nan_skips 2\)"):
        run_cli(base_args(tiny_voc, "nan") + SMALL + ["--step", "0", "--max_nan_skips", "2"], tmp_path)

    log = (log_folder(tmp_path, "nan") / "log.txt").read_text()
    for n in (1, 2, 3):
        assert f"non-finite loss (ce) at iteration {n - 1}: update skipped ({n} so far)" in log
    assert not checkpoint_file(tmp_path, "nan", 0).exists()  # nothing trained, nothing saved


@pytest.mark.parametrize("damage", ["truncated", "not_a_checkpoint"])
def test_a_corrupt_checkpoint_gives_a_clear_error_naming_the_file(ft_run, tmp_path, damage):
    good = checkpoint_file(ft_run["cwd"], "ft", 0)
    bad = tmp_path / f"{damage}.pth"
    if damage == "truncated":
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_bytes(b"these are not the weights you are looking for\n" * 10)
    args = base_args(ft_run["root"], "corrupt") + ["--step", "1", "--step_ckpt", str(bad)]
    with pytest.raises(RuntimeError, match=rf"cannot load checkpoint {bad}: it is truncated or corrupt"):
        run_cli(args, tmp_path)
