"""Plumbing of scripts/benchmark.py on a tiny setting (no timing assertions)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def benchmark_module():
    """``scripts/benchmark.py`` imported as a module."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    import benchmark

    return benchmark


def test_benchmark_reports_every_method_with_ft_as_reference(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", "segformer_b0",
           "--crop_size", "64", "--batch_size", "2", "--steps", "2", "--warmup", "1", "--threads", "1",
           "--methods", "SATS", "EWC", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())

    assert set(report["methods"]) == {"FT", "SATS", "EWC"}
    assert report["settings"]["crop_size"] == 64 and report["settings"]["batch_size"] == 2
    assert report["eval_images_per_s"] > 0
    ft, sats, ewc = (report["methods"][m] for m in ("FT", "SATS", "EWC"))
    assert ft["ratio_to_ft"] == 1.0
    for r in (ft, sats, ewc):
        assert r["step_s_median"] > 0 and r["step_s_spread"] >= 0 and r["peak_mem_mb"] >= 0
        assert abs(r["images_per_s"] - 2 / r["step_s_median"]) < 1e-9
        assert abs(r["ratio_to_ft"] - r["step_s_median"] / ft["step_s_median"]) < 1e-9
    # a method without an old model shows no old-model cost and no extra loss term
    assert ft["old_model_used"] is False and ft["loss_share"] == {}
    assert ewc["old_model_used"] is False and ewc["loss_share"] == {}
    assert sats["old_model_used"] is True
    assert set(sats["loss_share"]) == {"kd", "sats"}
    assert all(0 < v < 1 for v in sats["loss_share"].values())
    assert "SATS" in done.stdout and "x FT" in done.stdout


def test_data_pipeline_benchmark_reports_per_worker_throughput(tmp_path):
    out = tmp_path / "data.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--data", "--data_images", "6",
           "--data_image_size", "80", "60", "--crop_size", "32", "--batch_size", "2",
           "--data_workers", "0", "1", "--feed_images_per_s", "1000", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]  # no temporary file left
    report = json.loads(out.read_text())["data"]

    assert report["settings"] == {"images": 6, "width": 80, "height": 60, "crop_size": 32,
                                  "batch_size": 2, "workers": [0, 1], "quality": 90, "seed": 0,
                                  "feed_images_per_s": 1000.0}
    ms = report["per_image_ms"]
    assert ms["decode"] > 0 and ms["transform"] > 0
    assert abs(ms["decode"] + ms["transform"] - ms["total"]) < 1e-9
    assert abs(report["per_worker_images_per_s"] - 1000 / ms["total"]) < 1e-9
    assert [row["workers"] for row in report["loaders"]] == [0, 1]
    for row in report["loaders"]:
        # the project's train transform ran: normalised 3 x 32 x 32 crops, 32 x 32 labels
        assert row["images"] == 6 and row["image_shape"] == [3, 32, 32]
        assert row["label_shape"] == [32, 32]
        assert abs(row["images_per_s"] - 6 / row["seconds"]) < 1e-6
        assert row["images_per_s_per_worker"] == row["images_per_s"] / max(row["workers"], 1)
    workers = report["feed"]["workers_needed"]
    assert workers == math.ceil(1000 / report["per_worker_images_per_s"])
    assert (workers - 1) * report["per_worker_images_per_s"] < 1000 <= workers * report["per_worker_images_per_s"]
    assert "images/s per worker" in done.stdout and f"{workers} workers" in done.stdout


def test_data_pipeline_settings_are_checked():
    from dataset.loader_benchmark import LoaderBenchmark

    with pytest.raises(ValueError, match="--data_images"):
        LoaderBenchmark(images=2, batch_size=4).check()
    with pytest.raises(ValueError, match="--data_workers"):
        LoaderBenchmark(workers=(0, -1)).check()
    with pytest.raises(ValueError, match="--feed_images_per_s"):
        LoaderBenchmark(feed_images_per_s=0.0).check()


@pytest.mark.parametrize("method, lr, extra", [("DKD", 1e-4, {}), ("LWF-MC", 1e-3, {}), ("SATS", 1e-3, {}),
                                               ("MiB+NeST", 1e-3, {"loss_kd": 10.0})])
def test_each_method_runs_at_the_learning_rate_of_its_voc_sweep(method, lr, extra):
    """At the generic default (7e-3) DKD's 10x head and LWF-MC's summed BCE left float range within
    a few iterations of the GPU check; their scripts' rates are what a user runs."""
    benchmark = benchmark_module()
    opts = benchmark.method_options(benchmark.get_args(["--methods", method]), method)
    assert opts.lr == [lr]
    for key, value in extra.items():
        assert getattr(opts, key) == value


def test_an_unknown_method_is_an_argument_error():
    benchmark = benchmark_module()
    with pytest.raises(SystemExit) as exit_:
        benchmark.get_args(["--methods", "Foo"])
    assert exit_.value.code == 2


def test_nest_pretuning_cost_is_measured_and_reported(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", "segformer_b0",
           "--crop_size", "64", "--batch_size", "2", "--steps", "2", "--warmup", "1", "--threads", "1",
           "--methods", "MiB+NeST", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    nest = report["methods"]["MiB+NeST"]["nest"]
    assert nest["selection_s_per_batch"] > 0 and nest["pretune_s_per_batch"] > 0
    assert (nest["pretune_epochs"], nest["train_epochs"]) == (5, 30)  # VOC's NeST default, MiB's VOC sweep
    assert "nest" not in report["methods"]["FT"]
    benchmark = benchmark_module()
    overhead = benchmark.nest_overhead(nest, report["methods"]["FT"]["step_s_median"])
    assert f"add {100 * overhead:.1f} %" in done.stdout
