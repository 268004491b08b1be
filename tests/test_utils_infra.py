import argparse
import datetime
import json
import os
import pathlib
import socket
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import average_csv
from utils import checkpoint, distributed
from utils.logger import Logger, color_map, confusion_matrix_figure, label_to_color
from utils.results import append_results_row, read_results, run_info_path, write_run_info
from utils.scheduler import PolyLR, get_scheduler

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --- scheduler ------------------------------------------------------------------------------
def _sgd(lr=0.01):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs_after_steps(scheduler, optimizer, n):
    lrs = []
    for _ in range(n):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs + [optimizer.param_groups[0]["lr"]]


def test_poly_lr_values():
    optimizer = _sgd(0.01)
    lrs = _lrs_after_steps(PolyLR(optimizer, max_iters=10, power=0.9), optimizer, 12)
    # lr_k = 0.01 * (1 - k / 10) ** 0.9
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[1] == pytest.approx(0.01 * 0.9 ** 0.9)  # 0.0090953...
    assert lrs[1] == pytest.approx(0.0090953258, rel=1e-8)
    assert lrs[5] == pytest.approx(0.01 * 0.5 ** 0.9)  # 0.0053589...
    assert lrs[10] == 0.0 and lrs[12] == 0.0  # 0 at max_iters and after, no complex numbers


def test_poly_lr_min_lr_and_power_one():
    optimizer = _sgd(1.0)
    lrs = _lrs_after_steps(PolyLR(optimizer, max_iters=4, power=1.0, min_lr=0.1), optimizer, 5)
    assert lrs == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.1, 0.1])


def test_poly_lr_state_dict_resumes():
    optimizer = _sgd(0.01)
    scheduler = PolyLR(optimizer, max_iters=10)
    _lrs_after_steps(scheduler, optimizer, 3)
    state = scheduler.state_dict()
    resumed_optimizer = _sgd(0.01)
    resumed = PolyLR(resumed_optimizer, max_iters=10)
    resumed.load_state_dict(state)
    resumed_optimizer.step()
    resumed.step()
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.6 ** 0.9)


def test_get_scheduler_options():
    opts = argparse.Namespace(lr_policy="poly", lr_power=2.0, lr_decay_step=3, lr_decay_factor=0.1)
    optimizer = _sgd(1.0)
    scheduler = get_scheduler(opts, optimizer, max_iters=4)
    assert isinstance(scheduler, PolyLR) and scheduler.power == 2.0
    assert _lrs_after_steps(scheduler, optimizer, 2)[-1] == pytest.approx(0.25)
    opts.lr_policy = "step"
    optimizer = _sgd(1.0)
    lrs = _lrs_after_steps(get_scheduler(opts, optimizer, max_iters=100), optimizer, 4)
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1])
    opts.lr_policy = "cosine"
    with pytest.raises(ValueError, match="'poly', 'step'"):
        get_scheduler(opts, _sgd(), 10)


# --- checkpoints ----------------------------------------------------------------------------
def _full_checkpoint():
    model = torch.nn.Conv2d(2, 3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    scheduler = PolyLR(optimizer, 10)
    model(torch.ones(1, 2, 2, 2)).sum().backward()
    optimizer.step()
    scheduler.step()
    opts = argparse.Namespace(lr=0.01, task="15-5s", step=1, crop_size=512, name="SATS",
                              ckpt=None, overlap=True, code_directory=pathlib.Path("/tmp/code"),
                              milestones=(3, 5))
    return {
        "epoch": 29,
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict(),
        "best_score": np.float64(0.625),
        "trainer_state": {"regularizer": {"fisher": {"w": torch.ones(2)}, "count": 3}},
        "opts": opts,
        "classes": [16, 1],
        "scaler_state": {"scale": 65536.0, "_growth_tracker": 0},
    }


def test_checkpoint_round_trip_under_weights_only(tmp_path):
    original = _full_checkpoint()
    path = tmp_path / "sub" / "15-5s-voc_SATS_1.pth"
    checkpoint.save_atomic(original, path)
    loaded = checkpoint.load_checkpoint(path)
    assert loaded["epoch"] == 29 and loaded["classes"] == [16, 1]
    assert loaded["best_score"] == 0.625 and type(loaded["best_score"]) is float
    assert loaded["opts"] == {"lr": 0.01, "task": "15-5s", "step": 1, "crop_size": 512,
                              "name": "SATS", "ckpt": None, "overlap": True,
                              "code_directory": "/tmp/code", "milestones": (3, 5)}
    for key, value in original["model_state"].items():
        assert torch.equal(loaded["model_state"][key], value)
    assert loaded["scheduler_state"]["last_epoch"] == 1
    assert torch.equal(loaded["trainer_state"]["regularizer"]["fisher"]["w"], torch.ones(2))
    # the file must load with plain torch.load(weights_only=True) too (no allowlist needed)
    assert torch.load(path, weights_only=True)["opts"]["task"] == "15-5s"
    assert os.listdir(path.parent) == [path.name]


def test_load_accepts_numpy_scalars_of_the_originals(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"best_score": np.float64(0.5), "epoch": np.int64(3),
                "model_state": OrderedDict({"module.w": torch.zeros(1)})}, path)
    loaded = checkpoint.load_checkpoint(path)
    assert loaded["best_score"] == 0.5 and loaded["epoch"] == 3
    assert list(checkpoint.strip_prefix(loaded["model_state"])) == ["w"]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        checkpoint.load_checkpoint(tmp_path / "missing.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt.pth"):
        checkpoint.load_checkpoint(corrupt)
    truncated = tmp_path / "truncated.pth"
    checkpoint.save_atomic({"w": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(RuntimeError, match="truncated.pth"):
        checkpoint.load_checkpoint(truncated)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"object": argparse.Namespace(a=1)}, unsafe)
    with pytest.raises(RuntimeError, match="weights_only"):
        checkpoint.load_checkpoint(unsafe)


