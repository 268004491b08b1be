"""Compare the continual-segmentation methods on the generated Pascal-VOC stand-in.

    python scripts/synth/compare.py --quick                      (all 17 methods, 15-5, CPU minutes)
    python scripts/synth/compare.py --tasks 15-5 15-1 --seeds 3  (the full setting, several seeds)
    python scripts/synth/compare.py --methods FT MiB --dry_run   (print the run.py commands)

One command: generate the demo tree if it is missing (``dataset.synthetic.ensure_demo_tree``), train
step 0 once per step-0 family and seed, run every method's incremental steps from that checkpoint,
then write ``{workdir}/results/compare_{task}.md`` and ``compare_{task}.png``.

Step-0 families (as ``scripts/common.sh``): FT, LWF, ILT, MiB, PLOP and SATS (and their -M
variants) start from one plain cross-entropy step 0; LWF-MC (BCE), EWC, RW and PI (their importance
is accumulated while step 0 trains) and SSUL (unknown channel, BCE) have their own. Step 1 of a
method starts from its family's file (``--step_ckpt``); later steps chain on the method's own
checkpoints. All runs are overlapped (``--overlap``) and tested on a ``--crop_size`` centre crop
(``--crop_val``). SSUL trains every step with ``--lr0`` (clovaai/SSUL uses one rate at every step,
it only trains the head after step 0) and its step 0 trains the whole network (``--no_freeze``);
the other methods use ``--lr`` after step 0, LWF-MC at most 0.002 (``STEP_LR_CAP``: its iCaRL term
diverges above).

Every ``run.py`` call is a subprocess (cwd ``workdir``, so its ``results/`` go there) whose output is
kept in ``{workdir}/logs/``; a failed call stops the comparison and prints its log tail. A run whose
results rows exist is skipped, so an interrupted comparison resumes where it stopped. The settings
that change results are kept in ``{workdir}/compare_settings.json``; a workdir holding results of
other settings is refused. Seeds: ``--seeds N`` repeats everything from step 0 with
``--random_seed 42 + i`` (42 is run.py's default) and the report gives mean ± sample std.

Reported numbers (``metrics.summarize_step``): base = mean IoU of classes 0..15 (background
included, as the SATS/PLOP tables), new = mean IoU of the classes added after step 0, all = mean IoU
of every class seen so far, all in %.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script: the repository's modules are top-level
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

import tasks  # noqa: E402
import methods as registry  # noqa: E402
from argparser import canonical_method  # noqa: E402
from tasks import canonical_task  # noqa: E402
from metrics import summarize_step, summary_labels  # noqa: E402
from utils.checkpoint import atomic_write  # noqa: E402
from utils.results import read_results  # noqa: E402
from utils.errors import ArgumentParser  # noqa: E402

DATASET = "voc"
KEYS = ("base", "new", "all", "hIoU")  # hIoU: harmonic mean of base (background included) and new
DATE = "compare"  # run.py's --date: stable results names, so a later day resumes the same files
DEFAULT_METHODS = ("FT", "LWF", "LWF-MC", "ILT", "EWC", "RW", "PI", "MiB", "PLOP", "SSUL", "SATS",
                   "DKD", "DKD-M", "MiB+NeST", "SATS+NeST", "MiB+EWF", "SATS+EWF")
DEFAULT_TASKS = ("15-5", "15-1")
FIRST_SEED = 42
LOG_TAIL_LINES = 40

# Methods that train every step with the step-0 learning rate.
_SAME_LR_AT_EVERY_STEP = {"SSUL"}
# Upper bound of the learning rate after step 0. LwF-MC's iCaRL term is a BCE summed over the old
# classes and weighted by icarl_importance (10 x 16 on 15-5): at lr 0.005 its step 1 diverges
# (NaN within a dozen iterations) from a scratch-trained step 0; 0.002 is stable. The MiB/PLOP
# papers ran every method at 0.001 there.
STEP_LR_CAP = {"LWF-MC": 0.002}
# DKD trains its head and classifiers at 10x the body's rate (--lr_head 10 in its preset): its
# rates are scaled so that head and classifiers learn at the others' rate, at every step (at the
# unscaled 0.02 its step 0 diverges from scratch).
LR_SCALE = {"DKD": 0.1}


@dataclass(frozen=True)
class Settings:
    """Everything that changes the numbers of a comparison (recorded in the workdir)."""

    model: str
    crop_size: int
    batch_size: int
    epochs0: int
    epochs: int
    lr0: float
    lr: float
    num_train: int
    num_val: int
    image_size: int


# The full setting: the default demo tree (1000 + 200 images of 128 px) at full resolution.
FULL = Settings(model="segformer_b0", crop_size=128, batch_size=8, epochs0=12, epochs=6, lr0=0.02,
                lr=0.005, num_train=1000, num_val=200, image_size=128)
# --quick: timed to finish the 11 original methods on 15-5 within 20 minutes on 2 CPU cores. lr0 0.02:
# at 0.05 the summed-over-channels BCE of LWF-MC's step 0 diverges (NaN) from scratch; at 0.01
# six epochs leave the CE step 0 near 30 % mIoU instead of 45 %.
QUICK = Settings(model="segformer_b0", crop_size=64, batch_size=8, epochs0=6, epochs=3, lr0=0.02,
                 lr=0.005, num_train=600, num_val=150, image_size=64)


@dataclass
class Run:
    """One run.py invocation: ``steps`` of ``name`` on ``task`` with ``seed``."""

    kind: str  # "step0" or "method"
    label: str  # method (or step-0 family method) as shown in the report
    name: str  # run.py --name
    task: str
    seed: int
    steps: list
    argv: list = field(default_factory=list)
    log_path: str = ""


# ----------------------------------------------------------------------------------- naming
def method_label(method: str) -> str:
    """Canonical spelling of a method, techniques and ``-M`` kept: ``"mib+ewf-m"`` -> ``"MiB+EWF-M"``."""
    return registry.parse(method).label


def step0_family(method: str) -> str:
    """The step-0 model a method shares (the registry's): ``"ce"`` for FT/LWF/ILT/MiB/PLOP/SATS."""
    return registry.step0_family(method)


def step0_name(family: str, seed: int) -> str:
    return f"step0-{family}_s{seed}"


def method_run_name(label: str, seed: int) -> str:
    return f"{label}_s{seed}"


def seed_values(count: int) -> list:
    """``--seeds N`` -> random seeds 42, 43, ..., 42 + N - 1."""
    if count < 1:
        raise ValueError(f"--seeds must be at least 1, got {count}")
    return [FIRST_SEED + i for i in range(count)]


def results_csv(workdir, task: str, name: str) -> str:
    """Where run.py (started in ``workdir``) writes the results of ``name``."""
    return os.path.join(workdir, "results", f"{DATE}_{DATASET}_{canonical_task(DATASET, task)}_{name}.csv")


def checkpoint_file(workdir, task: str, name: str, step: int) -> str:
    # run.py names files after the canonical task (15-1 is the table's 15-5s)
    return os.path.join(workdir, "checkpoints", f"{canonical_task(DATASET, task)}-{DATASET}_{name}_{step}.pth")


# ----------------------------------------------------------------------------------- planning
def common_args(settings: Settings, workdir, data_root, task: str, seed: int, num_workers: int) -> list:
    """run.py options shared by every call of the comparison."""
    return [
        "--data_root", str(data_root), "--dataset", DATASET, "--task", task, "--overlap",
        "--model", settings.model, "--no_pretrained", "--crop_size", str(settings.crop_size),
        "--crop_val", "--batch_size", str(settings.batch_size), "--num_workers", str(num_workers),
        "--random_seed", str(seed), "--date", DATE,
        "--checkpoint", os.path.join(workdir, "checkpoints"),
        "--logdir", os.path.join(workdir, "tensorboard"),
        "--idxs_dir", os.path.join(workdir, "indices"),
        "--no_progress",
    ]


def done_steps(csv_path: str) -> set:
    """Steps that have a row in the results CSV (none when the file does not exist)."""
    if not os.path.isfile(csv_path):
        return set()
    _, rows = read_results(csv_path)
    return {int(row[0]) for row in rows}


def pending_steps(workdir, task: str, name: str) -> list:
    """Incremental steps (>= 1) of ``name`` still to run.

    From the first step without a row to the last; when that step is > 1 it also needs the
    checkpoint of the step before, otherwise the method restarts from step 1.
    """
    num_steps = tasks.get_num_steps(DATASET, task)
    done = done_steps(results_csv(workdir, task, name))
    missing = [step for step in range(1, num_steps) if step not in done]
    if not missing:
        return []
    first = missing[0]
    if first > 1 and not os.path.isfile(checkpoint_file(workdir, task, name, first - 1)):
        first = 1
    return list(range(first, num_steps))


def step0_done(workdir, task: str, name: str) -> bool:
    return 0 in done_steps(results_csv(workdir, task, name)) and \
        os.path.isfile(checkpoint_file(workdir, task, name, 0))


def plan_runs(methods, task_names, seeds, settings: Settings, workdir, data_root, num_workers=0,
              python=sys.executable) -> list:
    """The run.py calls still needed, in execution order: per task and seed, each step-0 family
    the methods need (once), then each method's pending incremental steps.

    Runs whose results already exist are left out (resumable). Returns a list of :class:`Run`.
    """
    workdir = os.path.abspath(workdir)
    labels = [method_label(m) for m in methods]
    script = str(REPO_ROOT / "run.py")
    runs = []
    for task in task_names:
        for seed in seeds:
            common = common_args(settings, workdir, data_root, task, seed, num_workers)
            families = list(dict.fromkeys(step0_family(label) for label in labels))
            for family in families:
                name = step0_name(family, seed)
                if step0_done(workdir, task, name):
                    continue
                step0_method = registry.step0_method(family)
                lr0 = settings.lr0 * LR_SCALE.get(step0_method, 1.0)
                argv = [python, script, *common, "--name", name, "--method", step0_method,
                        "--step", "0", "--lr", _number(lr0), "--epochs", str(settings.epochs0)]
                if family == "ssul":
                    # SSUL freezes the network only from step 1 (clovaai/SSUL: `opts.freeze and
                    # curr_step > 0`); run.py's param_groups applies --freeze at step 0 as well.
                    argv.append("--no_freeze")
                    # every step 0 here trains from scratch at one rate; clovaai's two step-0 rates
                    # (the SSUL preset: body 0.001, head 0.01) are for an ImageNet-pretrained body
                    argv += ["--lr_body0", _number(settings.lr0), "--lr_head0", _number(settings.lr0)]
                runs.append(Run("step0", step0_method, name, task, seed, [0], argv,
                                _log_path(workdir, task, name, [0])))
            for label in labels:
                name = method_run_name(label, seed)
                steps = pending_steps(workdir, task, name)
                if not steps:
                    continue
                lr = incremental_lr(label, settings)
                argv = [python, script, *common, "--name", name, "--method", label,
                        "--step", *map(str, steps), "--lr", _number(lr), "--epochs", str(settings.epochs)]
                if steps[0] == 1:
                    argv += ["--step_ckpt", checkpoint_file(workdir, task, step0_name(step0_family(label), seed), 0)]
                runs.append(Run("method", label, name, task, seed, steps, argv,
                                _log_path(workdir, task, name, steps)))
    return runs


def incremental_lr(method: str, settings: Settings) -> float:
    """Learning rate of ``method`` after step 0: ``--lr``, SSUL ``--lr0``, capped by STEP_LR_CAP."""
    name, _ = canonical_method(method)
    lr = settings.lr0 if name in _SAME_LR_AT_EVERY_STEP else settings.lr
    return min(lr * LR_SCALE.get(name, 1.0), STEP_LR_CAP.get(name, math.inf))


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _log_path(workdir, task, name, steps) -> str:
    span = str(steps[0]) if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
    return os.path.join(workdir, "logs", f"{task}_{name}_step{span}.txt")


# ----------------------------------------------------------------------------------- running
def execute(run: Run, workdir) -> tuple:
    """Run one run.py call in ``workdir`` with its output in ``run.log_path``.

    Returns ``(wall seconds, CPU seconds)``; the CPU time (user + system of the child) tells the
    cost of a call apart from the waiting on a shared machine.

    Raises ``RuntimeError`` with the command and the log tail when the call fails.
    """
    os.makedirs(os.path.dirname(run.log_path), exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("MPLBACKEND", "Agg")
    start, cpu_start = time.perf_counter(), _children_cpu_seconds()
    with open(run.log_path, "w") as log:
        log.write("$ " + shlex.join(run.argv) + "\n")
        log.flush()
        code = subprocess.call(run.argv, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds, cpu = time.perf_counter() - start, _children_cpu_seconds() - cpu_start
    if code != 0:
        raise RuntimeError(
            f"run.py failed (exit code {code}) for {run.name} on {run.task}, steps {run.steps}.\n"
            f"command: {shlex.join(run.argv)}\nlog: {run.log_path}\n--- last lines ---\n"
            f"{log_tail(run.log_path)}")
    return seconds, cpu


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    with open(path, errors="replace") as handle:
        return "".join(handle.readlines()[-lines:])


def prepare_data(data_root, settings: Settings) -> str:
    """Generate ``{data_root}/PascalVOC12`` if it is missing; returns the tree's path.

    An existing generated tree must have the requested size; an existing tree without the
    generator's marker is taken as real data and used as it is.
    """
    from dataset.synthetic import MARKER, ensure_demo_tree

    tree = os.path.join(os.path.abspath(data_root), "PascalVOC12")
    marker = os.path.join(tree, MARKER)
    if os.path.isdir(tree) and not os.path.isfile(marker):
        print(f"{tree} is not a generated tree: using it as it is", file=sys.stderr)
        return tree
    if os.path.isfile(marker):
        with open(marker) as handle:
            made = json.load(handle)
        wanted = {"num_train": settings.num_train, "num_val": settings.num_val, "size": settings.image_size}
        differ = {k: (made.get(k), v) for k, v in wanted.items() if made.get(k) != v}
        if differ:
            raise ValueError(
                f"{tree} was generated with other parameters ({', '.join(f'{k}: {a} there, {b} wanted' for k, (a, b) in differ.items())}); "
                f"pass another --data_root or the tree's values (--num_train/--num_val/--image_size)")
        return tree
    start = time.perf_counter()
    ensure_demo_tree(tree, DATASET, settings.num_train, settings.num_val, settings.image_size)
    print(f"generated {tree} ({settings.num_train} + {settings.num_val} images, "
          f"{settings.image_size} px) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return tree


def claim_workdir(workdir, settings: Settings) -> None:
    """Create the workdir (git-ignored: a ``.gitignore`` of ``*``) and record the settings.

    Raises ``ValueError`` when it already holds results of other settings.
    """
    os.makedirs(workdir, exist_ok=True)
    ignore = os.path.join(workdir, ".gitignore")
    if not os.path.exists(ignore):
        with open(ignore, "w") as handle:
            handle.write("# outputs of scripts/synth/compare.py\n*\n")
    record = os.path.join(workdir, "compare_settings.json")
    wanted = asdict(settings)
    if os.path.isfile(record):
        with open(record) as handle:
            saved = json.load(handle)
        if saved != wanted:
            changed = ", ".join(f"{k}: {saved.get(k)} -> {v}" for k, v in wanted.items() if saved.get(k) != v)
            raise ValueError(
                f"{workdir} holds results of other settings ({changed}); pass another --workdir "
                f"or delete that folder")
        return
    text = json.dumps(wanted, indent=1) + "\n"
    atomic_write(record, lambda handle: handle.write(text.encode()))


# ----------------------------------------------------------------------------------- report
def parse_class_iou(row: list) -> list:
    """Per-class IoUs of a results row (``step, IoU_0, ..., mIoU``); NaN for ``x`` / ``X``."""
    values = []
    for cell in row[1:-1]:
        cell = cell.strip()
        values.append(math.nan if cell in ("x", "X") else float(cell))
    return values


def step_summaries(csv_path: str, task: str, steps) -> dict:
    """``{step: {"base", "new", "all"}}`` (fractions) of the given steps of a results CSV."""
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"results file {csv_path} is missing: run the comparison first")
    _, rows = read_results(csv_path)
    by_step = {int(row[0]): row for row in rows}
    n_base = tasks.get_per_task_classes(DATASET, task, 0)[0]
    out = {}
    for step in steps:
        if step not in by_step:
            raise ValueError(f"{csv_path} has no row for step {step}")
        n_seen = sum(tasks.get_per_task_classes(DATASET, task, step))
        out[step] = summarize_step(parse_class_iou(by_step[step]), n_base, n_seen, hiou=True)
    return out


def collect(workdir, task: str, labels, seeds) -> dict:
    """``{label: {step: {"base"|"new"|"all"|"hIoU": [value per seed]}}}``: step 0 from the method's
    step-0 family, later steps from the method's own file."""
    num_steps = tasks.get_num_steps(DATASET, task)
    table = {}
    for label in labels:
        per_step = {step: {key: [] for key in KEYS} for step in range(num_steps)}
        for seed in seeds:
            first = step_summaries(results_csv(workdir, task, step0_name(step0_family(label), seed)), task, [0])
            rest = step_summaries(results_csv(workdir, task, method_run_name(label, seed)), task,
                                  range(1, num_steps))
            for step, summary in {**first, **rest}.items():
                for key, value in summary.items():
                    per_step[step][key].append(value)
        table[label] = per_step
    return table


def mean_std(values) -> tuple:
    """Mean and sample standard deviation (ddof 1; NaN for one value) ignoring NaN entries."""
    values = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan


def format_cell(values) -> str:
    """``"53.3"`` or ``"53.3 ± 1.2"`` (percent) for one or several seeds; ``"-"`` when undefined."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.1f}" if math.isnan(std) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _table(header, rows) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def report_markdown(task: str, table: dict, seeds, settings: Settings, command: str = "") -> str:
    """The comparison report of one task (see ``write_report``)."""
    num_steps = tasks.get_num_steps(DATASET, task)
    last = num_steps - 1
    n_base = tasks.get_per_task_classes(DATASET, task, 0)[0]
    n_all = sum(tasks.get_per_task_classes(DATASET, task, last))
    base_name, new_name, _ = summary_labels(n_base, n_all)
    spread = f"mean ± sample std over {len(seeds)} seeds ({', '.join(map(str, seeds))})" \
        if len(seeds) > 1 else f"one seed ({seeds[0]})"
    lines = [
        f"# Method comparison: VOC {task} (overlapped) on the generated dataset", "",
        f"mIoU in %, {spread}. base = classes {base_name} (background included), new = classes "
        f"added after step 0, all = every class seen so far. Step 0 is shared by the methods of a "
        f"step-0 family (FT/LWF/ILT/MiB/PLOP/SATS and their +NeST/+EWF: cross-entropy; LWF-MC, EWC, RW, PI, "
        f"SSUL, DKD: own). hIoU = harmonic mean of base and new.", "",
        f"Settings: model {settings.model} (from scratch), crop {settings.crop_size} px, batch "
        f"{settings.batch_size}, step 0: {settings.epochs0} epochs at lr {settings.lr0}, later steps: "
        f"{settings.epochs} epochs at lr {settings.lr} ({_lr_exceptions(table, settings)}); data "
        f"{settings.num_train} train + {settings.num_val} val images of {settings.image_size} px.",
    ]
    if command:
        lines += ["", f"Command: `{command}`"]
    lines += ["", f"## All methods after the last step (step {last})", ""]
    lines += _table(["method", base_name, new_name, "all", "hIoU"],
                    [[label] + [format_cell(per_step[last][k]) for k in KEYS]
                     for label, per_step in table.items()])
    lines += ["", "## Per method, after each step", ""]
    for label, per_step in table.items():
        rows = []
        for step in range(num_steps):
            n_seen = sum(tasks.get_per_task_classes(DATASET, task, step))
            rows.append([str(step), str(n_seen)] + [format_cell(per_step[step][k]) for k in KEYS])
        lines += [f"### {label}", ""] + _table(["step", "classes seen", base_name, "new", "all", "hIoU"], rows) + [""]
    return "\n".join(lines)


def _lr_exceptions(table: dict, settings: Settings) -> str:
    other = {label: incremental_lr(label, settings) for label in table}
    other = {label: lr for label, lr in other.items() if lr != settings.lr}
    return ", ".join(f"{label}: {lr}" for label, lr in other.items()) or "every method"


def report_figure(task: str, table: dict, seeds):
    """Base-class mIoU (%) against the step, one line per method (band: ± std over seeds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_steps = tasks.get_num_steps(DATASET, task)
    n_base = tasks.get_per_task_classes(DATASET, task, 0)[0]
    figure = Figure(figsize=(7.0, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    steps = np.arange(num_steps)
    for index, (label, per_step) in enumerate(table.items()):
        stats = np.array([mean_std(per_step[step]["base"]) for step in steps]) * 100.0
        line, = axes.plot(steps, stats[:, 0], label=label, **_line_style(index))
        if len(seeds) > 1:
            axes.fill_between(steps, stats[:, 0] - stats[:, 1], stats[:, 0] + stats[:, 1],
                              color=line.get_color(), alpha=0.15)
    axes.set(title=f"VOC {task} (overlapped): base classes 0-{n_base - 1}", xlabel="step",
             ylabel="base-class mIoU (%)", xticks=steps, xlim=(-0.3, num_steps - 0.7))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    return figure


def _line_style(index: int) -> dict:
    """Colour and marker of the ``index``-th method: 20 distinct colours (tab20, dark shades
    first), so the 17 methods never share one as they do in the 10-colour default cycle."""
    from matplotlib import colormaps

    shade = (2 * index) % 20 + (2 * index) // 20 % 2
    return {"color": colormaps["tab20"](shade), "marker": "osD^v<>ph*"[index % 10]}


def write_report(workdir, task: str, labels, seeds, settings: Settings, command: str = "") -> tuple:
    """Write ``{workdir}/results/compare_{task}.md`` and ``.png``; returns both paths."""
    table = collect(workdir, task, labels, seeds)
    folder = os.path.join(workdir, "results")
    os.makedirs(folder, exist_ok=True)
    md_path = os.path.join(folder, f"compare_{task}.md")
    png_path = os.path.join(folder, f"compare_{task}.png")
    text = report_markdown(task, table, seeds, settings, command) + "\n"
    atomic_write(md_path, lambda handle: handle.write(text.encode()))
    figure = report_figure(task, table, seeds)
    atomic_write(png_path, lambda handle: figure.savefig(handle, format="png", dpi=110))
    return md_path, png_path


# ----------------------------------------------------------------------------------- CLI
def get_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="scripts/synth/compare.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help="methods (run.py presets, -M for the exemplar memory)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="VOC tasks (default 15-5 15-1; with --quick: 15-5)")
    parser.add_argument("--seeds", type=int, default=1, help="repeat everything with N seeds (42, 43, ...)")
    parser.add_argument("--quick", action="store_true",
                        help=f"small setting for 2 CPU cores: {_describe(QUICK)}")
    group = parser.add_argument_group(f"settings (default: {_describe(FULL)}; --quick: see above)")
    group.add_argument("--model", default=None)
    group.add_argument("--epochs0", type=int, default=None, help="epochs of step 0")
    group.add_argument("--epochs", type=int, default=None, help="epochs of each later step")
    group.add_argument("--crop_size", type=int, default=None)
    group.add_argument("--batch_size", type=int, default=None)
    group.add_argument("--lr0", type=float, default=None, help="learning rate of step 0")
    group.add_argument("--lr", type=float, default=None, help="learning rate of later steps")
    group.add_argument("--num_train", type=int, default=None, help="training images of a generated tree")
    group.add_argument("--num_val", type=int, default=None, help="validation images of a generated tree")
    group.add_argument("--image_size", type=int, default=None, help="image height of a generated tree")
    parser.add_argument("--data_root", default=None,
                        help="folder holding PascalVOC12/ (default demo_data, with --quick "
                             "demo_data/quick, under the repository); generated when missing")
    parser.add_argument("--workdir", default=None,
                        help="checkpoints, logs and results of the comparison (default runs/compare, "
                             "with --quick runs/compare_quick, under the repository)")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers of run.py")
    parser.add_argument("--dry_run", action="store_true", help="print the run.py commands, run nothing")
    return parser


def _describe(settings: Settings) -> str:
    return (f"{settings.model}, crop {settings.crop_size}, batch {settings.batch_size}, epochs "
            f"{settings.epochs0}/{settings.epochs}, lr {settings.lr0}/{settings.lr}, data "
            f"{settings.num_train}+{settings.num_val} images of {settings.image_size} px")


def resolve_settings(args) -> Settings:
    """``--quick`` or the full setting, with every option given on the command line on top."""
    base = asdict(QUICK if args.quick else FULL)
    for key in base:
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    settings = Settings(**base)
    for key in ("crop_size", "batch_size", "epochs0", "epochs", "num_train", "num_val", "image_size"):
        if getattr(settings, key) < 1:
            raise ValueError(f"--{key} must be at least 1, got {getattr(settings, key)}")
    for key in ("lr0", "lr"):
        if not getattr(settings, key) > 0:
            raise ValueError(f"--{key} must be positive, got {getattr(settings, key)}")
    return settings


def check_tasks(task_names) -> list:
    for task in task_names:
        tasks.get_num_steps(DATASET, task)  # raises with the valid names for an unknown task
    return list(task_names)


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        settings = resolve_settings(args)
        labels = list(dict.fromkeys(method_label(m) for m in args.methods))
        task_names = check_tasks(args.tasks or (["15-5"] if args.quick else list(DEFAULT_TASKS)))
        seeds = seed_values(args.seeds)
    except (ValueError, KeyError) as error:
        get_parser().error(str(error))
    workdir = os.path.abspath(args.workdir or REPO_ROOT / "runs" / ("compare_quick" if args.quick else "compare"))
    data_root = os.path.abspath(args.data_root or REPO_ROOT / "demo_data" / ("quick" if args.quick else ""))
    command = "python scripts/synth/compare.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    runs = plan_runs(labels, task_names, seeds, settings, workdir, data_root, args.num_workers)

    if args.dry_run:
        print(f"# cd {shlex.quote(workdir)} && export PYTHONPATH={shlex.quote(str(REPO_ROOT))}")
        for run in runs:
            print(shlex.join(run.argv))
        return 0

    claim_workdir(workdir, settings)
    prepare_data(data_root, settings)
    start, cpu_start = time.perf_counter(), _children_cpu_seconds()
    for index, run in enumerate(runs, 1):
        print(f"[{index}/{len(runs)}] {run.task} {run.name} step {' '.join(map(str, run.steps))} ...",
              end=" ", flush=True)
        try:
            seconds, cpu = execute(run, workdir)
        except RuntimeError as error:
            print("FAILED", flush=True)
            print(error, file=sys.stderr)
            return 1
        print(f"{seconds:.0f} s (CPU {cpu:.0f} s)", flush=True)
    for task in task_names:
        md_path, png_path = write_report(workdir, task, labels, seeds, settings, command)
        print(f"{task}: {md_path}, {png_path}")
        _print_last_step(md_path)
    print(f"{len(runs)} run.py calls in {time.perf_counter() - start:.0f} s "
          f"(CPU {_children_cpu_seconds() - cpu_start:.0f} s)")
    return 0


def _print_last_step(md_path: str) -> None:
    with open(md_path) as handle:
        text = handle.read()
    section = text.split("## All methods after the last step", 1)[1].split("## Per method", 1)[0]
    print("## All methods after the last step" + section.rstrip())


if __name__ == "__main__":
    from utils.errors import report

    try:
        sys.exit(main())
    except Exception as error:  # noqa: BLE001 - report() re-raises what is not a user error
        sys.exit(report(error))
