"""The GPU check: does everything run on a CUDA machine, and how fast.

    bash scripts/gpu_check.sh [--json gpu_check.json] [--budget_s 480] [--quick]

Parts (``--parts``, run in the order given; the environment always comes first), each recorded in
the JSON report as passed, failed, partial (some items left out for time) or skipped (with why):

1. ``environment``: Python, torch, torchvision, CUDA, cuDNN, the GPU's name, memory and compute
   capability, the repository's commit;
2. ``cuda_tests``: ``pytest -m cuda tests`` (fp16/bf16 training iterations, checkpoints across
   devices, pinned-memory transfer, the old model's side thread, POD's backward), counts, output;
3. ``methods``: every method (``all_methods()``) under each ``--levels`` opt level for
   ``--iterations`` training iterations on synthetic batches with random weights (SegFormer-B2,
   512 px, batch 8): fails on a non-finite loss or a skipped update (NaN skip or GradScaler
   overflow) after the first ``--settle`` iterations, where the fp16 GradScaler finds its scale;
4. ``benchmark``: ``scripts/benchmark.py`` on that setting under ``--bench_opt_level`` for every
   method (in this process on CUDA, peak memory reset per method): step time, images/s, peak
   ``torch.cuda.max_memory_allocated``, loss-term shares;
5. ``demo``: ``scripts/demo.sh`` (96 px) end to end, its final mIoU table.

``--budget_s`` (default 480 s) bounds the whole run: a part, method or benchmark run that would
start after it is skipped and recorded so, a subprocess still running at it is stopped. The report
is rewritten after each part, so a run stopped from outside leaves the parts done so far. The
exit status is 0 when no part failed.
``--quick`` is a smaller setting (SegFormer-B0, 256 px, batch 4, 10 iterations, 1-epoch demo).
Models and trainers are built by ``scripts/benchmark.py``'s functions, as the benchmark builds them.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
for _path in (str(ROOT), str(SCRIPTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run.py sets it

from utils.errors import ArgumentParser  # noqa: E402

PARTS = ("environment", "cuda_tests", "methods", "benchmark", "demo")
LEVELS = ("O0", "O1", "O2", "O3")
FULL = dict(model="segformer_b2", crop_size=512, batch_size=8, iterations=30, settle=10,
            bench_steps=10, bench_warmup=3, demo_epochs=None)
QUICK = dict(model="segformer_b0", crop_size=256, batch_size=4, iterations=10, settle=3,
             bench_steps=5, bench_warmup=2, demo_epochs=1)


def all_methods() -> list:
    """Every method the check covers: the base methods, then their ``-M`` (memory) variants."""
    import methods

    return methods.names() + [f"{m}-M" for m in methods.memory_names()]


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------
def get_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="scripts/gpu_check.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="gpu_check.json", help="report file (default gpu_check.json)")
    p.add_argument("--budget_s", type=float, default=480.0,
                   help="time for the whole check; what would start later is skipped (default 480)")
    p.add_argument("--quick", action="store_true", help="smaller setting (module docstring)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (to test the check itself)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="parts to run, in this order (default: all, in the order above)")
    p.add_argument("--methods", nargs="+", default=None, help="default: every method and -M variant")
    p.add_argument("--levels", nargs="+", choices=LEVELS, default=["O0", "O1", "O2"],
                   help="opt levels of the methods part")
    p.add_argument("--model", default=None, help="default segformer_b2 (quick: segformer_b0)")
    p.add_argument("--crop_size", type=int, default=None, help="default 512 (quick: 256)")
    p.add_argument("--batch_size", type=int, default=None, help="default 8 (quick: 4)")
    p.add_argument("--iterations", type=int, default=None,
                   help="training iterations per method and level (default 30, quick 10)")
    p.add_argument("--settle", type=int, default=None,
                   help="first iterations allowed to skip updates (default 10, quick 3)")
    p.add_argument("--bench_opt_level", choices=LEVELS, default="O1", help="benchmark's opt level")
    p.add_argument("--bench_steps", type=int, default=None, help="timed steps (default 10, quick 5)")
    p.add_argument("--bench_warmup", type=int, default=None, help="warm-up steps (default 3, quick 2)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.methods is None:
        args.methods = all_methods()
    if args.iterations < 1 or not 0 <= args.settle < args.iterations:
        p.error(f"--settle ({args.settle}) must be in [0, --iterations ({args.iterations}))")
    if args.budget_s < 0:
        p.error(f"--budget_s must be >= 0, got {args.budget_s}")
    return args


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
@dataclass
class Check:
    """The run's clock and report; ``save()`` rewrites the JSON file atomically."""

    args: argparse.Namespace
    start: float = field(default_factory=time.monotonic)
    parts: dict = field(default_factory=dict)

    @property
    def deadline(self) -> float:
        return self.start + self.args.budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def report(self) -> dict:
        settings = {k: getattr(self.args, k) for k in (
            "device", "quick", "model", "crop_size", "batch_size", "iterations", "settle", "levels",
            "methods", "bench_opt_level", "bench_steps", "bench_warmup", "demo_epochs", "parts")}
        statuses = [p["status"] for p in self.parts.values()]
        return {"settings": settings, "budget_s": self.args.budget_s,
                "elapsed_s": time.monotonic() - self.start, "parts": self.parts,
                "ok": "failed" not in statuses}

    def save(self, report=None) -> None:
        from utils.io import atomic_write_text

        report = self.report() if report is None else report
        atomic_write_text(self.args.json, json.dumps(report, indent=2) + "\n")


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


