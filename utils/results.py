"""The per-run results CSV (SATS/PLOP ``run.py`` format) and its JSON companion.

CSV layout: a header ``step,0,1,...,{N-1},mIoU`` then one row per step::

    step, IoU_0, IoU_1, ..., IoU_{N-1}, mIoU

``N`` is the dataset's class count. Class columns are in task order (the model's channel order, so
for shuffled protocols column ``c`` is the ``c``-th class of ``tasks.get_order``). A class not seen
yet (column >= n_seen) is written ``x``; a seen class absent from the test ground truth ``X``; other
values are Python float reprs. The last field is the step's test mIoU.

Differences from the originals, which appended rows to a file without a header: the header, and one
row per step -- writing a step again replaces its row, rows stay sorted by step -- so re-testing a
step or running only some steps gives a consistent file. Files are replaced atomically.
"""

import csv
import io
import json
import math
import os

from .checkpoint import to_safe
from .io import atomic_write_text

__all__ = ["append_results_row", "read_results", "write_run_info", "run_info_path", "format_iou"]

UNSEEN = "x"
ABSENT = "X"


def format_iou(value):
    """CSV cell of one IoU: ``X`` for a class without ground truth (NaN / ``"X"``), else the float."""
    if value is None or (isinstance(value, str) and value.upper() == ABSENT):
        return ABSENT
    value = float(value)
    return ABSENT if math.isnan(value) else repr(value)


def _row_cells(step, class_iou, n_classes_total, n_seen, miou):
    if not 1 <= n_seen <= n_classes_total:
        raise ValueError(f"need 1 <= n_seen <= n_classes_total, got {n_seen} and {n_classes_total}")
    if isinstance(class_iou, dict):
        seen = [class_iou.get(c, math.nan) for c in range(n_seen)]
    else:
        seen = list(class_iou)
        if len(seen) < n_seen:
            raise ValueError(f"class_iou has {len(seen)} values but n_seen={n_seen}")
        seen = seen[:n_seen]
    cells = [format_iou(v) for v in seen] + [UNSEEN] * (n_classes_total - n_seen)
    return [str(int(step)), *cells, repr(float(miou))]


def read_results(path):
    """``(header or None, rows)`` of a results CSV, each row a list of strings.

    Files without a header (the originals') are read too.
    """
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if rows and not rows[0][0].strip().lstrip("-").isdigit():
        return rows[0], rows[1:]
    return None, rows


def append_results_row(path, step, class_iou, n_classes_total, n_seen, miou):
    """Write the row of ``step`` into the CSV at ``path`` (creating it), replacing an older row of
    the same step. ``class_iou``: dict {class index: IoU} or a sequence, NaN/"X" for classes absent
    from the test ground truth; ``n_seen`` = classes seen so far, background included. Returns
    whether an older row of the step was replaced."""
    new_row = _row_cells(step, class_iou, n_classes_total, n_seen, miou)
    header = ["step", *map(str, range(n_classes_total)), "mIoU"]
    rows = []
    if os.path.exists(path):
        old_header, rows = read_results(path)
        widths = {len(row) for row in rows} | ({len(old_header)} if old_header else set())
        if widths - {len(header)}:
            raise ValueError(
                f"{path} holds rows of {sorted(widths)} columns, this row has {len(header)}: "
                "it belongs to another dataset or run; use another file name")
    replaced = any(int(row[0]) == int(step) for row in rows)
    rows = [row for row in rows if int(row[0]) != int(step)] + [new_row]
    rows.sort(key=lambda row: int(row[0]))
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    atomic_write_text(path, buffer.getvalue())
    return replaced


def run_info_path(csv_path):
    """The JSON companion of a results CSV: same path with the ``.json`` suffix."""
    root, _ = os.path.splitext(os.fspath(csv_path))
    return root + ".json"


def write_run_info(path, info_dict, step=None):
    """Write run information as JSON next to the results CSV (``run_info_path(path)``).

    ``info_dict``: options (an ``argparse.Namespace`` is converted to a dict), seed, world size,
    per-process batch, ... Without ``step`` the file is ``info_dict``; with ``step`` the file holds
    ``{"steps": {"<step>": info_dict, ...}}`` and the other steps' entries are kept, since each
    step of a protocol is usually a separate invocation. Returns the JSON path.
    """
    json_path = run_info_path(path)
    info = _jsonable(to_safe(info_dict, "run info"))
    if step is not None:
        content = {"steps": {}}
        if os.path.exists(json_path):
            with open(json_path) as handle:
                content = json.load(handle)
            if not isinstance(content.get("steps"), dict):
                raise ValueError(f"{json_path} is not a per-step run-info file")
        content["steps"][str(int(step))] = info
        content["steps"] = dict(sorted(content["steps"].items(), key=lambda item: int(item[0])))
        info = content
    text = json.dumps(info, indent=2, sort_keys=False) + "\n"
    atomic_write_text(json_path, text)
    return json_path


def _jsonable(obj):
    if hasattr(obj, "tolist"):  # tensors
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(key): _jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(value) for value in obj]
    if isinstance(obj, bytes):
        return obj.decode(errors="replace")
    return obj
