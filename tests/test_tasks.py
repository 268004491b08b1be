import pytest

import tasks

VOC_SHUFFLE_LETTERS = "bcdefghijklmnopqrstuvw"

# (dataset, task) -> class counts per step, first and last label of the whole order
EXPECTED_SHAPES = {
    ("voc", "offline"): ([21], 0, 20),
    ("voc", "offline18-20"): ([4], 0, 20),
    ("voc", "19-1"): ([20, 1], 0, 20),
    ("voc", "19-1b"): ([20, 1], 0, 5),
    ("voc", "15-5"): ([16, 5], 0, 20),
    ("voc", "15-5s"): ([16, 1, 1, 1, 1, 1], 0, 20),
    ("voc", "10-1"): ([11] + [1] * 10, 0, 20),
    ("voc", "5-3"): ([6, 3, 3, 3, 3, 3], 0, 20),
    ("voc", "10-5-5"): ([11, 5, 5], 0, 20),
    ("ade", "offline"): ([151], 0, 150),
    ("ade", "100-50"): ([101, 50], 0, 150),
    ("ade", "100-10"): ([101] + [10] * 5, 0, 150),
    ("ade", "100-5"): ([101] + [5] * 10, 0, 150),
    ("ade", "50"): ([51, 50, 50], 0, 150),
    ("ade", "50-10"): ([51] + [10] * 10, 0, 150),
    ("ade", "25-25"): ([26] + [25] * 5, 0, 150),
    ("ade", "10-10"): ([11] + [10] * 14, 0, 150),
    ("ade", "100-50b"): ([101, 50], 0, 146),
    ("ade", "100-50c"): ([101, 50], 0, 150),
    ("ade", "100-10b"): ([101] + [10] * 5, 0, 137),
    ("ade", "100-10c"): ([101] + [10] * 5, 0, 150),
    ("ade", "50b"): ([51, 50, 50], 0, 146),
    ("ade", "50c"): ([51, 50, 50], 0, 150),
}


@pytest.mark.parametrize("dataset,task", sorted(EXPECTED_SHAPES))
def test_table_shapes(dataset, task):
    counts, first, last = EXPECTED_SHAPES[(dataset, task)]
    n_steps = len(counts)
    assert tasks.get_num_steps(dataset, task) == n_steps
    assert tasks.get_per_task_classes(dataset, task, n_steps - 1) == counts
    order = tasks.get_order(dataset, task)
    assert (order[0], order[-1]) == (first, last)
    assert len(order) == len(set(order)) == sum(counts)
    if task != "offline18-20":
        assert sorted(order) == list(range(tasks.num_classes(dataset)))
    table = tasks.get_task_dict(dataset, task)
    assert all(0 not in table[s] for s in range(1, n_steps))


def test_num_classes_and_datasets():
    assert tasks.num_classes("voc") == 21
    assert tasks.num_classes("ade") == 151
    with pytest.raises(ValueError, match="valid datasets"):
        tasks.num_classes("cityscapes")


def test_task_list_covers_every_named_table():
    voc = tasks.get_task_list("voc")
    assert len(voc) == 9 + 22 + 1  # tables, shuffles, alias 15-1
    assert [f"15-5s_{c}" for c in VOC_SHUFFLE_LETTERS] == [t for t in voc if t.startswith("15-5s_")]
    ade = tasks.get_task_list("ade")
    assert set(ade) == {"offline", "100-50", "100-10", "100-5", "50", "50-10", "25-25", "10-10",
                        "100-50b", "100-50c", "100-10b", "100-10c", "50b", "50c", "50-50"}
    union = tasks.get_task_list()
    assert len(union) == len(set(union)) == len(set(voc) | set(ade))


def test_voc_contiguous_labels_and_old_labels():
    labels, old, path = tasks.get_task_labels("voc", "15-5", 1)
    assert labels == [16, 17, 18, 19, 20]
    assert old == list(range(16))
    assert path == "data/voc/15-5"
    labels, old, _ = tasks.get_task_labels("voc", "15-5s", 3)
    assert labels == [18]
    assert old == list(range(18))
    assert tasks.get_per_task_classes("voc", "15-5s", 3) == [16, 1, 1, 1]
    labels, old, _ = tasks.get_task_labels("voc", "5-3", 2)
    assert labels == [9, 10, 11] and old == list(range(9))
    labels, old, _ = tasks.get_task_labels("voc", "10-5-5", 2)
    assert labels == [16, 17, 18, 19, 20] and old == list(range(16))
    assert tasks.get_task_labels("voc", "19-1b", 1)[0] == [5]
    assert 5 not in tasks.get_task_labels("voc", "19-1b", 0)[0]
    assert tasks.get_task_labels("voc", "offline18-20", 0)[0] == [0, 18, 19, 20]
    labels, old, _ = tasks.get_task_labels("voc", "offline", 0)
    assert labels == list(range(21)) and old == []


def test_voc_shuffled_orders():
    for letter in VOC_SHUFFLE_LETTERS:
        order = tasks.get_order("voc", f"15-5s_{letter}")
        assert order[0] == 0
        assert sorted(order[1:]) == list(range(1, 21))
        assert tasks.get_per_task_classes("voc", f"15-5s_{letter}", 5) == [16, 1, 1, 1, 1, 1]
    labels, old, path = tasks.get_task_labels("voc", "15-5s_b", 2)
    assert labels == [3]
    assert old == [0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11, 17]
    assert path == "data/voc/15-5s_b"
    assert tasks.get_order("voc", "15-5s_w")[-5:] == [3, 15, 6, 5, 17]
    assert tasks.get_task_labels("voc", "15-5s_m", 0)[0][:4] == [0, 18, 4, 14]


