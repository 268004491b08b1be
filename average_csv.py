"""Summarise results CSVs (``utils/results.py`` format; the originals' header-less files work too).

    python average_csv.py results/2024-01-01_voc_15-1_SATS.csv --dataset voc --task 15-1
    python average_csv.py results/*_voc_15-1_SATS-seed*.csv --dataset voc --task 15-1

For every step row it prints the mean IoU of the base classes (``base``, background included, as
the SATS/PLOP tables and DKD's "old"), of the classes added after step 0 (``new``), of all seen
classes (``all``) and their harmonic mean ``hIoU = 2·base·new / (base + new)`` (DKD), then the
averages over the rows (``avg``) and, named ``base`` / ``new`` / ``all`` / ``hIoU``, the values
after the last step. ``--old_without_background`` adds the base mean without background and its
hIoU (MiB's and WILSON's "1-15"). The old/new boundary is the size of step 0 in the task table
(``--dataset``/``--task``); without them it is the number of classes seen in the first row, as in
the originals.

Several files (seeds, or shuffled class orders of one protocol: columns are in task order, so the
boundary is a column index in every file) must hold the same steps; each cell is then the mean ±
sample standard deviation (n - 1) over the files, NaN values left out.

``--legacy_lines`` appends, per file, the originals' five lines (SATS/PLOP ``average_csv.py``):
``Last Step``, ``Final Mean IoU`` (last row's mIoU), ``Average Mean IoU`` (mean of the mIoU column
over the rows), ``Mean IoU first`` / ``Mean IoU last`` (base / new classes of the last row), x100
and rounded to 2 decimals. One difference: a seen class without ground truth (``X``) is left out of
the base/new means; the originals added 0 for it while counting it in the divisor.

A missing or malformed file prints ``error: <message>`` and exits with status 2.
"""

import argparse
import csv
import math
import os
import sys
from typing import List, NamedTuple, Optional, Sequence

from metrics.stream_metrics import summarize_step, summary_labels
from utils.errors import ArgumentParser
from utils.results import ABSENT, UNSEEN, read_results

import tasks


class StepRow(NamedTuple):
    """One CSV row: the step, the IoU of each seen class (NaN for ``X``), the row's mIoU."""

    step: int
    ious: List[float]
    miou: float


class RunResults(NamedTuple):
    path: str
    rows: List[StepRow]


class Columns(NamedTuple):
    """The summary columns: ``summarize_step`` keys and the names printed for them."""

    keys: List[str]
    names: List[str]


# --------------------------------------------------------------------------------- reading
def _parse_row(row, path) -> StepRow:
    if len(row) < 3:
        raise ValueError(f"{path}: row {','.join(row)!r} has no class column (expected step, IoUs, mIoU)")
    try:
        step = int(row[0])
        miou = float(row[-1])
    except ValueError:
        raise ValueError(f"{path}: malformed row {','.join(row)!r}") from None
    cells = [cell.strip() for cell in row[1:-1]]
    n_seen = sum(cell != UNSEEN for cell in cells)
    if n_seen == 0:
        raise ValueError(f"{path}: step {step} has no seen class (every cell is 'x')")
    if any(cell != UNSEEN for cell in cells[n_seen:]):
        raise ValueError(f"{path}: step {step} has seen classes after an unseen one ('x')")
    try:
        ious = [math.nan if cell == ABSENT else float(cell) for cell in cells[:n_seen]]
    except ValueError:
        raise ValueError(f"{path}: step {step} has a cell that is not an IoU, 'x' or 'X'") from None
    return StepRow(step, ious, miou)


def read_run(path) -> RunResults:
    """The rows of one results CSV; ``FileNotFoundError`` / ``ValueError`` naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        _, raw_rows = read_results(path)
    except (csv.Error, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a results CSV: {error}") from None
    if not raw_rows:
        raise ValueError(f"{path} holds no result rows")
    widths = {len(row) for row in raw_rows}
    if len(widths) > 1:
        raise ValueError(f"{path}: rows have different numbers of columns {sorted(widths)}")
    return RunResults(path, [_parse_row(row, path) for row in raw_rows])


def _check_task(run: RunResults, dataset, task) -> None:
    for step, cells, _ in run.rows:
        expected = sum(tasks.get_per_task_classes(dataset, task, step))
        if len(cells) != expected:
            raise ValueError(
                f"{run.path}: step {step} has {len(cells)} seen classes but task {task!r} on "
                f"{dataset!r} has {expected} at that step; wrong --task or --dataset?")


def _check_same_steps(runs: Sequence[RunResults]) -> None:
    first = [row.step for row in runs[0].rows]
    for run in runs[1:]:
        steps = [row.step for row in run.rows]
        if steps != first:
            raise ValueError(f"{run.path} holds steps {steps} but {runs[0].path} holds {first}; "
                             "the files must summarise the same steps")


# ---------------------------------------------------------------------------- statistics
def _nanmean(values):
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _mean_std(values):
    """Mean and sample standard deviation (n - 1) of the non-NaN values; std NaN below two."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _cell(values) -> str:
    """``"60.00"`` for one value, ``"60.00 ± 0.50"`` over several (x100); ``"-"`` when undefined."""
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.2f}" if math.isnan(std) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _columns(n_base, n_total, old_without_background) -> Columns:
    keys = ["base", "new", "all", "hIoU"] + (["base_fg", "hIoU_fg"] if old_without_background else [])
    labels = summary_labels(n_base, n_total, hiou=True, old_without_background=old_without_background)
    prefixes = {"base": "base ", "new": "new ", "base_fg": "base "}
    names = [label if label == key or key not in prefixes else prefixes[key] + label
             for key, label in zip(keys, labels)]
    return Columns(keys, names)


