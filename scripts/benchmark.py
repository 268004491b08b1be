"""Speed and memory of each method's training step, in a step-1 setting.

    python scripts/benchmark.py --model segformer_b0 --crop_size 256 --batch_size 4
    python scripts/benchmark.py --model segformer_b2 --crop_size 512 --opt_level O1   (GPU)

For every method an old model (step 0) and a new model (step 1, VOC 15-5 classes) are built, the
trainer is fed synthetic batches (no disk I/O), ``--warmup`` steps are run, then ``--steps`` steps are
timed. Each method runs in a fresh subprocess so that peak memory is its own. Reported per method:
median and spread (inter-quartile range) of the step time, the ratio to FT's median, images/s, peak
memory (CUDA max allocated; on CPU the peak RSS increase over the process's state before training)
and the share of the step spent in each loss term (forward + backward of the term on detached
inputs, measured separately after the timed steps). Also the evaluation throughput (FT model).
Under ``--opt_level O1`` on CUDA the trainer has its GradScaler, as in ``run.py``.

    python scripts/benchmark.py --data [--data_workers 0 1 2] [--feed_images_per_s 60]

measures the training data pipeline alone instead (``dataset/loader_benchmark.py``): generated
VOC-sized JPEGs (``--data_image_size 500 375``, ``--data_images 64``) read by the project's dataset
class with its train transform (random resized crop to ``--crop_size``, 512 by default here, flip,
normalise): decode and transform time per image, images/s per DataLoader worker, loader passes
with each worker count, and with ``--feed_images_per_s`` the workers that keep such a step fed.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run.py sets it
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.errors import ArgumentParser  # noqa: E402

DEFAULT_METHODS = ["FT", "LWF", "ILT", "EWC", "MiB", "PLOP", "SSUL", "SATS", "DKD", "SATS+NeST"]


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="segformer_b0")
    p.add_argument("--crop_size", type=int, default=None, help="crop side (default 256; 512 with --data)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per method")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--opt_level", default="O0")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--task", default="15-5")
    p.add_argument("--json", default=None, help="write the results as JSON to this path")
    d = p.add_argument_group("data pipeline (--data)")
    d.add_argument("--data", action="store_true",
                   help="measure the training data pipeline alone (decode + train transform) instead")
    d.add_argument("--data_images", type=int, default=64, help="generated JPEGs")
    d.add_argument("--data_image_size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"),
                   help="their size (VOC's typical 500 x 375)")
    d.add_argument("--data_workers", type=int, nargs="+", default=(0, 1, 2),
                   help="DataLoader worker counts to time (0: in the main process)")
    d.add_argument("--feed_images_per_s", type=float, default=None,
                   help="a training step's images/s: report the workers that keep it fed")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--eval_only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.crop_size is None:
        args.crop_size = 512 if args.data else 256
    if not args.worker:  # a wrong name is an argument error here, not a failed worker later
        import methods

        for name in args.methods:
            try:
                methods.parse(name)
            except ValueError as error:
                p.error(f"argument --methods: {error}")
    return args


def _cuda():
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# worker: one method in this process
# ---------------------------------------------------------------------------------------------
def method_options(args, method):
    """``method``'s options at step 1 of ``args.task`` on VOC, with the learning rate and extra
    options of its VOC sweep script (``methods.sweep_settings``): DKD's head runs at 10x a rate of
    1e-4, and at the generic default (7e-3) its loss leaves float range within a few steps."""
    import argparser
    import methods

    sweep = methods.sweep_settings(method, "voc", args.task)
    argv = ["--method", method, "--model", args.model, "--no_pretrained", "--dataset", "voc",
            "--task", args.task, "--step", "1", "--crop_size", str(args.crop_size),
            "--batch_size", str(args.batch_size), "--opt_level", args.opt_level, "--no_progress",
            "--lr", str(sweep["lr"]), *sweep["args"]]
    return argparser.parse_options(argv)


def synthetic_batches(n, opts, n_seen, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        images = torch.randn(opts.batch_size, 3, opts.crop_size, opts.crop_size, generator=g)
        # blocky labels: several classes per image, like real masks (region pooling cost depends on it)
        cells = torch.randint(0, n_seen, (opts.batch_size, 8, 8), generator=g)
        labels = torch.nn.functional.interpolate(cells[:, None].float(), size=(opts.crop_size,) * 2,
                                                 mode="nearest")[:, 0].long()
        saliency = (labels > 0).long()
        batches.append((images.to(device), labels.to(device), saliency.to(device)))
    return batches


def build_models(args, method, device):
    """``(opts, model, old, classes)``: the options of ``method`` at step 1, the frozen step-0
    model and the step-1 model holding its weights where the shapes match (random weights)."""
    import tasks
    from segmentation_module import make_model

    opts = method_options(args, method)
    opts.world_size = 1
    opts.lr = opts.lr[0]  # run.py sets the step's learning rate the same way
    classes = tasks.get_per_task_classes("voc", args.task, 1)
    old = make_model(opts, tasks.get_per_task_classes("voc", args.task, 0)).to(device)
    model = make_model(opts, classes).to(device)
    model.load_state_dict(old.state_dict(), strict=False)
    old.eval()
    for p in old.parameters():
        p.requires_grad_(False)
    return opts, model, old, classes


def trainer_state_for(opts, old, device):
    """What step 0 would hand the trainer (a regularizer's importance), or None."""
    if not opts.regularizer:
        return None
    return {"regularizer": _step0_regularizer_state(opts, old, device)}


def build_trainer(opts, model, old, device, classes, trainer_state=None):
    """``(trainer, optim)`` as ``run.py`` builds them for step 1 (GradScaler under O1 on CUDA,
    the method's classifier initialisation, its parameter groups)."""
    import torch

    import methods
    from train import Trainer, amp_settings

    _, use_scaler = amp_settings(opts.opt_level, device)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None  # as run.py makes it
    trainer = Trainer(model, old, device, opts, trainer_state=trainer_state, classes=classes, step=1,
                      scaler=scaler)
    if trainer.recipe.init_classifier is not None:
        trainer.recipe.init_classifier(model, None)
    optim = torch.optim.SGD(methods.param_groups(model, opts, 1), lr=1e-3, momentum=0.9, nesterov=True)
    return trainer, optim


def build_step1(args, method, device):
    opts, model, old, classes = build_models(args, method, device)
    trainer, optim = build_trainer(opts, model, old, device, classes, trainer_state_for(opts, old, device))
    return opts, model, old, trainer, optim


def prepare_targets(trainer, batches, opts):
    """The target builder's once-per-step preparation (pseudo-label thresholds) on two batches."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    if trainer.recipe.targets is None:
        return
    images = torch.cat([b[0] for b in batches[:2]]).cpu()
    labels = torch.cat([b[1] for b in batches[:2]]).cpu()
    trainer.before(DataLoader(TensorDataset(images, labels), batch_size=opts.batch_size))


def _step0_regularizer_state(opts, old, device):
    """A realistic importance state, as step 0 would have saved it (one update on random grads)."""
    import torch

    from utils.regularizer import get_regularizer

    for p in old.parameters():
        p.requires_grad_(True)
        p.grad = torch.randn_like(p) * 1e-3
    reg = get_regularizer(old, None, device, opts, None)
    reg.update()
    with torch.no_grad():
        for p in old.parameters():
            p.add_(torch.randn_like(p) * 1e-4)
    reg.update()
    state = reg.state_dict()
    for p in old.parameters():
        p.grad = None
        p.requires_grad_(False)
    return state


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_terms(trainer, ctx, repeats=3):
    """Forward + backward time of each loss term on detached copies of its inputs."""
    import torch

    def detach(x):
        if torch.is_tensor(x):
            return x.detach().clone().requires_grad_(x.is_floating_point())
        if isinstance(x, (list, tuple)):
            return type(x)(detach(v) for v in x)
        if isinstance(x, dict):
            return {k: detach(v) for k, v in x.items()}
        return x

    shares = {}
    for term in trainer.recipe.terms:
        times = []
        for _ in range(repeats):
            c = type(ctx)(ctx.images, ctx.labels, detach(ctx.logits), detach(ctx.extras),
                          None if ctx.old_logits is None else ctx.old_logits.detach(),
                          {k: (v.detach() if torch.is_tensor(v) else [t.detach() for t in v] if isinstance(v, list) else v)
                           for k, v in ctx.old_extras.items()},
                          ctx.nb_old, ctx.nb_current, ctx.old_probs)
            _sync(trainer.device)
            t0 = time.perf_counter()
            value = term.weight * term(c)
            if value.requires_grad:
                value.backward()
            _sync(trainer.device)
            times.append(time.perf_counter() - t0)
        shares[term.name] = statistics.median(times)
    return shares


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_worker(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure_method(args, args.worker, torch.device(args.device))
    print("BENCH_JSON " + json.dumps(result))


def measure_method(args, method, device):
    """One method's measurements (module docstring) in this process. Peak memory: CUDA's max
    allocated since this call began; on the CPU the peak RSS increase, meaningful only in a fresh
    process (the driver runs each method in its own)."""
    import gc

    import torch

    torch.manual_seed(0)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = peak_rss_mb()
    opts, model, old, trainer, optim = build_step1(args, method, device)
    n_seen = trainer.nb_current
    batches = synthetic_batches(args.warmup + args.steps, opts, n_seen, device)
    prepare_targets(trainer, batches, opts)  # not timed
    trainer.keep_context = True
    model.train()
    times = []
    try:
        for i, batch in enumerate(batches):
            _sync(device)
            t0 = time.perf_counter()
            trainer.train_iteration(batch, optim)
            _sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    finally:
        trainer.close()
    mem = (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else peak_rss_mb() - rss0
    term_times = time_terms(trainer, trainer.last_context)
    median = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [median, median, median]
    result = {
        "step_s_median": median,
        "step_s_spread": q[2] - q[0],
        "images_per_s": opts.batch_size / median,
        "peak_mem_mb": mem,
        "loss_share": {k: v / median for k, v in term_times.items()},
        "terms": [t.name for t in trainer.recipe.terms],
        "old_model_used": trainer.recipe.needs_old_model,
    }
    if args.eval_only or method == "FT":
        result["eval_images_per_s"] = eval_throughput(model, batches, device, opts)
    if getattr(opts, "nest", False):  # after the timed steps: it installs a classifier in the model
        result["nest"] = nest_pretuning_cost(opts, model, old, batches[args.warmup:], device)
    return result


def nest_pretuning_cost(opts, model, old, batches, device) -> dict:
    """NeST's once-per-step cost on ``batches``: the old model's selection pass and one pre-tuning
    epoch, in seconds per batch, with the pre-tuning epochs NeST runs on VOC and the training epochs
    of the method's VOC sweep (what the README's overhead figure is made of)."""
    import dataclasses

    import methods
    from utils import nest as nest_utils

    settings = nest_utils.NestSettings.from_options(opts)
    pairs = [(images, labels) for images, labels, _ in batches]
    _sync(device)
    t0 = time.perf_counter()
    statistics = nest_utils.selection_statistics(old, pairs, device, model.classes, settings.grid,
                                                 empty_class="uniform")
    _sync(device)
    t1 = time.perf_counter()
    nest_utils.pretune_classifier(dataclasses.replace(settings, epochs=1), model, old, pairs, device, statistics)
    _sync(device)
    t2 = time.perf_counter()
    train_epochs = methods.sweep_settings(opts.method_label, "voc", opts.task)["epochs"]
    return {"selection_s_per_batch": (t1 - t0) / len(pairs), "pretune_s_per_batch": (t2 - t1) / len(pairs),
            "pretune_epochs": settings.epochs, "train_epochs": train_epochs}


def nest_overhead(nest: dict, ft_step_s: float) -> float:
    """NeST's extra time over a step's training: (selection + epochs x pre-tuning) / (training
    epochs x an FT step), per batch (FT as the base method's stand-in)."""
    extra = nest["selection_s_per_batch"] + nest["pretune_epochs"] * nest["pretune_s_per_batch"]
    return extra / (nest["train_epochs"] * ft_step_s)


def eval_throughput(model, batches, device, opts):
    import torch

    model.eval()
    n, t = 0, 0.0
    with torch.no_grad():
        for i, (images, _, _) in enumerate(batches[:6]):
            _sync(device)
            t0 = time.perf_counter()
            model(images)
            _sync(device)
            if i >= 1:
                t += time.perf_counter() - t0
                n += images.shape[0]
    return n / t if t > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
SETTINGS = ("model", "crop_size", "batch_size", "steps", "warmup", "opt_level", "device", "threads", "task")


def run_method(args, method, timeout=None):
    """One method's results, measured in a fresh process (``timeout`` seconds at most)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method]
    for key in SETTINGS:
        cmd += [f"--{key}", str(getattr(args, key))]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise RuntimeError(f"benchmark of {method} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def data_pipeline(args):
    """``--data``: the loader benchmark (``dataset/loader_benchmark.py``); prints and returns it."""
    from dataset.loader_benchmark import LoaderBenchmark, format_report, run_loader_benchmark

    width, height = args.data_image_size
    settings = LoaderBenchmark(images=args.data_images, width=width, height=height,
                               crop_size=args.crop_size, batch_size=args.batch_size,
                               workers=tuple(args.data_workers),
                               feed_images_per_s=args.feed_images_per_s)
    report = {"data": run_loader_benchmark(settings)}
    print(format_report(report["data"]))
    return report


def write_json(path, report):
    from utils.io import atomic_write_text

    atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def main(argv=None):
    args = get_args(argv)
    if args.worker:
        return run_worker(args)
    report = data_pipeline(args) if args.data else benchmark_methods(args)
    if not args.data:
        print_table(report)
    if args.json:
        write_json(args.json, report)
    for method, error in report.get("failed", {}).items():
        print(f"[benchmark] {method} failed:\n{error}", file=sys.stderr)
    if report.get("failed"):
        raise SystemExit(1)
    return report


def benchmark_methods(args, deadline=None, in_process=False):
    """The report: FT first (the reference of ``ratio_to_ft``), then ``args.methods``. With
    ``deadline`` (a ``time.monotonic()`` value) the methods not started before it, or still
    running at it, are listed under ``"skipped"`` instead; a method whose worker fails is listed
    under ``"failed"`` with the end of its output, and the others still run. ``in_process``
    (CUDA only, where peak memory is reset per method) measures in this process instead of a
    fresh one per method, without the seconds of start-up each costs (checked against the
    deadline between methods only)."""
    methods = list(dict.fromkeys(["FT"] + list(args.methods)))
    results, skipped, failed = {}, [], {}
    for m in methods:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            skipped.append(m)
            continue
        print(f"[benchmark] {m} ...", flush=True)
        try:
            results[m] = _measure_in_process(args, m) if in_process else run_method(args, m, timeout=left)
        except subprocess.TimeoutExpired:
            skipped.append(m)
        except Exception as error:  # noqa: BLE001 - a failed method is reported, the others go on
            failed[m] = str(error) if isinstance(error, RuntimeError) and not in_process else _tail(error)
    ft = results.get("FT", {}).get("step_s_median")
    for r in results.values():
        r["ratio_to_ft"] = r["step_s_median"] / ft if ft else None
    eval_ips = results["FT"].pop("eval_images_per_s", None) if "FT" in results else None
    for r in results.values():
        r.pop("eval_images_per_s", None)
    report = {
        "methods": {m: results[m] for m in methods if m in results and (m in args.methods or m == "FT")},
        "eval_images_per_s": eval_ips,
        "settings": {k: getattr(args, k) for k in SETTINGS},
    }
    if skipped:
        report["skipped"] = skipped
    if failed:
        report["failed"] = failed
    return report


def _measure_in_process(args, method):
    import gc

    import torch

    device = torch.device(args.device)
    if device.type != "cuda":
        raise ValueError("in-process measurements need a CUDA device (CPU peak memory is per process)")
    try:
        return measure_method(args, method, device)
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def _tail(error) -> str:
    import traceback

    return "".join(traceback.format_exception(error))[-4000:]


def print_table(report):
    s = report["settings"]
    print(f"\n{s['model']}, {s['crop_size']} px, batch {s['batch_size']}, {s['device']}, {s['opt_level']}, "
          f"{s['steps']} timed steps after {s['warmup']} warm-up")
    header = f"{'method':<8} {'step s':>8} {'IQR s':>7} {'x FT':>6} {'img/s':>7} {'peak MB':>8}  loss terms (share of step)"
    print(header)
    print("-" * len(header))
    for m, r in report["methods"].items():
        shares = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["loss_share"].items()) or "-"
        ratio = f"{r['ratio_to_ft']:>6.2f}" if r["ratio_to_ft"] is not None else f"{'-':>6}"
        print(f"{m:<8} {r['step_s_median']:>8.3f} {r['step_s_spread']:>7.3f} {ratio} "
              f"{r['images_per_s']:>7.2f} {r['peak_mem_mb']:>8.0f}  {shares}")
    if report.get("eval_images_per_s"):
        print(f"evaluation: {report['eval_images_per_s']:.1f} images/s")
    ft = report["methods"].get("FT")
    for m, r in report["methods"].items():
        if r.get("nest") and ft:
            n = r["nest"]
            print(f"{m}: NeST before each step: selection {n['selection_s_per_batch']:.3f} s/batch, pre-tuning "
                  f"{n['pretune_s_per_batch']:.3f} s/batch/epoch; {n['pretune_epochs']} pre-tuning epochs before "
                  f"{n['train_epochs']} training epochs add {100 * nest_overhead(n, ft['step_s_median']):.1f} % "
                  f"(FT's step as the unit)")
    if report.get("skipped"):
        print(f"skipped (out of time): {', '.join(report['skipped'])}")
    if report.get("failed"):
        print(f"failed: {', '.join(report['failed'])}")


if __name__ == "__main__":
    main()
