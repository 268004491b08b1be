"""Class-incremental task protocols for Pascal-VOC 2012 and ADE20K.

A *task* splits a dataset's classes into ordered *steps*. Step 0 holds the background class 0
followed by the base classes; every later step holds only new classes, never 0. The order inside
a step matters: the dataset maps class ids onto output channels in task order
(``labels_old + labels``), so shuffled orders give different channel layouts.

Named protocols are the union of the published tables (SATS, PLOP and MiB ``tasks.py``):

- VOC (21 classes): ``offline``, ``offline18-20`` (SATS's experiment: 0,18,19,20 only), ``19-1``,
  ``19-1b`` (MiB: class 5 last), ``15-5``, ``15-5s`` (the papers' "15-1": 15 base classes, then
  five steps of one class), ``10-1``, ``5-3``, ``10-5-5`` (MiB) and the 22 shuffled orders
  ``15-5s_b`` ... ``15-5s_w`` of SATS (15 base classes in the listed order, then one class a step).
- ADE20K (151 classes, 0 scored as background): ``offline``, ``100-50``, ``100-10``, ``100-5``,
  ``50`` (the papers' "50-50": 50 base classes then two steps of 50), ``50-10``, ``25-25``,
  ``10-10`` and MiB's shuffled ``100-50b/c``, ``100-10b/c``, ``50b/c``.

Aliases: VOC ``15-1`` is ``15-5s``; ADE ``50-50`` is ``50``. An alias resolves to its canonical
name everywhere, including the index-file folder ``path_base``, so both spellings share caches.

Generic protocols (any dataset, no table entry needed; a named entry with the same name wins).
``N`` is the dataset's class count including background, so there are ``N - 1`` foreground classes,
always taken in id order 1, 2, ..., N - 1:

- ``B-I``: step 0 = ``[0, 1, ..., B]``; then steps of ``I`` consecutive classes until class N - 1.
  ``N - 1 - B`` must be a positive multiple of ``I`` (as in every published table: 15-5, 10-1,
  5-3, 100-10, 50-10, 25-25, ...); other splits are rejected rather than guessed.
- ``B-Is``: ``B`` base classes, then the remaining ``I`` classes one per step, the naming of
  ``15-5s``. ``B + I`` must equal ``N - 1``.
- ``B-I1-I2-...`` (three or more numbers): ``B`` base classes, then steps of exactly ``I1``,
  ``I2``, ... classes (MiB's ``10-5-5``). The sizes must add up to ``N - 1``.

Unknown tasks, tasks of another dataset and out-of-range steps raise ``ValueError`` listing the
valid choices.
"""

import operator
import re

__all__ = [
    "tasks_voc",
    "tasks_ade",
    "TASK_ALIASES",
    "num_classes",
    "get_task_list",
    "canonical_task",
    "get_task_dict",
    "get_per_task_dict",
    "get_num_steps",
    "get_task_labels",
    "get_per_task_classes",
    "get_order",
]

_NUM_CLASSES = {"voc": 21, "ade": 151}


def _consecutive(base, step_sizes):
    """Table with step 0 = [0..base] and then blocks of the given sizes in id order."""
    table = {0: list(range(base + 1))}
    first = base + 1
    for step, size in enumerate(step_sizes, start=1):
        table[step] = list(range(first, first + size))
        first += size
    return table


def _base_then_steps(base_order, step_lists):
    """Table with step 0 = [0] + base_order and one step per list in step_lists."""
    table = {0: [0] + list(base_order)}
    for step, labels in enumerate(step_lists, start=1):
        table[step] = list(labels)
    return table


