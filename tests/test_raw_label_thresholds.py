"""Pseudo-label thresholds on raw labels (the SATS repository's histogram) and on mapped labels
(PLOP's, the default); the dataset view that returns raw labels; the SATS legacy median."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from dataset import incremental, transform
from dataset.incremental import RawLabelSample, with_raw_labels
from utils.pseudo import (
    accumulate_histogram,
    find_thresholds,
    histogram_dtype,
    pseudo_label,
    thresholds_from_histograms,
)
from tests.test_dataset import COLUMNS, voc, write_voc


@pytest.fixture(autouse=True)
def _fresh_scan_memo():
    incremental._PRESENCE_MEMO.clear()
    yield
    incremental._PRESENCE_MEMO.clear()


# ---------------------------------------------------------------------------------------------
# The hand-made batch: one image of 8 pixels, old classes {1, 2} (C_o = 3), new class 3, future
# class 4. Current masking maps raw ids 1, 2 (old) and 4 (future) to 0.
#
#   pixel        0     1     2     3     4     5     6     7
#   raw id       0     0     1     2     3     4     0     1
#   mapped       0     0     0     0     3     0     0     0
#   old argmax   0     0     1     2     0     0     1     1
#   old max p   .72   .62   .87   .82   .42   .47   .57   .63
#   bin (x20)   14    12    17    16     -     9    11    12
# ---------------------------------------------------------------------------------------------
PROBS = torch.tensor([
    [0.72, 0.18, 0.10],
    [0.62, 0.28, 0.10],
    [0.08, 0.87, 0.05],
    [0.06, 0.12, 0.82],
    [0.42, 0.33, 0.25],
    [0.47, 0.33, 0.20],
    [0.22, 0.57, 0.21],
    [0.32, 0.63, 0.05],
])
LOGITS = PROBS.log().T.reshape(1, 3, 1, 8)
RAW = torch.tensor([[[0, 0, 1, 2, 3, 4, 0, 1]]])
MAPPED = torch.tensor([[[0, 0, 0, 0, 3, 0, 0, 0]]])


class _LogitsInput(torch.nn.Module):
    """An old model whose logits are its input."""

    def forward(self, x):
        return x, {}


def _thresholds(raw_labels, **kwargs):
    batch = RawLabelSample(LOGITS, MAPPED, RAW) if raw_labels else (LOGITS, MAPPED)
    return find_thresholds(_LogitsInput(), [batch], "cpu", "median", nb_old_classes=3,
                           nb_current_classes=4, threshold=0.9, raw_labels=raw_labels, **kwargs)


def test_mapped_labels_count_old_and_future_class_pixels_as_background():
    # class 0: bins 9, 12, 14 (pixels 5, 1, 0) -> n = 3, median in bin 12: 0.60 + 0.5/1 * 0.05
    # class 1: bins 11, 12, 17 (pixels 6, 7, 2) -> 0.60 + 0.5/1 * 0.05
    # class 2: bin 16 (pixel 3) -> 0.80 + 0.5/1 * 0.05; class 3: empty -> 0
    result = _thresholds(raw_labels=False)
    assert result.thresholds.tolist() == pytest.approx([0.625, 0.625, 0.825, 0.0], abs=1e-6)


def test_raw_labels_keep_only_raw_background_pixels():
    # only pixels 0, 1, 6 (raw id 0): class 0 bins 12, 14 -> n = 2, half 1 reached in bin 12:
    # 0.60 + 1/1 * 0.05; class 1 bin 11 -> 0.55 + 0.5 * 0.05; classes 2, 3 empty -> 0
    result = _thresholds(raw_labels=True)
    assert result.thresholds.tolist() == pytest.approx([0.65, 0.575, 0.0, 0.0], abs=1e-6)


def test_pseudo_label_counts_under_both_thresholds():
    mapped = _thresholds(raw_labels=False).thresholds
    raw = _thresholds(raw_labels=True).thresholds
    # mapped tau = [.625, .625, .825]: pixel 1 (.62 < .625), 3 (.82 < .825), 5 (.47), 6 (.57) -> 255
    out = pseudo_label(MAPPED, LOGITS, "median", nb_old_classes=3, thresholds=mapped).labels
    assert out.flatten().tolist() == [0, 255, 1, 255, 3, 255, 255, 1]
    # raw tau = [.65, .575, 0]: pixel 3 is kept as class 2 (tau 0), pixel 6 (.57 < .575) is not
    out_raw = pseudo_label(MAPPED, LOGITS, "median", nb_old_classes=3, thresholds=raw).labels
    assert out_raw.flatten().tolist() == [0, 255, 1, 2, 3, 255, 255, 1]
    assert int((out == 255).sum()) == 4 and int((out_raw == 255).sum()) == 3
    assert int(((out == 1) | (out == 2)).sum()) == 2 and int(((out_raw == 1) | (out_raw == 2)).sum()) == 3


def test_raw_labels_need_batches_that_carry_them():
    with pytest.raises(ValueError, match="with_raw_labels"):
        find_thresholds(_LogitsInput(), [(LOGITS, MAPPED)], "cpu", "median", 3, 4, raw_labels=True)


# ---------------------------------------------------------------------------------------------
# The SATS repository's legacy median
# ---------------------------------------------------------------------------------------------
def _hist(counts, nb_bins=100):
    row = torch.zeros(nb_bins, dtype=torch.long)
    for position, count in counts.items():
        row[position] = count
    return row


def test_sats_legacy_replaces_an_infinite_threshold_by_0_005():
    # [4000, 4000, 2000]: no single bin holds half (5000), so the published loop falls through to
    # the empty last bin with running sum 0 + 1 + ... + 99 = 4950: 0.99 + (5000 - 4950) / 0 = +inf;
    # the entropy clamp max(inf, 0.001) keeps it
    hist = torch.stack([_hist({0: 4000, 1: 4000, 2: 2000}), _hist({0: 600, 1: 300, 2: 100})])
    plop = thresholds_from_histograms(hist, "entropy", 0.001, legacy="plop")
    assert plop[0] == math.inf
    sats = thresholds_from_histograms(hist, "entropy", 0.001, legacy=True)
    assert sats[0].item() == pytest.approx(0.005) and sats[1].item() == pytest.approx(0.01 * 5 / 6)
    assert thresholds_from_histograms(hist, "entropy", 0.001)[0].item() == pytest.approx(0.0125)


def test_sats_legacy_histogram_is_float32_and_saturates_on_cpu():
    # on the CPU every pixel is added on its own: 2**24 + 1 rounds back to 2**24
    assert histogram_dtype(True) == torch.float32 and histogram_dtype("plop") == torch.long
    assert histogram_dtype(False) == torch.long
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    logits = torch.tensor([[[[5.0, 5.0, 5.0, 5.0]], [[0.0, 0.0, 0.0, 0.0]]]])  # class 0, m = 0.9933
    big = 2 ** 24
    sats = torch.zeros(2, 20, dtype=histogram_dtype(True))
    plop = torch.zeros(2, 20, dtype=histogram_dtype("plop"))
    sats[0, 19] = plop[0, 19] = big
    accumulate_histogram(sats, logits, labels, "probability")
    accumulate_histogram(plop, logits, labels, "probability")
    assert sats[0, 19].item() == big and plop[0, 19].item() == big + 4


def test_find_thresholds_sats_legacy_equals_its_histogram():
    hist = torch.zeros(4, 20, dtype=torch.float32)
    accumulate_histogram(hist, LOGITS, MAPPED, "probability")
    expected = thresholds_from_histograms(hist, "probability", 0.9, legacy=True)
    assert torch.equal(_thresholds(raw_labels=False, legacy=True).thresholds, expected)


# ---------------------------------------------------------------------------------------------
# The dataset view with raw labels
# ---------------------------------------------------------------------------------------------
def test_with_raw_labels_returns_raw_and_mapped_labels(tmp_path):
    root = write_voc(tmp_path / "voc")
    dataset = voc(root, labels=[4], labels_old=[0, 3, 1])  # images 3, 4, 5
    view = with_raw_labels(dataset)
    sample = view[2]  # image 5: raw 0 3 3 255 4 0
    assert isinstance(sample, RawLabelSample)
    assert sample.raw_label[0].tolist() == COLUMNS[5]
    assert sample.label[0].tolist() == [0, 0, 0, 255, 3, 0]
    assert type(dataset[2]) is tuple and len(dataset[2]) == 2  # the dataset itself is unchanged
    subset_view = with_raw_labels(Subset(dataset, [0]))
    assert subset_view[0].raw_label[0].tolist() == COLUMNS[3]
    with pytest.raises(TypeError, match="IncrementalSegmentationDataset"):
        with_raw_labels([1, 2])


def test_raw_labels_follow_the_random_crop_and_collate_by_name(tmp_path):
    root = write_voc(tmp_path / "voc")
    dataset = voc(root, labels=[4], labels_old=[0, 3, 1], transform=transform.train_transform(3))
    loader = DataLoader(with_raw_labels(dataset), batch_size=3, shuffle=False)
    batch = next(iter(loader))
    assert isinstance(batch, RawLabelSample) and batch.raw_label.shape == (3, 3, 3)
    lut = torch.from_numpy(dataset.lut.astype(np.int64))
    assert torch.equal(lut[batch.raw_label], batch.label)  # the same source pixels