def test_failed_save_leaves_old_file_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    checkpoint.save_atomic({"epoch": 1}, path)

    def save_half_then_fail(obj, handle):
        handle.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"epoch": 2}, path)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"epoch": 2}, tmp_path / "new.pth")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]
    assert checkpoint.load_checkpoint(path) == {"epoch": 1}


def test_unsupported_value_fails_at_save_naming_the_key(tmp_path):
    with pytest.raises(TypeError, match=r"\['trainer_state'\]\['bad'\]"):
        checkpoint.save_atomic({"trainer_state": {"bad": object()}}, tmp_path / "x.pth")
    assert os.listdir(tmp_path) == []


def test_strip_prefix_and_checkpoint_path():
    state = OrderedDict([("module.body.w", 1), ("module.cls.0.b", 2), ("scalar", 3)])
    assert checkpoint.strip_prefix(state) == OrderedDict([("body.w", 1), ("cls.0.b", 2),
                                                          ("scalar", 3)])
    opts = argparse.Namespace(checkpoint="checkpoints/step", task="15-5s", dataset="voc", name="SATS")
    assert checkpoint.checkpoint_path(opts, 0) == "checkpoints/step/15-5s-voc_SATS_0.pth"
    opts.checkpoint = "checkpoints/step/"
    assert checkpoint.checkpoint_path(opts, 3) == "checkpoints/step/15-5s-voc_SATS_3.pth"
    assert checkpoint.options_to_dict(argparse.Namespace(a=np.int64(2))) == {"a": 2}


# --- distributed ----------------------------------------------------------------------------
_DIST_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_single_process_without_launcher(monkeypatch):
    for name in _DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    device, rank, world_size = distributed.init_distributed(argparse.Namespace(local_rank=0))
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (rank, world_size) == (0, 1)
    assert not distributed.is_dist_initialized()
    assert distributed.is_main_process() and distributed.get_world_size() == 1
    distributed.barrier()
    value = torch.tensor([2, 4])
    mean = distributed.all_reduce_mean(value)
    assert mean.dtype == torch.float64 and mean.tolist() == [2.0, 4.0]
    summed = distributed.all_reduce_sum(value)
    assert summed.tolist() == [2, 4] and summed is not value
    assert distributed.broadcast_object({"seed": 1}) == {"seed": 1}
    distributed.cleanup()


def test_launcher_environment_errors(monkeypatch):
    for name in _DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="RANK, MASTER_ADDR, MASTER_PORT not set"):
        distributed.init_distributed(None)
    monkeypatch.setenv("LOCAL_RANK", "zero")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        distributed.init_distributed(None)