# SATS's shuffled 15-1 orders: (15 base classes in table order, the five single-class steps).
_VOC_15_1_SHUFFLES = {
    "b": ([12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11], [17, 3, 6, 18, 10]),
    "c": ([13, 19, 15, 17, 9, 8, 5, 20, 4, 3, 10, 11, 18, 16, 7], [12, 14, 6, 1, 2]),
    "d": ([15, 3, 2, 12, 14, 18, 20, 16, 11, 1, 19, 8, 10, 7, 17], [6, 5, 13, 9, 4]),
    "e": ([7, 5, 3, 9, 13, 12, 14, 19, 10, 2, 1, 4, 16, 8, 17], [15, 18, 6, 11, 20]),
    "f": ([7, 13, 5, 11, 9, 2, 15, 12, 14, 3, 20, 1, 16, 4, 18], [8, 6, 10, 19, 17]),
    "g": ([7, 5, 9, 1, 15, 18, 14, 3, 20, 10, 4, 19, 11, 17, 16], [12, 8, 6, 2, 13]),
    "h": ([12, 9, 19, 6, 4, 10, 5, 18, 14, 15, 16, 3, 8, 7, 11], [13, 2, 20, 17, 1]),
    "i": ([13, 10, 15, 8, 7, 19, 4, 3, 16, 12, 14, 11, 5, 20, 6], [2, 18, 9, 17, 1]),
    "j": ([1, 14, 9, 5, 2, 15, 8, 20, 6, 16, 18, 7, 11, 10, 19], [3, 4, 17, 12, 13]),
    "k": ([16, 13, 1, 11, 12, 18, 6, 14, 5, 3, 7, 9, 20, 19, 15], [4, 2, 10, 8, 17]),
    "l": ([10, 7, 6, 19, 16, 8, 17, 1, 14, 4, 9, 3, 15, 11, 12], [2, 18, 20, 13, 5]),
    "m": ([18, 4, 14, 17, 12, 10, 7, 3, 9, 1, 8, 15, 6, 13, 2], [5, 11, 20, 16, 19]),
    "n": ([5, 4, 13, 18, 14, 10, 19, 15, 7, 9, 3, 2, 8, 16, 20], [1, 12, 11, 6, 17]),
    "o": ([9, 12, 13, 18, 7, 1, 15, 17, 10, 8, 4, 5, 20, 16, 6], [14, 19, 11, 2, 3]),
    "p": ([9, 12, 13, 18, 2, 11, 15, 17, 10, 8, 4, 5, 20, 16, 6], [14, 19, 1, 7, 3]),
    "q": ([3, 14, 13, 18, 2, 11, 15, 17, 10, 8, 4, 5, 20, 16, 6], [12, 19, 1, 7, 9]),
    "r": ([3, 14, 13, 1, 2, 11, 15, 17, 7, 8, 4, 5, 9, 16, 19], [12, 6, 18, 10, 20]),
    "s": ([3, 14, 6, 1, 2, 11, 12, 17, 7, 20, 4, 5, 9, 16, 19], [15, 13, 18, 10, 8]),
    "t": ([3, 15, 13, 1, 2, 11, 18, 17, 7, 20, 8, 5, 9, 16, 19], [14, 6, 12, 10, 4]),
    "u": ([3, 15, 13, 14, 6, 11, 18, 17, 7, 20, 8, 4, 9, 16, 10], [1, 2, 12, 19, 5]),
    "v": ([1, 2, 12, 14, 6, 19, 18, 17, 5, 20, 8, 4, 9, 16, 10], [3, 15, 13, 11, 7]),
    "w": ([1, 2, 12, 14, 13, 19, 18, 7, 11, 20, 8, 4, 9, 16, 10], [3, 15, 6, 5, 17]),
}

tasks_voc = {
    "offline": _consecutive(20, []),
    "offline18-20": {0: [0, 18, 19, 20]},
    "19-1": _consecutive(19, [1]),
    "19-1b": {0: [0, 1, 2, 3, 4] + list(range(6, 21)), 1: [5]},
    "15-5": _consecutive(15, [5]),
    "15-5s": _consecutive(15, [1] * 5),
    "10-1": _consecutive(10, [1] * 10),
    "5-3": _consecutive(5, [3] * 5),
    "10-5-5": _consecutive(10, [5, 5]),
}
tasks_voc.update(
    {f"15-5s_{letter}": _base_then_steps(base, [[c] for c in steps])
     for letter, (base, steps) in _VOC_15_1_SHUFFLES.items()}
)