# ---------------------------------------------------------------------------------------------
# 1. environment
# ---------------------------------------------------------------------------------------------
def environment(args) -> dict:
    import torch
    import torchvision

    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available(),
            "commit": _git_commit()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return dict(info, status="failed", reason="--device cuda but torch sees no CUDA device")
    return dict(info, status="passed")


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


# ---------------------------------------------------------------------------------------------
# 2. pytest -m cuda
# ---------------------------------------------------------------------------------------------
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def parse_pytest_summary(line: str) -> dict:
    """``"7 passed, 2 skipped in 3s"`` -> ``{"passed": 7, "skipped": 2}`` ("errors" -> "error")."""
    return {name.rstrip("s") if name.startswith("error") else name: int(n)
            for n, name in _COUNT.findall(line)}


def cuda_tests(args, check: Check) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests", "-p", "no:cacheprovider"]
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=check.left())
    except subprocess.TimeoutExpired:
        return skipped("out of time (stopped at the budget)")
    lines = out.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    counts = parse_pytest_summary(summary)
    result = {"returncode": out.returncode, "summary": summary, "counts": counts,
              "tail": (out.stdout + out.stderr)[-20000:]}
    if out.returncode != 0:
        return dict(result, status="failed")
    if args.device.startswith("cuda") and (counts.get("skipped") or not counts.get("passed")):
        return dict(result, status="failed", reason="CUDA tests were skipped on a CUDA machine")
    return dict(result, status="passed")


# ---------------------------------------------------------------------------------------------
# 3. every method under each opt level
# ---------------------------------------------------------------------------------------------
def bench_args(args, opt_level: str, extra=()):
    import benchmark

    return benchmark.get_args(["--model", args.model, "--crop_size", str(args.crop_size),
                               "--batch_size", str(args.batch_size), "--opt_level", opt_level,
                               "--device", args.device, *extra])


