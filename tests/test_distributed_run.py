"""Multi-process runs of ``run.py`` on the CPU (gloo): torchrun, the legacy
``torch.distributed.launch`` (which passes ``--local-rank``), and a rank that dies.

Only rank 0 writes files, and the test metrics are all-reduced (confusion matrix sums), so a
single-process evaluation of the checkpoint the two-process run saved must give exactly the row
rank 0 wrote: that shows the reduction neither drops nor double-counts an image.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers_e2e import base_args, checkpoint_file, results_csv, run_cli, tiny_voc  # noqa: F401
from utils.results import read_results

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    return env


def launch(module, run_args, cwd, log_name):
    """Start ``python -m {module} --nproc_per_node=2 --master_port P run.py {run_args}`` in ``cwd``;
    output goes to ``cwd/{log_name}``. Returns the Popen."""
    command = [sys.executable, "-m", module, "--nproc_per_node=2", "--master_port", str(free_port()),
               str(ROOT / "run.py"), *map(str, run_args)]
    out = open(Path(cwd) / log_name, "wb")
    try:
        return subprocess.Popen(command, cwd=cwd, env=launcher_env(), stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()  # the child keeps its own descriptor


def run_two_ranks(module, run_args, cwd, log_name="launcher.out"):
    proc = launch(module, run_args, cwd, log_name)
    try:
        proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        proc.kill()
        proc.wait()
    output = (Path(cwd) / log_name).read_text(errors="replace")
    assert proc.returncode == 0, output[-6000:]
    return output


def dist_args(root, name):
    return base_args(root, name) + ["--step", "0", "--batch_size", "2"]


@pytest.fixture(scope="module")
def torchrun_run(tiny_voc, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("torchrun")
    output = run_two_ranks("torch.distributed.run", dist_args(tiny_voc, "dist"), cwd)
    return {"cwd": cwd, "output": output, "root": tiny_voc}


def test_torchrun_two_ranks_write_the_row_a_single_process_evaluation_reproduces(torchrun_run, tmp_path):
    cwd = torchrun_run["cwd"]
    assert "global batch 4 (2 x 2)" in torchrun_run["output"]
    _, rows = read_results(results_csv(cwd, "dist"))
    assert [row[0] for row in rows] == ["0"]
    ckpt = checkpoint_file(cwd, "dist", 0)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["opts"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in saved["model_state"])  # saved unwrapped

    test_args = ["--step", "0", "--test", "--ckpt", str(ckpt)]
    scores = run_cli(base_args(torchrun_run["root"], "single") + test_args, tmp_path, timeout=120)

    _, single_rows = read_results(results_csv(tmp_path, "single"))
    assert single_rows == rows
    assert float(rows[0][-1]) == scores[0]["Mean IoU"]


def test_legacy_launcher_passes_local_rank_and_trains_exactly_like_torchrun(torchrun_run, tmp_path):
    output = run_two_ranks("torch.distributed.launch", dist_args(torchrun_run["root"], "dist"), tmp_path)

    assert "global batch 4 (2 x 2)" in output
    legacy = torch.load(checkpoint_file(tmp_path, "dist", 0), weights_only=True)
    assert "local_rank" in legacy["opts"]["explicit_options"]  # --local-rank=0 came from the launcher
    reference = torch.load(checkpoint_file(torchrun_run["cwd"], "dist", 0), weights_only=True)
    for key, tensor in reference["model_state"].items():
        assert torch.equal(legacy["model_state"][key], tensor), key
    reference_rows = read_results(results_csv(torchrun_run["cwd"], "dist"))
    assert read_results(results_csv(tmp_path, "dist")) == reference_rows


def child_pids(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except FileNotFoundError:
        return []


def rank_of(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            env = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return int(env[b"RANK"]) if b"RANK" in env else None


def test_when_one_rank_is_killed_the_whole_run_exits_with_an_error(tiny_voc, tmp_path):
    args = dist_args(tiny_voc, "doomed") + ["--epochs", "20"]  # far longer than the test waits
    proc = launch("torch.distributed.run", args, tmp_path, "launcher.out")
    log = tmp_path / "launcher.out"
    ranks = {}
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        # wait until rank 0 has built its data: both ranks are then inside the process group
        while "step 0:" not in log.read_text(errors="replace") and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
            time.sleep(0.1)
        assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
        ranks = {rank_of(pid): pid for pid in child_pids(proc.pid)}
        ranks.pop(None, None)
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGKILL)
        returncode = proc.wait(timeout=120)
        rank0_left = _is_running(ranks[0])
    finally:
        proc.kill()
        proc.wait()
        for pid in ranks.values():  # never leave a rank behind, whatever failed above
            if _is_running(pid):
                os.kill(pid, signal.SIGKILL)
    output = log.read_text(errors="replace")
    assert returncode != 0, output[-4000:]
    assert f"Signal 9 (SIGKILL) received by PID {ranks[1]}" in output  # the launcher saw our kill
    assert not rank0_left, "rank 0 outlived the launcher"
    assert not results_csv(tmp_path, "doomed").exists()


def _is_running(pid):
    """Whether ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