def test_timeout_from_environment(monkeypatch):
    monkeypatch.delenv("CSS_DIST_TIMEOUT", raising=False)
    assert distributed._timeout() == datetime.timedelta(minutes=10)
    monkeypatch.setenv("CSS_DIST_TIMEOUT", "30")
    assert distributed._timeout() == datetime.timedelta(seconds=30)
    monkeypatch.setenv("CSS_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="CSS_DIST_TIMEOUT"):
        distributed._timeout()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank, port, queue):
    # What torchrun sets; the legacy launcher passes the local rank as an argument instead.
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "CSS_DIST_TIMEOUT": "60"})
    os.environ.pop("LOCAL_RANK", None)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        device, got_rank, world_size = distributed.init_distributed(argparse.Namespace(local_rank=rank))
        mean = distributed.all_reduce_mean(torch.tensor([float(rank + 1)]))
        total = distributed.all_reduce_sum(torch.tensor([rank + 1]))
        shared = distributed.broadcast_object({"seed": 42} if rank == 0 else None)
        distributed.barrier()
        queue.put((got_rank, world_size, str(device), mean.item(), total.item(), shared,
                   distributed.is_main_process(), torch.distributed.get_backend()))
    finally:
        distributed.cleanup()


def test_two_gloo_processes():
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_distributed_worker, args=(_free_port(), queue), nprocs=2, start_method="spawn")
    outputs = sorted(queue.get() for _ in range(2))
    assert [o[:3] for o in outputs] == [(0, 2, "cpu"), (1, 2, "cpu")]
    for _, _, _, mean, total, shared, _, backend in outputs:
        assert (mean, total, shared, backend) == (1.5, 3, {"seed": 42}, "gloo")
    assert [o[6] for o in outputs] == [True, False]


# --- logger ---------------------------------------------------------------------------------
def test_logger_rank0_writes_log_and_tensorboard(tmp_path, capsys):
    logger = Logger(str(tmp_path), rank=0, summary=True, step=2, debug=False, world_size=2)
    logger.info("hello")
    logger.debug("hidden")
    logger.add_scalar("Loss", 0.5, 1)
    logger.add_table("Opts", {"lr": 0.01})
    logger.add_results({"T-IoU": {0: 0.5, 1: 0.25}})
    logger.add_figure("Test_Confusion_Matrix", confusion_matrix_figure(np.eye(3)))
    logger.add_image("Sample", np.zeros((3, 4, 4), dtype=np.uint8), 0)
    logger.close()
    log = (tmp_path / "log.txt").read_text()
    assert "INFO:rank0: hello" in log and "hidden" not in log
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
    assert "INFO:rank0: hello" in capsys.readouterr().err


def test_logger_other_ranks_only_report_errors(tmp_path, capsys):
    logdir = tmp_path / "rank1"
    logger = Logger(str(logdir), rank=1, summary=True, debug=True, world_size=2)
    logger.info("quiet")
    logger.debug("quiet too")
    logger.add_scalar("Loss", 1.0, 0)
    logger.error("something broke")
    logger.close()
    err = capsys.readouterr().err
    assert "quiet" not in err
    assert "ERROR:rank1: something broke" in err
    assert not logdir.exists()


def test_logger_of_a_world_of_one_has_no_rank_prefix(tmp_path, capsys):
    logger = Logger(str(tmp_path), rank=0, summary=False)
    logger.info("hello")
    logger.close()
    assert "INFO: hello" in (tmp_path / "log.txt").read_text()
    assert "rank0" not in capsys.readouterr().err


def test_a_deferred_logger_writes_nothing_until_started(tmp_path, capsys):
    never = tmp_path / "never"
    logger = Logger(str(never), rank=0, summary=True, deferred=True)
    logger.info("checking the data")
    logger.close()
    assert not never.exists()  # a run that failed its checks leaves no log folder or TensorBoard run
    started = tmp_path / "started"
    logger = Logger(str(started), rank=0, summary=True, deferred=True)
    logger.info("before start")
    logger.start()
    logger.info("after start")
    logger.close()
    log = (started / "log.txt").read_text()
    assert log.index("before start") < log.index("after start")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(started))


def test_logger_rejects_unknown_backend_and_non_figures(tmp_path):
    with pytest.raises(ValueError, match="tensorboardX"):
        Logger(str(tmp_path), rank=0, type="wandb")
    logger = Logger(str(tmp_path), rank=1)
    with pytest.raises(TypeError, match="confusion_matrix_figure"):
        logger.add_figure("Test_Confusion_Matrix", np.eye(3))
    logger.close()


def test_confusion_matrix_figure_row_normalises():
    figure = confusion_matrix_figure(np.array([[3, 1], [0, 0]]), class_names=["bg", "cat"])
    shown = np.asarray(figure.axes[0].images[0].get_array())
    np.testing.assert_allclose(shown, [[0.75, 0.25], [0.0, 0.0]])
    with pytest.raises(ValueError, match="square"):
        confusion_matrix_figure(np.zeros((2, 3)))