# MiB's shuffled ADE orders. In both variants the three 50-class blocks of ``50b``/``50c`` are
# reused: ``100-50x`` = (first + second block sorted, third block) and ``100-10x`` splits the third
# block into the five 10-class steps below (MiB tasks.py lists them in full; they agree).
_ADE_B_FIRST50 = [
    0, 1, 9, 14, 18, 22, 24, 25, 27, 28, 29, 32, 38, 42, 45, 46, 47, 48, 49, 54, 56, 58, 61, 62,
    63, 69, 74, 75, 76, 77, 81, 82, 84, 90, 93, 96, 100, 103, 104, 109, 117, 119, 121, 123, 128,
    129, 130, 134, 135, 136, 144,
]
_ADE_B_SECOND50 = [
    3, 5, 6, 8, 10, 12, 13, 19, 21, 23, 26, 31, 33, 34, 36, 39, 40, 43, 44, 53, 55, 57, 60, 70,
    71, 80, 86, 87, 91, 95, 99, 101, 105, 106, 107, 113, 116, 120, 125, 126, 131, 132, 133, 140,
    142, 143, 147, 148, 149, 150,
]
_ADE_B_LAST50_IN_10S = [
    [11, 16, 50, 64, 66, 73, 89, 92, 145, 146],
    [30, 37, 51, 52, 72, 85, 98, 114, 115, 138],
    [2, 35, 65, 97, 110, 111, 112, 118, 124, 141],
    [4, 7, 15, 41, 67, 78, 79, 88, 108, 139],
    [17, 20, 59, 68, 83, 94, 102, 122, 127, 137],
]
_ADE_C_FIRST50 = [
    0, 5, 10, 11, 12, 13, 16, 17, 19, 20, 23, 27, 28, 30, 31, 32, 33, 37, 43, 46, 52, 56, 57,
    65, 66, 69, 70, 74, 76, 77, 79, 82, 83, 86, 87, 105, 109, 110, 111, 119, 128, 129, 132, 133,
    134, 138, 142, 143, 144, 146, 147,
]
_ADE_C_SECOND50 = [
    1, 6, 8, 9, 14, 24, 25, 26, 29, 34, 35, 36, 40, 41, 44, 45, 48, 50, 54, 61, 63, 67, 68, 71,
    78, 81, 84, 85, 90, 94, 95, 96, 97, 98, 99, 102, 106, 112, 114, 115, 118, 120, 121, 123,
    124, 126, 135, 136, 139, 149,
]
_ADE_C_LAST50_IN_10S = [
    [3, 4, 7, 18, 39, 64, 73, 101, 113, 137],
    [47, 51, 55, 60, 62, 80, 116, 127, 140, 148],
    [22, 42, 49, 58, 59, 89, 91, 92, 108, 125],
    [2, 38, 53, 100, 104, 117, 130, 131, 141, 145],
    [15, 21, 72, 75, 88, 93, 103, 107, 122, 150],
]


def _ade_shuffled_tables(suffix, first50, second50, last50_in_10s):
    base100 = sorted(first50 + second50)
    last50 = sorted(c for block in last50_in_10s for c in block)
    return {
        f"100-50{suffix}": {0: base100, 1: last50},
        f"100-10{suffix}": {0: base100, **{s: list(b) for s, b in enumerate(last50_in_10s, 1)}},
        f"50{suffix}": {0: list(first50), 1: list(second50), 2: last50},
    }


tasks_ade = {
    "offline": _consecutive(150, []),
    "100-50": _consecutive(100, [50]),
    "100-10": _consecutive(100, [10] * 5),
    "100-5": _consecutive(100, [5] * 10),
    "50": _consecutive(50, [50, 50]),
    "50-10": _consecutive(50, [10] * 10),
    "25-25": _consecutive(25, [25] * 5),
    "10-10": _consecutive(10, [10] * 14),
}
tasks_ade.update(_ade_shuffled_tables("b", _ADE_B_FIRST50, _ADE_B_SECOND50, _ADE_B_LAST50_IN_10S))
tasks_ade.update(_ade_shuffled_tables("c", _ADE_C_FIRST50, _ADE_C_SECOND50, _ADE_C_LAST50_IN_10S))

_TABLES = {"voc": tasks_voc, "ade": tasks_ade}

TASK_ALIASES = {"voc": {"15-1": "15-5s"}, "ade": {"50-50": "50"}}

_GENERIC_HELP = (
    "or a generic protocol 'B-I' (B base classes, then steps of I classes), "
    "'B-Is' (B base classes, then I single-class steps) or 'B-I1-I2-...' (explicit step sizes)"
)


def _check_dataset(dataset):
    if dataset not in _NUM_CLASSES:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {sorted(_NUM_CLASSES)}")


def num_classes(dataset):
    """Number of classes of ``dataset`` including background: voc 21, ade 151."""
    _check_dataset(dataset)
    return _NUM_CLASSES[dataset]


def get_task_list(dataset=None):
    """Named tasks (and aliases) of ``dataset``, or of all datasets without duplicates.

    Generic ``B-I`` / ``B-Is`` / ``B-I1-I2-...`` names are accepted too but not listed.
    """
    datasets = [dataset] if dataset is not None else list(_TABLES)
    names = []
    for name in datasets:
        _check_dataset(name)
        names += list(_TABLES[name]) + list(TASK_ALIASES[name])
    return list(dict.fromkeys(names))


