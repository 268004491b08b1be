"""Summarise a results CSV (``utils/results.py`` format; the originals' header-less files work too).

    python average_csv.py results/2024-01-01_voc_15-5s_SATS.csv --dataset voc --task 15-1

For every step row it prints the mean IoU of the base classes (background included, as the papers),
of the classes added after step 0, and of all seen classes, then their averages over the rows.
The old/new boundary is the size of step 0 in the task table (``--dataset``/``--task``); without
them it is the number of classes seen in the first row, as in the originals.

The last five lines are the originals' output (SATS/PLOP ``average_csv.py``):
``Last Step``, ``Final Mean IoU`` (last row's mIoU), ``Average Mean IoU`` (mean of the mIoU column
over the rows), ``Mean IoU first`` / ``Mean IoU last`` (base / new classes of the last row), x100
and rounded to 2 decimals. One difference: a seen class without ground truth (``X``) is left out of
the base/new means; the originals added 0 for it while counting it in the divisor.
"""

import argparse
import math
import sys

from metrics.stream_metrics import summarize_step, summary_labels
from utils.results import ABSENT, UNSEEN, read_results

import tasks


def _parse_row(row, path):
    try:
        step = int(row[0])
        miou = float(row[-1])
    except ValueError:
        raise ValueError(f"{path}: malformed row {','.join(row)!r}") from None
    cells = [cell.strip() for cell in row[1:-1]]
    n_seen = sum(cell != UNSEEN for cell in cells)
    if any(cell != UNSEEN for cell in cells[n_seen:]):
        raise ValueError(f"{path}: step {step} has seen classes after an unseen one ('x')")
    try:
        ious = [math.nan if cell == ABSENT else float(cell) for cell in cells[:n_seen]]
    except ValueError:
        raise ValueError(f"{path}: step {step} has a cell that is not an IoU, 'x' or 'X'") from None
    return step, ious, miou


def _boundary(dataset, task, first_row_seen):
    if task is None:
        return first_row_seen
    if dataset is None:
        raise ValueError("--task needs --dataset")
    return tasks.get_per_task_classes(dataset, task, 0)[0]


def _fmt(value):
    return "-" if math.isnan(value) else f"{100 * value:.2f}"


def _nanmean(values):
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def summarize(path, dataset=None, task=None):
    """The report printed by the command line, as a string."""
    _, raw_rows = read_results(path)
    if not raw_rows:
        raise ValueError(f"{path} holds no result rows")
    rows = [_parse_row(row, path) for row in raw_rows]
    n_base = _boundary(dataset, task, len(rows[0][1]))
    if task is not None:
        for step, cells, _ in rows:
            expected = sum(tasks.get_per_task_classes(dataset, task, step))
            if len(cells) != expected:
                raise ValueError(
                    f"{path}: step {step} has {len(cells)} seen classes but task {task!r} on "
                    f"{dataset!r} has {expected} at that step; wrong --task or --dataset?")

    summaries = [summarize_step(cells, min(n_base, len(cells)), len(cells)) for _, cells, _ in rows]
    n_total = (len(tasks.get_order(dataset, task)) if task is not None
               else max(len(cells) for _, cells, _ in rows))
    labels = summary_labels(n_base, n_total)
    lines = ["{:>6} {:>8} {:>8} {:>8}".format("step", *labels)]
    for (step, _, _), summary in zip(rows, summaries):
        lines.append("{:>6} {:>8} {:>8} {:>8}".format(
            step, *(_fmt(summary[key]) for key in ("base", "new", "all"))))
    averages = [_nanmean([s[key] for s in summaries]) for key in ("base", "new", "all")]
    lines.append("{:>6} {:>8} {:>8} {:>8}".format("avg", *(_fmt(v) for v in averages)))

    last_step, _, last_miou = rows[-1]
    mean_miou = sum(miou for _, _, miou in rows) / len(rows)
    first, last = summaries[-1]["base"], summaries[-1]["new"]
    lines += [
        f"Last Step: {last_step}",
        f"Final Mean IoU {round(100 * last_miou, 2)}",
        f"Average Mean IoU {round(100 * mean_miou, 2)}",
        f"Mean IoU first {round(100 * first, 2)}",
        f"Mean IoU last {round(100 * last, 2)}",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", help="results CSV written by run.py")
    parser.add_argument("--dataset", choices=["voc", "ade"], default=None)
    parser.add_argument("--task", default=None, help="task name, for the base/new boundary")
    args = parser.parse_args(argv)
    try:
        print(summarize(args.csv, args.dataset, args.task))
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