def test_color_map_is_the_voc_palette():
    palette = color_map("voc")
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]
    assert palette[2].tolist() == [0, 128, 0]
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert palette[255].tolist() == [224, 224, 192]  # void border
    colors = label_to_color(torch.tensor([[0, 1], [15, 255]]), palette)
    assert colors.shape == (2, 2, 3) and colors[1, 0].tolist() == [192, 128, 128]
    with pytest.raises(ValueError, match="dataset"):
        color_map("coco")


# --- results CSV and average_csv ------------------------------------------------------------
def test_results_rows_format_and_replacement(tmp_path):
    path = tmp_path / "results" / "2024_voc_19-1_SATS.csv"
    step0 = {c: 0.7 for c in range(20)}
    step0[5] = float("nan")  # seen class absent from the test ground truth
    append_results_row(path, 0, step0, n_classes_total=21, n_seen=20, miou=0.7)
    append_results_row(path, 1, [0.6] * 20 + [0.3], n_classes_total=21, n_seen=21, miou=0.5)
    append_results_row(path, 1, [0.6] * 20 + [0.3], n_classes_total=21, n_seen=21, miou=12.3 / 21)
    lines = path.read_text().splitlines()
    assert lines[0] == "step," + ",".join(map(str, range(21))) + ",mIoU"
    assert lines[1] == "0," + ",".join(["0.7"] * 5 + ["X"] + ["0.7"] * 14) + ",x,0.7"
    assert lines[2] == "1," + ",".join(["0.6"] * 20) + ",0.3," + repr(12.3 / 21)
    assert len(lines) == 3
    header, rows = read_results(path)
    assert header[0] == "step" and [row[0] for row in rows] == ["0", "1"]
    with pytest.raises(ValueError, match="columns"):
        append_results_row(path, 2, [0.5] * 151, n_classes_total=151, n_seen=151, miou=0.5)


def test_write_run_info_keeps_other_steps(tmp_path):
    csv_path = tmp_path / "run.csv"
    opts = argparse.Namespace(lr=0.01, task="15-5s", crop=(512, 512))
    info = {"options": opts, "seed": 42, "world_size": 2, "batch_size_per_process": 12}
    json_path = write_run_info(csv_path, info, step=0)
    write_run_info(csv_path, dict(info, seed=43), step=1)
    assert json_path == run_info_path(csv_path) == str(tmp_path / "run.json")
    content = json.loads(pathlib.Path(json_path).read_text())
    assert list(content["steps"]) == ["0", "1"]
    assert content["steps"]["0"] == {"options": {"lr": 0.01, "task": "15-5s", "crop": [512, 512]},
                                     "seed": 42, "world_size": 2, "batch_size_per_process": 12}
    assert content["steps"]["1"]["seed"] == 43
    write_run_info(tmp_path / "single.csv", {"seed": 1})
    assert json.loads((tmp_path / "single.json").read_text()) == {"seed": 1}


EXPECTED_REPORT = """\
step  base 0-19  new 20    all   hIoU
   0      70.00       -  70.00      -
   1      60.00   30.00  58.57  40.00
 avg      65.00   30.00  64.29  40.00
after step 1:
  base 0-19: 60.00
  new 20: 30.00
  all: 58.57
  hIoU: 40.00"""
# The originals' lines (SATS/PLOP average_csv.py), printed with --legacy_lines.
LEGACY_LINES = """\
Last Step: 1
Final Mean IoU 58.57
Average Mean IoU 64.29
Mean IoU first 60.0
Mean IoU last 30.0"""


def _write_19_1_results(path, base=0.6, new=0.3):
    step0 = {c: 0.7 for c in range(20)}
    step0[5] = float("nan")
    append_results_row(path, 0, step0, 21, 20, 0.7)
    append_results_row(path, 1, [base] * 20 + [new], 21, 21, (20 * base + new) / 21)


def test_average_csv_report(tmp_path):
    path = tmp_path / "r.csv"
    _write_19_1_results(path)
    # step 1: base 0.6, new 0.3, hIoU = 2·0.6·0.3 / 0.9 = 0.4; all = (20·0.6 + 0.3) / 21
    assert average_csv.summarize(path, "voc", "19-1") == EXPECTED_REPORT
    assert average_csv.summarize(path, "voc", "19-1", legacy_lines=True) == EXPECTED_REPORT + "\n" + LEGACY_LINES
    # the originals' header-less file, boundary from the first row
    legacy = tmp_path / "legacy.csv"
    legacy.write_text("\n".join(path.read_text().splitlines()[1:]) + "\n")
    assert average_csv.summarize(legacy) == EXPECTED_REPORT
    with pytest.raises(ValueError, match="wrong --task"):
        average_csv.summarize(path, "voc", "15-5")