def check_methods(args, check: Check) -> dict:
    """Each method's models are built once; each level restores the new model's initial weights
    and builds its own trainer (its GradScaler, classifier initialisation and optimiser)."""
    import torch

    device = torch.device(args.device)
    runs, left_out = [], []
    batches_by_classes: dict = {}
    for method in args.methods:
        if check.left() <= 0:
            left_out += [f"{method} {level}" for level in args.levels]
            continue
        runs += _check_method(args, check, method, device, batches_by_classes, left_out)
        _release(device)
    failed = [f"{r['method']} {r['opt_level']}" for r in runs if not r["ok"]]
    status = "failed" if failed else ("partial" if left_out else "passed")
    return {"status": status, "runs": runs, "failed": failed, "skipped": left_out}


def _check_method(args, check, method, device, batches_by_classes, left_out) -> list:
    import torch

    import benchmark

    torch.manual_seed(0)
    try:
        opts, model, old, classes = benchmark.build_models(bench_args(args, "O0"), method, device)
        trainer_state = benchmark.trainer_state_for(opts, old, device)
    except Exception as error:  # noqa: BLE001 - any failure is this method's result
        return [_failed_run(method, level, error) for level in args.levels]
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    runs = []
    for level in args.levels:
        if check.left() <= 0:
            left_out.append(f"{method} {level}")
            continue
        model.load_state_dict(initial)
        level_opts = copy.copy(opts)
        level_opts.opt_level = level
        try:
            runs.append(_train_iterations(args, method, level_opts, model, old, classes,
                                          trainer_state, device, batches_by_classes))
        except Exception as error:  # noqa: BLE001
            runs.append(_failed_run(method, level, error))
    return runs


def _failed_run(method, level, error) -> dict:
    return {"method": method, "opt_level": level, "ok": False,
            "error": f"{type(error).__name__}: {error}"[-2000:]}


def _train_iterations(args, method, opts, model, old, classes, trainer_state, device,
                      batches_by_classes) -> dict:
    import torch

    import benchmark

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer, optim = benchmark.build_trainer(opts, model, old, device, classes, trainer_state)
    key = trainer.nb_current
    if key not in batches_by_classes:
        batches_by_classes[key] = benchmark.synthetic_batches(args.iterations, opts, key, device)
    batches = batches_by_classes[key]
    benchmark.prepare_targets(trainer, batches, opts)
    model.train()
    losses, non_finite, skipped_steps = [], [], []
    start = time.perf_counter()
    try:
        for i, batch in enumerate(batches):
            scale = trainer.scaler.get_scale() if trainer.scaler is not None else None
            values = trainer.train_iteration(batch, optim)
            total = sum(values.values()) if values else float("nan")
            losses.append(total)
            if not math.isfinite(total):
                non_finite.append(i)
            overflowed = trainer.scaler is not None and trainer.scaler.get_scale() < scale
            if not values or overflowed:  # a NaN skip, or the GradScaler skipped the step
                skipped_steps.append(i)
    finally:
        trainer.close()
    seconds = time.perf_counter() - start
    late = [i for i in non_finite + skipped_steps if i >= args.settle]
    return {"method": method, "opt_level": opts.opt_level, "ok": not late, "seconds": seconds,
            "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            "losses": losses, "non_finite": non_finite, "skipped_steps": skipped_steps,
            "final_scale": trainer.scaler.get_scale() if trainer.scaler is not None else None,
            "error": None}


