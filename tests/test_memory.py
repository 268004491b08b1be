"""Class-balanced exemplar memory (dataset/memory.py)."""
import json
from collections import Counter

import numpy as np
import pytest
import torch

from dataset.memory import (
    MemoryDataset,
    MemoryEntry,
    build_memory,
    classes_in_label,
    load_memory,
    memory_file_list,
    save_memory,
    select_exemplars,
    softmax_memory_pseudo_labels,
    ssul_memory_pseudo_labels,
)


def _ssul_restated(candidates, nb_old_classes, mem_size, seed):
    """SSUL's memory_sampling_balanced selection, written out as it reads: records
    [name, classes] shuffled in place with the global numpy RNG, a class list 1..C_o-1 shuffled,
    passes with `del`, results gathered class by class (1, 2, ...)."""
    np.random.seed(seed)
    records = [list(c) for c in candidates]
    np.random.shuffle(records)
    order = list(range(1, nb_old_classes))
    np.random.shuffle(order)
    picked = {c: [] for c in range(1, nb_old_classes)}
    count = 0
    while mem_size > count:
        for cls in order:
            for position, record in enumerate(records):
                if cls in record[1]:
                    picked[cls].append(record)
                    count += 1
                    del records[position]
                    break
            if mem_size <= count:
                break
    return [record[0] for cls in picked for record in picked[cls]]


def _random_candidates(count, nb_old_classes, seed):
    rng = np.random.RandomState(seed + 100)
    out = []
    for i in range(count):
        size = rng.randint(1, 4)
        out.append((i, sorted(set(rng.randint(1, nb_old_classes, size=size).tolist()))))
    return out


@pytest.mark.parametrize("seed,mem_size", [(1, 10), (1, 37), (5, 20), (123, 60)])
def test_selection_equals_ssul_restatement(seed, mem_size):
    candidates = _random_candidates(80, nb_old_classes=8, seed=seed)
    chosen = select_exemplars([c for _, c in candidates], range(1, 8), mem_size, seed)
    assert chosen == _ssul_restated(candidates, 8, mem_size, seed)
    assert len(chosen) == mem_size and len(set(chosen)) == mem_size


def test_selection_is_class_balanced():
    # 10 single-class images for each of the classes 1..4
    candidates = [[1 + i % 4] for i in range(40)]
    chosen = select_exemplars(candidates, [1, 2, 3, 4], mem_size=10, seed=1)
    counts = Counter(candidates[i][0] for i in chosen)
    assert sum(counts.values()) == 10
    assert sorted(counts.values()) == [2, 2, 3, 3]
    # grouped by class in the given class order
    assert [candidates[i][0] for i in chosen] == sorted(candidates[i][0] for i in chosen)


def test_selection_stops_when_the_pool_runs_out():
    candidates = [[1], [1, 3], [2], [5]]  # class 5 is not an old class
    chosen = select_exemplars(candidates, [1, 2, 3], mem_size=10, seed=0)
    assert sorted(chosen) == [0, 1, 2]
    assert select_exemplars(candidates, [4], mem_size=10, seed=0) == []
    assert select_exemplars(candidates, [1, 2], mem_size=0, seed=0) == []
    with pytest.raises(ValueError, match="duplicates"):
        select_exemplars(candidates, [1, 1], mem_size=3, seed=0)


def test_classes_in_label():
    assert classes_in_label(torch.tensor([[0, 3, 255], [7, 3, 0]])) == (3, 7)


def test_memory_pseudo_labels():
    labels = torch.tensor([[[0, 0, 0, 2, 255]]])
    # softmax model with 3 old channels: probabilities per pixel
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.3, 0.65, 0.05], [0.8, 0.1, 0.1], [0.1, 0.9, 0.0 + 1e-9],
                          [0.1, 0.9, 1e-9]])
    logits = probs.log().T.reshape(1, 3, 1, 5)
    assert softmax_memory_pseudo_labels(labels, logits).tolist() == [[[1, 0, 0, 2, 255]]]
    # SSUL model: channels unknown, bg, class 1, class 2; sigmoid scores per pixel
    scores = torch.tensor([[0.1, 0.2, 0.9, 0.1], [0.1, 0.2, 0.3, 0.75], [0.9, 0.2, 0.3, 0.1],
                           [0.1, 0.2, 0.9, 0.1], [0.1, 0.2, 0.9, 0.1]])
    ssul_logits = torch.log(scores / (1 - scores)).T.reshape(1, 4, 1, 5)
    assert ssul_memory_pseudo_labels(labels, ssul_logits).tolist() == [[[1, 2, 0, 2, 255]]]