def test_average_csv_old_without_background(tmp_path):
    path = tmp_path / "r.csv"
    append_results_row(path, 0, [0.9, 0.6, 0.3], 5, 3, 0.6)
    append_results_row(path, 1, [0.9, 0.6, 0.3, 0.4, 0.2], 5, 5, 0.48)
    # step 1: base 0.6, new 0.3, hIoU 0.4; without background: (0.6+0.3)/2 = 0.45, hIoU 2·0.45·0.3/0.75 = 0.36
    assert average_csv.summarize(path, old_without_background=True).splitlines() == [
        "step  base 0-2  new 3-4    all   hIoU  base 1-2  hIoU 1-2",
        "   0     60.00        -  60.00      -     45.00         -",
        "   1     60.00    30.00  48.00  40.00     45.00     36.00",
        " avg     60.00    30.00  54.00  40.00     45.00     36.00",
        "after step 1:",
        "  base 0-2: 60.00", "  new 3-4: 30.00", "  all: 48.00", "  hIoU: 40.00",
        "  base 1-2: 45.00", "  hIoU 1-2: 36.00",
    ]


def test_average_csv_mean_and_std_over_files(tmp_path):
    paths = []
    for name, base, new in (("a", 0.6, 0.3), ("b", 0.62, 0.2), ("c", 0.58, 0.4)):
        paths.append(tmp_path / f"{name}.csv")
        _write_19_1_results(paths[-1], base, new)
    lines = average_csv.summarize(paths, "voc", "19-1", legacy_lines=True).splitlines()
    assert lines[0] == f"3 files, mean ± sample std over the files: {paths[0]}, {paths[1]}, {paths[2]}"
    # base 60, 62, 58 -> 60 ± 2; new 30, 20, 40 -> 30 ± 10; all (20b+n)/21: 58.571, 60, 57.143 -> 58.57 ± 1.43
    # hIoU 2bn/(b+n): 40, 30.244, 47.347 -> 39.20 ± 8.58
    assert lines[1:5] == [
        "step     base 0-19         new 20           all          hIoU",
        "   0  70.00 ± 0.00              -  70.00 ± 0.00             -",
        "   1  60.00 ± 2.00  30.00 ± 10.00  58.57 ± 1.43  39.20 ± 8.58",
        " avg  65.00 ± 1.00  30.00 ± 10.00  64.29 ± 0.71  39.20 ± 8.58",
    ]
    assert lines[5:10] == ["after step 1:", "  base 0-19: 60.00 ± 2.00", "  new 20: 30.00 ± 10.00",
                           "  all: 58.57 ± 1.43", "  hIoU: 39.20 ± 8.58"]
    assert lines[10] == f"{paths[0]}:" and lines[11:16] == LEGACY_LINES.splitlines()
    assert lines[16:22] == [f"{paths[1]}:", "Last Step: 1", "Final Mean IoU 60.0", "Average Mean IoU 65.0",
                            "Mean IoU first 62.0", "Mean IoU last 20.0"]
    short = tmp_path / "short.csv"
    append_results_row(short, 0, [0.7] * 20, 21, 20, 0.7)
    with pytest.raises(ValueError, match=r"short.csv holds steps \[0\] but .*a.csv holds \[0, 1\]"):
        average_csv.summarize([paths[0], short])


def _average_csv(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "average_csv.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, check=False)


def test_average_csv_command_line(tmp_path):
    path = tmp_path / "r.csv"
    _write_19_1_results(path)
    done = _average_csv(path, "--dataset", "voc", "--task", "19-1", "--legacy_lines", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == EXPECTED_REPORT + "\n" + LEGACY_LINES + "\n"
    # user errors: one line, status 2, no traceback
    (tmp_path / "bad.csv").write_text("step,0,1,mIoU\n0,0.5,abc,0.5\n")
    for bad, message in ((tmp_path / "none.csv", f"error: results file not found: {tmp_path / 'none.csv'}"),
                         (tmp_path / "bad.csv", "error: ")):
        done = _average_csv(path, bad, cwd=tmp_path)
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert "bad.csv: step 0 has a cell that is not an IoU" in done.stderr
    # argument errors: argparse's usage line and the message
    done = _average_csv(path, "--task", "19-1", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("usage: average_csv.py")
    assert "error: --task needs --dataset" in done.stderr and "Traceback" not in done.stderr
    done = _average_csv(path, "--dataset", "voc", "--task", "19-7", cwd=tmp_path)
    assert done.returncode == 2 and "average_csv.py: error: task '19-7'" in done.stderr