def _step_summaries(run: RunResults, n_base, old_without_background):
    return [summarize_step(row.ious, min(n_base, len(row.ious)), len(row.ious), hiou=True,
                           old_without_background=old_without_background) for row in run.rows]


# ------------------------------------------------------------------------------- output
def _table(rows) -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]


def _legacy_lines(run: RunResults, summaries) -> List[str]:
    last_step, _, last_miou = run.rows[-1]
    mean_miou = sum(row.miou for row in run.rows) / len(run.rows)
    first, last = summaries[-1]["base"], summaries[-1]["new"]
    return [
        f"Last Step: {last_step}",
        f"Final Mean IoU {round(100 * last_miou, 2)}",
        f"Average Mean IoU {round(100 * mean_miou, 2)}",
        f"Mean IoU first {round(100 * first, 2)}",
        f"Mean IoU last {round(100 * last, 2)}",
    ]


def summarize(paths, dataset: Optional[str] = None, task: Optional[str] = None, legacy_lines: bool = False,
              old_without_background: bool = False) -> str:
    """The report printed by the command line, as a string; ``paths`` is one path or a list."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("no results file given")
    if task is not None and dataset is None:
        raise ValueError("--task needs --dataset")
    runs = [read_run(path) for path in paths]
    _check_same_steps(runs)
    if task is not None:
        for run in runs:
            _check_task(run, dataset, task)
        n_base = tasks.get_per_task_classes(dataset, task, 0)[0]
        n_total = len(tasks.get_order(dataset, task))
    else:
        n_base = len(runs[0].rows[0].ious)
        n_total = max(len(row.ious) for run in runs for row in run.rows)
    columns = _columns(n_base, n_total, old_without_background)
    summaries = [_step_summaries(run, n_base, old_without_background) for run in runs]

    def over_files(values_of):
        return [_cell([values_of(per_run)[key] for per_run in summaries]) for key in columns.keys]

    steps = [row.step for row in runs[0].rows]
    table = [["step", *columns.names]]
    table += [[str(step), *over_files(lambda per_run, i=i: per_run[i])] for i, step in enumerate(steps)]
    table.append(["avg", *over_files(lambda per_run: {key: _nanmean([s[key] for s in per_run])
                                                      for key in columns.keys})])
    lines = []
    if len(runs) > 1:
        lines.append(f"{len(runs)} files, mean ± sample std over the files: "
                     + ", ".join(run.path for run in runs))
    lines += _table(table)
    lines.append(f"after step {steps[-1]}:")
    lines += [f"  {name}: {cell}" for name, cell in zip(columns.names, over_files(lambda per_run: per_run[-1]))]
    if legacy_lines:
        for run, per_run in zip(runs, summaries):
            if len(runs) > 1:
                lines.append(f"{run.path}:")
            lines += _legacy_lines(run, per_run)
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line
def get_argparser():
    parser = ArgumentParser(prog="average_csv.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="+", help="results CSV(s) written by run.py; several: mean ± std over them")
    parser.add_argument("--dataset", choices=["voc", "ade"], default=None, help="with --task")
    parser.add_argument("--task", default=None, help="task name, for the base/new boundary (needs --dataset)")
    parser.add_argument("--old_without_background", action="store_true",
                        help="also the base mean without background and its hIoU (MiB/WILSON)")
    parser.add_argument("--legacy_lines", action="store_true",
                        help="also print the originals' lines (Last Step, Final / Average Mean IoU, "
                             "Mean IoU first / last) per file")
    return parser


def main(argv=None):
    parser = get_argparser()
    args = parser.parse_args(argv)
    if args.task is not None and args.dataset is None:
        parser.error("--task needs --dataset (the base/new boundary comes from the task table)")
    if args.task is not None:
        try:
            tasks.get_per_task_classes(args.dataset, args.task, 0)
        except ValueError as error:
            parser.error(str(error))
    try:
        print(summarize(args.csv, args.dataset, args.task, args.legacy_lines, args.old_without_background))
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