class _LabelDataset(torch.utils.data.Dataset):
    def __init__(self, labels, names):
        self.labels = labels
        self.file_names = names

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        label = self.labels[index]
        return torch.zeros(3, *label.shape), label


class _ConstantOldModel(torch.nn.Module):
    """Predicts class 2 with probability ~1 everywhere (3 old channels)."""

    def forward(self, images):
        logits = torch.zeros(images.shape[0], 3, *images.shape[2:])
        logits[:, 2] = 20.0
        return logits, {}


def _label(*values):
    return torch.tensor([list(values)])


def test_build_memory_step1_uses_ground_truth():
    labels = [_label(0, 1, 1), _label(0, 2, 255), _label(0, 0, 0), _label(1, 2, 0)]
    dataset = _LabelDataset(labels, ["a", "b", "c", "d"])
    entries = build_memory(None, dataset, step=1, mem_size=3, seed=1, device="cpu", nb_old_classes=3)
    pool_classes = [(1,), (2,), (), (1, 2)]
    expected = select_exemplars(pool_classes, [1, 2], 3, 1)
    assert entries == [MemoryEntry("abcd"[i], pool_classes[i]) for i in expected]
    assert len(entries) == 3 and "c" not in {e.name for e in entries}


def test_build_memory_later_step_pseudo_labels_and_extends_previous():
    # step 2: candidates are step-1 images (GT class 3 only); the old model sees class 2 in bg
    labels = [_label(0, 3, 3), _label(3, 3, 255)]
    dataset = _LabelDataset(labels, ["e", "f"])
    previous = [MemoryEntry("a", (1,)), MemoryEntry("b", (2,))]
    entries = build_memory(_ConstantOldModel(), dataset, step=2, mem_size=4, seed=3, device="cpu",
                           nb_old_classes=4, previous_memory=previous, batch_size=2)
    pool = previous + [MemoryEntry("e", (2, 3)), MemoryEntry("f", (3,))]
    expected = select_exemplars([e.classes for e in pool], [1, 2, 3], 4, 3)
    assert entries == [pool[i] for i in expected]
    assert sorted(e.name for e in entries) == ["a", "b", "e", "f"]
    with pytest.raises(ValueError, match="previous model"):
        build_memory(None, dataset, step=2, mem_size=4, seed=3, device="cpu", nb_old_classes=4)


def test_memory_dataset_repeats_to_batch_size():
    base = [f"sample{i}" for i in range(5)]
    memory = MemoryDataset(base, indices=[4, 1, 2], min_len=8)
    assert len(memory) == 12  # 3 -> 6 -> 12, doubled as in SSUL
    assert [memory[i] for i in range(4)] == ["sample4", "sample1", "sample2", "sample4"]
    assert len(MemoryDataset(base, min_len=2)) == 5
    with pytest.raises(ValueError, match="empty"):
        MemoryDataset(base, indices=[])
    with pytest.raises(ValueError, match="outside"):
        MemoryDataset(base, indices=[5])


def test_save_and_load(tmp_path):
    entries = [MemoryEntry("2008_000123", (3, 7)), MemoryEntry("2007_000042", (1,))]
    path = save_memory(tmp_path / "mem" / "memory_step1.json", entries, meta={"step": 1, "seed": 1})
    assert load_memory(path) == entries
    payload = json.loads(path.read_text())
    assert payload["files"] == memory_file_list(entries) == ["2007_000042", "2008_000123"]
    assert payload["meta"] == {"step": 1, "seed": 1}
    assert [p.name for p in path.parent.iterdir()] == ["memory_step1.json"]
    path.write_text('{"format": 1, "entries": [{"name": "x"}]}')
    with pytest.raises(ValueError, match="entry 0"):
        load_memory(path)
    with pytest.raises(FileNotFoundError):
        load_memory(tmp_path / "missing.json")


class _PathDataset(_LabelDataset):
    """Exposes image_path(index) instead of file_names."""

    def __init__(self, labels, names):
        super().__init__(labels, None)
        del self.file_names
        self.paths = names

    def image_path(self, index):
        return f"/data/{self.paths[index]}.jpg"


def test_build_memory_names_from_image_path():
    dataset = _PathDataset([_label(0, 1), _label(2, 0)], ["x", "y"])
    entries = build_memory(None, dataset, step=1, mem_size=5, seed=0, device="cpu", nb_old_classes=3)
    assert sorted(e.name for e in entries) == ["/data/x.jpg", "/data/y.jpg"]
    anonymous = torch.utils.data.TensorDataset(torch.zeros(1, 3, 1, 2), _label(0, 1)[None])
    with pytest.raises(ValueError, match="file names"):
        build_memory(None, anonymous, step=1, mem_size=1, seed=0, device="cpu", nb_old_classes=3)
