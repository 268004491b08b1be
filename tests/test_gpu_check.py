"""scripts/gpu_check.py: its options, its report and its CPU-capable parts (the GPU parts run on a
GPU machine: bash scripts/gpu_check.sh)."""
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"css_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = load_script("gpu_check")

TINY = ["--device", "cpu", "--quick", "--methods", "FT", "SATS", "--iterations", "2", "--settle", "1",
        "--levels", "O0", "O2", "--crop_size", "64", "--batch_size", "2"]


def test_the_method_list_is_every_method_then_the_memory_variants():
    import argparser

    methods = gpu_check.all_methods()
    assert methods[:len(argparser.METHODS)] == list(argparser.METHODS)
    assert methods[len(argparser.METHODS):] == [f"{m}-M" for m in argparser.MEMORY_METHODS]
    for name in ("FT", "LWF", "LWF-MC", "ILT", "EWC", "RW", "PI", "MiB", "PLOP", "SSUL", "SATS",
                 "MiB-M", "PLOP-M", "SSUL-M", "SATS-M"):
        assert name in methods


def test_full_and_quick_settings():
    full = gpu_check.get_args([])
    assert (full.model, full.crop_size, full.batch_size) == ("segformer_b2", 512, 8)
    assert (full.iterations, full.settle, full.levels) == (30, 10, ["O0", "O1", "O2"])
    assert full.budget_s == 480 and full.json == "gpu_check.json" and full.device == "cuda"
    assert full.parts == ["environment", "cuda_tests", "methods", "benchmark", "demo"]
    assert full.methods == gpu_check.all_methods() and full.demo_epochs is None
    quick = gpu_check.get_args(["--quick", "--batch_size", "2"])
    assert (quick.model, quick.crop_size, quick.batch_size) == ("segformer_b0", 256, 2)
    assert (quick.iterations, quick.settle, quick.bench_steps, quick.demo_epochs) == (10, 3, 5, 1)


@pytest.mark.parametrize("argv", [["--iterations", "5", "--settle", "5"], ["--parts", "train"],
                                  ["--levels", "O4"], ["--budget_s", "-1"]])
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.get_args(argv)
    assert stop.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cpu_run_of_two_methods_writes_the_report(tmp_path):
    out = tmp_path / "check.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *TINY,
           "--parts", "environment", "methods", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["ok"] is True and report["budget_s"] == 480.0
    assert report["settings"]["methods"] == ["FT", "SATS"] and report["settings"]["device"] == "cpu"
    assert set(report["parts"]) == {"environment", "methods"}
    env = report["parts"]["environment"]
    assert env["status"] == "passed" and env["torch"] and env["cuda_available"] in (True, False)
    methods = report["parts"]["methods"]
    assert methods["status"] == "passed" and methods["failed"] == [] and methods["skipped"] == []
    runs = methods["runs"]
    assert [(r["method"], r["opt_level"]) for r in runs] == [("FT", "O0"), ("FT", "O2"),
                                                            ("SATS", "O0"), ("SATS", "O2")]
    for run in runs:
        assert run["ok"] and run["error"] is None and run["final_scale"] is None  # no scaler on CPU
        assert len(run["losses"]) == 2 and all(math.isfinite(v) for v in run["losses"])
        assert run["non_finite"] == [] and run["skipped_steps"] == []
    # same weights and batches under both levels: bf16 moves the loss only a little
    assert runs[0]["losses"][0] == pytest.approx(runs[1]["losses"][0], rel=0.05)
    assert "[gpu_check] methods      passed" in done.stdout and "4/4 runs ok" in done.stdout


def test_parts_past_the_budget_are_recorded_as_skipped(tmp_path):
    out = tmp_path / "check.json"
    report = gpu_check.main([*TINY, "--budget_s", "0", "--json", str(out),
                             "--parts", "demo", "cuda_tests", "methods", "benchmark"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    # in the order given, after the environment (always run, it is instant)
    assert list(report["parts"]) == ["environment", "demo", "cuda_tests", "methods", "benchmark"]
    assert report["parts"]["environment"]["status"] == "passed"
    for part in ("cuda_tests", "methods", "benchmark", "demo"):
        assert report["parts"][part] == {"status": "skipped", "reason": "out of time"}
    assert report["ok"] is True


def test_a_non_finite_loss_after_the_settling_iterations_fails_the_run(tmp_path, monkeypatch):
    import train

    calls = []
    real = train.Trainer.train_iteration

    def nan_at_the_third_call(self, batch, optim, scheduler=None):
        calls.append(1)
        values = real(self, batch, optim, scheduler)
        return {k: float("nan") for k in values} if len(calls) == 3 else values

    monkeypatch.setattr(train.Trainer, "train_iteration", nan_at_the_third_call)
    out = tmp_path / "check.json"
    argv = ["--device", "cpu", "--quick", "--methods", "FT", "--iterations", "3", "--settle", "1",
            "--levels", "O0", "--crop_size", "64", "--batch_size", "2", "--parts", "environment",
            "methods", "--json", str(out)]
    report = gpu_check.main(argv)
    run, = report["parts"]["methods"]["runs"]
    assert run["non_finite"] == [2] and run["ok"] is False
    assert report["parts"]["methods"]["failed"] == ["FT O0"]
    assert report["parts"]["methods"]["status"] == "failed" and report["ok"] is False
    # the same NaN inside the settling iterations is tolerated
    calls.clear()
    argv[argv.index("--iterations") + 1], argv[argv.index("--settle") + 1] = "4", "3"
    report = gpu_check.main(argv)
    run, = report["parts"]["methods"]["runs"]
    assert run["non_finite"] == [2] and run["ok"] is True and report["ok"] is True


def test_demo_table_and_pytest_summary_parsing():
    output = ("  step  0-15  16-20    all  hIoU\n"
              "     1 64.59  66.54  65.05 65.55\n"      # run.py's own summary of step 1
              "[demo] step 1: 5 new classes with SATS, 4 epochs\n"
              "  step     0-15    16-20      all\n"
              "     0    66.01        -    66.01\n"
              "     1    64.98    66.96    65.45\n"
              "[demo] TensorBoard: tensorboard --logdir logs/15-5-voc\n")
    assert gpu_check.parse_demo_table(output) == [
        {"step": 0, "miou": [66.01, None, 66.01]}, {"step": 1, "miou": [64.98, 66.96, 65.45]}]
    assert gpu_check.parse_pytest_summary("7 passed, 2 skipped, 1 error in 3.2s") == {
        "passed": 7, "skipped": 2, "error": 1}
    assert gpu_check.parse_pytest_summary("10 skipped, 130 deselected in 6.05s") == {
        "skipped": 10, "deselected": 130}


def test_benchmark_skips_methods_past_its_deadline():
    benchmark = load_script("benchmark")
    args = benchmark.get_args(["--methods", "SATS", "PLOP", "--device", "cpu"])
    report = benchmark.benchmark_methods(args, deadline=time.monotonic() - 1)
    assert report["methods"] == {} and report["skipped"] == ["FT", "SATS", "PLOP"]
    assert report["eval_images_per_s"] is None and "failed" not in report