def _release(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# 4. the benchmark
# ---------------------------------------------------------------------------------------------
def run_benchmark(args, check: Check) -> dict:
    import benchmark

    bargs = bench_args(args, args.bench_opt_level,
                       ["--steps", str(args.bench_steps), "--warmup", str(args.bench_warmup),
                        "--methods", *args.methods])
    # on CUDA in this process: a fresh one per method spends more on start-up than on the steps
    report = benchmark.benchmark_methods(bargs, deadline=check.deadline,
                                         in_process=args.device.startswith("cuda"))
    benchmark.print_table(report)
    status = "failed" if report.get("failed") else ("partial" if report.get("skipped") else "passed")
    return {"status": status, "report": report}


# ---------------------------------------------------------------------------------------------
# 5. the demo
# ---------------------------------------------------------------------------------------------
_TABLE_ROW = re.compile(r"^\s*(\d+)((?:\s+(?:-|\d+\.\d+))+)\s*$")


def parse_demo_table(output: str) -> list:
    """The rows ``step  value ...`` of the demo's last mIoU table (``-`` -> None): the last run
    of consecutive such lines (each step's own summary comes before, one row each)."""
    tables, previous_matched = [], False
    for line in output.splitlines():
        match = _TABLE_ROW.match(line)
        if match:
            if not previous_matched:
                tables.append([])
            values = [None if v == "-" else float(v) for v in match.group(2).split()]
            tables[-1].append({"step": int(match.group(1)), "miou": values})
        previous_matched = bool(match)
    return tables[-1] if tables else []


def run_demo(args, check: Check) -> dict:
    env = dict(os.environ, NAME=f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.demo_epochs is not None:
        env.update(EPOCHS0=str(args.demo_epochs), EPOCHS=str(args.demo_epochs))
    try:
        out = subprocess.run(["bash", str(SCRIPTS / "demo.sh")], cwd=ROOT, capture_output=True,
                             text=True, timeout=check.left(), env=env)
    except subprocess.TimeoutExpired:
        return skipped("out of time (stopped at the budget)")
    table = parse_demo_table(out.stdout)
    result = {"returncode": out.returncode, "table": table, "name": env["NAME"],
              "tail": (out.stdout + out.stderr)[-3000:]}
    ok = out.returncode == 0 and any(row["step"] == 1 for row in table)
    return dict(result, status="passed" if ok else "failed")


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
RUNNERS = {"cuda_tests": cuda_tests, "methods": check_methods, "benchmark": run_benchmark,
           "demo": run_demo}


def main(argv=None) -> dict:
    args = get_args(argv)
    check = Check(args)
    print(f"[gpu_check] budget {args.budget_s:.0f} s, report {args.json}", flush=True)
    env = environment(args)  # always: it says where the rest ran
    check.parts["environment"] = dict(env, seconds=time.monotonic() - check.start)
    _print_part("environment", check.parts["environment"])
    check.save()
    for part in dict.fromkeys(args.parts):
        if part == "environment":
            continue
        if env["status"] != "passed":
            result = skipped("the environment check failed")
        elif check.left() <= 0:
            result = skipped("out of time")
        else:
            print(f"[gpu_check] {part} ...", flush=True)
            started = time.monotonic()
            result = RUNNERS[part](args, check)
            result["seconds"] = time.monotonic() - started
        check.parts[part] = result
        _print_part(part, result)
        check.save()
    report = check.report()
    check.save(report)
    print(f"[gpu_check] {'ok' if report['ok'] else 'FAILED'} in {report['elapsed_s']:.0f} s; "
          f"report: {args.json}", flush=True)
    return report


def _print_part(name: str, result: dict) -> None:
    note = result.get("reason", "")
    if name == "environment":
        note = ", ".join(f"{k} {result[k]}" for k in ("torch", "cuda", "gpu", "gpu_memory_gib")
                         if result.get(k) is not None)
    elif name == "cuda_tests" and "summary" in result:
        note = result["summary"]
    elif name == "methods" and "runs" in result:
        note = (f"{sum(r['ok'] for r in result['runs'])}/{len(result['runs'])} runs ok"
                + (f"; failed: {', '.join(result['failed'])}" if result["failed"] else "")
                + (f"; skipped: {len(result['skipped'])}" if result["skipped"] else ""))
    elif name == "demo" and result.get("table"):
        note = "last row " + " ".join("-" if v is None else f"{v:.2f}" for v in result["table"][-1]["miou"])
    seconds = f"{result['seconds']:.0f} s" if "seconds" in result else ""
    print(f"[gpu_check] {name:<12} {result['status']:<8} {seconds:>6}  {note}", flush=True)


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
