"""Plumbing of scripts/benchmark.py on a tiny setting (no timing assertions)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