def test_ade_tables():
    labels, old, path = tasks.get_task_labels("ade", "100-10", 2)
    assert labels == list(range(111, 121)) and old == list(range(111))
    assert path == "data/ade/100-10"
    assert tasks.get_per_task_classes("ade", "100-10", 0) == [101]
    labels, old, _ = tasks.get_task_labels("ade", "50", 2)
    assert labels == list(range(101, 151)) and len(old) == 101
    assert tasks.get_task_labels("ade", "10-10", 14)[0] == list(range(141, 151))
    assert tasks.get_task_labels("ade", "25-25", 1)[0] == list(range(26, 51))


def test_ade_shuffled_orders_match_mib():
    assert tasks.get_task_labels("ade", "100-50b", 1)[0][:6] == [2, 4, 7, 11, 15, 16]
    assert tasks.get_task_labels("ade", "100-50c", 0)[0][:6] == [0, 1, 5, 6, 8, 9]
    assert tasks.get_task_labels("ade", "100-10b", 1)[0] == [11, 16, 50, 64, 66, 73, 89, 92, 145, 146]
    assert tasks.get_task_labels("ade", "100-10c", 5)[0] == [15, 21, 72, 75, 88, 93, 103, 107, 122, 150]
    assert tasks.get_task_labels("ade", "50b", 0)[0][:5] == [0, 1, 9, 14, 18]
    assert tasks.get_task_labels("ade", "50c", 1)[0][-3:] == [136, 139, 149]
    for suffix in "bc":
        base100 = tasks.get_task_labels("ade", f"100-50{suffix}", 0)[0]
        assert base100 == tasks.get_task_labels("ade", f"100-10{suffix}", 0)[0]
        assert tasks.get_task_labels("ade", f"50{suffix}", 2)[0] == \
            tasks.get_task_labels("ade", f"100-50{suffix}", 1)[0]


def test_aliases_equal_their_tables_and_share_the_index_folder():
    for step in range(6):
        assert tasks.get_task_labels("voc", "15-1", step) == tasks.get_task_labels("voc", "15-5s", step)
    assert tasks.get_task_labels("voc", "15-1", 0)[2] == "data/voc/15-5s"
    assert tasks.get_task_dict("ade", "50-50") == tasks.get_task_dict("ade", "50")
    assert tasks.canonical_task("voc", "15-1") == "15-5s"
    assert tasks.canonical_task("voc", "15-5") == "15-5"


def test_generic_protocols():
    # voc: 20 foreground classes
    table = tasks.get_task_dict("voc", "12-2")
    assert len(table) == 5
    assert table[0] == list(range(13)) and table[1] == [13, 14] and table[4] == [19, 20]
    assert tasks.get_task_labels("voc", "12-2", 3)[2] == "data/voc/12-2"
    assert tasks.get_task_dict("voc", "17-3s") == {0: list(range(18)), 1: [18], 2: [19], 3: [20]}
    assert tasks.get_task_dict("voc", "10-4-6") == {0: list(range(11)), 1: list(range(11, 15)),
                                                    2: list(range(15, 21))}
    # ade: 150 foreground classes
    table = tasks.get_task_dict("ade", "100-25")
    assert len(table) == 3 and table[2] == list(range(126, 151))
    assert tasks.get_per_task_classes("ade", "75-15", 5) == [76, 15, 15, 15, 15, 15]
    # generic spellings of named tables give the same protocol
    for dataset, generic, named in [("voc", "10-1", "10-1"), ("voc", "5-3", "5-3"),
                                    ("voc", "15-5s", "15-5s"), ("ade", "50-50", "50"),
                                    ("ade", "100-10", "100-10")]:
        base, sizes = tasks._parse_generic(generic, tasks.num_classes(dataset) - 1)
        assert tasks._consecutive(base, sizes) == tasks.get_task_dict(dataset, named)


def test_named_entry_wins_over_generic_parse():
    # "19-1b" is not generic; "15-5s" parses generically too, but the table is used (same here),
    # while a shuffled name like "15-5s_b" only exists in the table.
    assert tasks.get_task_dict("voc", "19-1b")[1] == [5]
    assert tasks.get_task_dict("voc", "15-5s_b")[1] == [17]


@pytest.mark.parametrize("dataset,task,message", [
    ("voc", "100-10", "is a task of ade"),
    ("voc", "nonsense", "unknown task 'nonsense'"),
    ("voc", "15-7", "do not split into steps of 7"),
    ("voc", "15-4s", "B \\+ I must equal"),
    ("voc", "10-5-4", "add up to"),
    ("ade", "15-5s_b", "is a task of voc"),
])
def test_invalid_tasks_list_valid_ones(dataset, task, message):
    with pytest.raises(ValueError, match=message) as info:
        tasks.get_task_labels(dataset, task, 0)
    text = str(info.value)
    assert ("15-5s_w" in text) == (dataset == "voc")
    assert ("100-10b" in text) == (dataset == "ade")
    assert "B-I" in text


def test_out_of_range_step():
    with pytest.raises(ValueError, match=r"valid steps are 0\.\.5"):
        tasks.get_task_labels("voc", "15-5s", 6)
    with pytest.raises(ValueError, match=r"valid steps are 0\.\.1"):
        tasks.get_per_task_classes("ade", "100-50", -1)
    with pytest.raises(ValueError, match="integer"):
        tasks.get_task_labels("voc", "15-5", 1.0)


def test_returned_lists_are_copies():
    labels, old, _ = tasks.get_task_labels("voc", "15-5", 1)
    labels.append(99)
    old.remove(0)
    assert tasks.get_task_labels("voc", "15-5", 1)[:2] == ([16, 17, 18, 19, 20], list(range(16)))