def canonical_task(dataset, task):
    """The table name ``task`` stands for (resolves aliases); generic names are returned as is."""
    _check_dataset(dataset)
    return TASK_ALIASES[dataset].get(task, task)


def _parse_generic(task, n_foreground):
    """Step sizes after the base step for a generic task name, or None if it is not one."""
    match = re.fullmatch(r"(\d+)-(\d+)(s?)", task)
    if match:
        base, size, single = int(match.group(1)), int(match.group(2)), match.group(3) == "s"
        rest = n_foreground - base
        if base < 1 or size < 1 or rest < 1:
            raise ValueError(
                f"task {task!r}: needs at least one base class and one new class "
                f"(the dataset has {n_foreground} foreground classes)")
        if single:
            if size != rest:
                raise ValueError(
                    f"task {task!r}: 'B-Is' adds the remaining classes one per step, so B + I must "
                    f"equal the {n_foreground} foreground classes (here {base} + {size})")
            return base, [1] * size
        if rest % size:
            raise ValueError(
                f"task {task!r}: the {rest} classes after the {base} base classes do not split "
                f"into steps of {size}; define the protocol with explicit sizes 'B-I1-I2-...'")
        return base, [size] * (rest // size)
    if re.fullmatch(r"\d+(-\d+){2,}", task):
        base, *sizes = (int(part) for part in task.split("-"))
        if base < 1 or min(sizes) < 1 or base + sum(sizes) != n_foreground:
            raise ValueError(
                f"task {task!r}: base and step sizes must be positive and add up to the "
                f"{n_foreground} foreground classes (they add up to {base + sum(sizes)})")
        return base, sizes
    return None


def get_task_dict(dataset, task):
    """The whole protocol as ``{step: [class ids]}`` (a fresh copy; named entries win)."""
    name = canonical_task(dataset, task)
    table = _TABLES[dataset].get(name)
    if table is not None:
        return {step: list(labels) for step, labels in table.items()}
    elsewhere = [other for other, tables in _TABLES.items() if name in tables]
    hint = f" ({task!r} is a task of {', '.join(elsewhere)})" if elsewhere else ""
    valid = f"named tasks of {dataset!r}: {', '.join(get_task_list(dataset))}; {_GENERIC_HELP}"
    try:
        parsed = _parse_generic(name, num_classes(dataset) - 1)
    except ValueError as error:
        raise ValueError(f"{error}{hint}. Valid: {valid}") from None
    if parsed is None:
        raise ValueError(f"unknown task {task!r} for dataset {dataset!r}{hint}; {valid}")
    base, sizes = parsed
    return _consecutive(base, sizes)


get_per_task_dict = get_task_dict  # SATS's name for the same table


def get_num_steps(dataset, task):
    """Number of steps of the protocol, step 0 included (``15-5s``: 6)."""
    return len(get_task_dict(dataset, task))


def _checked_step(dataset, task, table, step):
    try:
        step = operator.index(step)
    except TypeError:
        raise ValueError(f"step must be an integer, got {step!r}") from None
    if step not in table:
        raise ValueError(
            f"step {step} is out of range for task {task!r} on {dataset!r}: "
            f"valid steps are 0..{len(table) - 1}")
    return step


def get_task_labels(dataset, task, step):
    """``(labels, labels_old, path_base)`` of ``step``.

    ``labels`` are the class ids added at ``step`` in table order; ``labels_old`` concatenates the
    labels of steps ``0..step-1`` in table order (contains 0 once ``step >= 1``);
    ``path_base = f"data/{dataset}/{canonical task name}"`` is where index files are cached.
    """
    table = get_task_dict(dataset, task)
    step = _checked_step(dataset, task, table, step)
    labels_old = [label for s in range(step) for label in table[s]]
    return list(table[step]), labels_old, f"data/{dataset}/{canonical_task(dataset, task)}"


def get_per_task_classes(dataset, task, step):
    """Class counts of steps ``0..step``; step 0 counts background (``15-5s``, 3 -> [16, 1, 1, 1])."""
    table = get_task_dict(dataset, task)
    step = _checked_step(dataset, task, table, step)
    return [len(table[s]) for s in range(step + 1)]


def get_order(dataset, task):
    """All class ids of the protocol in task order, background first (channel order of the model)."""
    table = get_task_dict(dataset, task)
    return [label for s in range(len(table)) for label in table[s]]
