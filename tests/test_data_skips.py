"""Failing clean on data: unreadable samples are left out and counted (never replaced), and a
mask whose size differs from its image's is found by the index scan, before any training."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import incremental
from dataset.incremental import UnreadableSampleError, with_raw_labels
from dataset.skips import (
    SkipAwareLoader,
    SkipCounter,
    SkippedSample,
    TooManySkippedSamples,
    report_skips,
    skip_collate,
    skip_counter_of,
)
from tests.test_dataset import save_mask, voc, write_voc


@pytest.fixture(autouse=True)
def _fresh_scan_memo():
    incremental._PRESENCE_MEMO.clear()
    yield
    incremental._PRESENCE_MEMO.clear()


@pytest.fixture
def voc_root(tmp_path):
    return write_voc(tmp_path / "voc")


def _break(root, i, content=b"\x89PNG\r\n\x1a\n broken"):
    (root / "JPEGImages" / f"im{i}.png").write_bytes(content)


def _red(batch_images):
    """The image index each sample of a batch comes from (its red channel is 40 * index)."""
    return [int(v) // 40 for v in batch_images[:, 0, 0, 0]]


# ---------------------------------------------------------------------------------------------
# Unreadable samples
# ---------------------------------------------------------------------------------------------
def test_unreadable_sample_is_a_marker_naming_the_file(voc_root, caplog):
    _break(voc_root, 3)
    dataset = voc(voc_root)
    with caplog.at_level(logging.WARNING):
        sample = dataset[3]
    assert isinstance(sample, SkippedSample) and sample.index == 3
    assert sample.path.endswith("im3.png") and "cannot decode image file" in sample.reason
    assert "sample 3 left out" in caplog.text and "im3.png" in caplog.text
    with pytest.raises(UnreadableSampleError, match=r"im3\.png"):  # used as a sample: clear error
        image, label = sample


def test_loader_leaves_the_sample_out_and_counts_it(voc_root):
    _break(voc_root, 3)
    dataset = voc(voc_root)
    loader = SkipAwareLoader(dataset, batch_size=2, shuffle=False)
    seen = []
    for images, labels in loader:
        seen += _red(images)
    assert seen == [0, 1, 2, 4, 5]  # image 3 left out, nothing stands in for it
    assert loader.skips is dataset.skips
    assert dataset.skips.count == 1 and dataset.skips.paths[0].endswith("im3.png")
    for _ in loader:  # a second epoch meets the file again: one file, two occurrences
        pass
    assert dataset.skips.count == 1 and dataset.skips.occurrences == 2


def test_counts_come_back_from_worker_processes(voc_root):
    _break(voc_root, 1)
    _break(voc_root, 4)
    dataset = voc(voc_root)
    loader = SkipAwareLoader(dataset, batch_size=2, shuffle=False, num_workers=2)
    seen = [i for images, _ in loader for i in _red(images)]
    assert seen == [0, 2, 3, 5]
    assert [p.rsplit("/", 1)[1] for p in dataset.skips.paths] == ["im1.png", "im4.png"]


def test_mask_that_cannot_be_decoded_is_named(voc_root):
    (voc_root / "SegmentationClassAug" / "im2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    dataset = voc(voc_root)
    assert [i for images, _ in SkipAwareLoader(dataset, batch_size=6) for i in _red(images)] == [0, 1, 3, 4, 5]
    assert dataset.skips.paths[0].endswith("SegmentationClassAug/im2.png")


def test_batch_of_only_unreadable_samples_is_not_yielded(voc_root):
    for i in (2, 3):
        _break(voc_root, i)
    loader = SkipAwareLoader(voc(voc_root), batch_size=2, shuffle=False)
    assert [_red(images) for images, _ in loader] == [[0, 1], [4, 5]]
    assert loader.skips.count == 2


def test_max_skipped_samples_raises_listing_the_files(voc_root):
    for i in range(4):
        _break(voc_root, i)
    loader = SkipAwareLoader(voc(voc_root, train=False), batch_size=1, max_skipped=3)
    with pytest.raises(TooManySkippedSamples, match=r"4 samples of the val set could not be read, "
                                                    r"more than --max_skipped_samples 3") as error:
        list(loader)
    assert all(f"im{i}.png" in str(error.value) for i in range(4))
    assert isinstance(error.value, ValueError)


def test_raw_label_view_shares_the_counter_and_keeps_field_names(voc_root):
    _break(voc_root, 4)
    dataset = voc(voc_root, labels=[4], labels_old=[0, 3, 1])  # images 3, 4, 5
    batches = list(SkipAwareLoader(with_raw_labels(dataset), batch_size=3))
    assert len(batches) == 1 and batches[0].raw_label.shape[0] == 2
    assert skip_counter_of(with_raw_labels(dataset)) is dataset.skips and dataset.skips.count == 1


def test_skip_collate_keeps_positions_and_markers():
    marker = SkippedSample(1, "/data/x.jpg", "truncated")
    batch = skip_collate([(torch.zeros(2), 0), marker, (torch.ones(2), 1)])
    assert batch.kept == (0, 2) and batch.skipped == (marker,)
    assert batch.data[0].tolist() == [[0, 0], [1, 1]] and batch.data[1].tolist() == [0, 1]
    assert skip_collate([marker]).data is None


def test_counter_report_summary_and_json():
    counter = SkipCounter("val")
    counter.record([SkippedSample(0, "/d/b.jpg", "truncated"), SkippedSample(3, "/d/a.jpg", "bad")])
    counter.record([SkippedSample(0, "/d/b.jpg", "truncated")])
    assert counter.as_dict() == {"count": 2, "occurrences": 3, "files": [
        {"path": "/d/a.jpg", "reason": "bad", "times": 1},
        {"path": "/d/b.jpg", "reason": "truncated", "times": 2}]}
    assert counter.summary() == ("val: 2 images skipped (3 times): /d/a.jpg (bad); "
                                 "/d/b.jpg (truncated)")

    class _Log:
        def __init__(self):
            self.lines, self.scalars = [], []

        def info(self, msg):
            self.lines.append(("info", msg))

        def warning(self, msg):
            self.lines.append(("warning", msg))

        def add_scalar(self, tag, value, step=None):
            self.scalars.append((tag, value, step))

    log = _Log()
    report = report_skips({"val": counter, "test": SkipCounter("test")}, log, step=2)
    assert report["val"]["count"] == 2 and report["test"]["count"] == 0
    assert log.lines == [("warning", counter.summary()), ("info", "test: every sample could be read")]
    assert log.scalars == [("Skipped/val", 2, 2), ("Skipped/test", 0, 2)]
    assert counter.gathered().as_dict() == counter.as_dict()  # one process: itself


# ---------------------------------------------------------------------------------------------
# Mask and image sizes at scan time
# ---------------------------------------------------------------------------------------------
def test_mask_size_mismatch_in_the_train_list_is_found_by_the_scan(voc_root):
    save_mask(voc_root / "SegmentationClassAug" / "im4.png", np.zeros((3, 6), np.uint8))
    with pytest.raises(ValueError, match=r"1 masks listed by .*train_aug\.txt do not have their "
                                         r"image's size:\n  .*SegmentationClassAug/im4\.png is 6x3 "
                                         r"but its image .*JPEGImages/im4\.png is 6x4"):
        voc(voc_root, train=True, labels=[4], labels_old=[0, 3, 1])  # building the step's dataset


def test_mask_size_mismatches_in_the_val_list_are_all_listed(voc_root):
    for i in (1, 5):
        Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(voc_root / "JPEGImages" / f"im{i}.png")
    with pytest.raises(ValueError, match=r"2 masks listed by .*val\.txt") as error:
        voc(voc_root, train=False, labels=[1], labels_old=[])
    assert "im1.png is 6x4 but its image" in str(error.value)
    assert "JPEGImages/im5.png is 6x5" in str(error.value)


def test_an_image_replaced_after_the_scan_is_checked_again(voc_root, tmp_path):
    idxs = str(tmp_path / "idx" / "train-0.npy")
    voc(voc_root, labels=[1], labels_old=[], idxs_path=idxs)  # scanned and cached
    incremental._PRESENCE_MEMO.clear()
    Image.fromarray(np.zeros((4, 7, 3), np.uint8)).save(voc_root / "JPEGImages" / "im0.png")
    with pytest.raises(ValueError, match=r"im0\.png is 6x4 but its image .*im0\.png is 7x4"):
        voc(voc_root, labels=[1], labels_old=[], idxs_path=idxs)


def test_image_with_an_unreadable_header_is_left_to_the_loader(voc_root):
    _break(voc_root, 0, b"not an image")
    dataset = voc(voc_root, labels=[1], labels_old=[])  # the scan does not stop on it
    assert dataset.indices.tolist() == [0, 1]
    assert isinstance(dataset[0], SkippedSample)


def test_memory_candidates_skip_unreadable_images_and_stay_aligned(voc_root):
    from dataset.memory import collect_candidates

    _break(voc_root, 1)
    dataset = voc(voc_root)  # raw class ids, all six images
    names = [dataset.image_path(i).rsplit("/", 1)[1] for i in range(len(dataset))]
    entries = collect_candidates(dataset, names, batch_size=2)
    # image 1 (classes 1, 3) is no candidate; the others keep their own classes
    assert [(e.name, e.classes) for e in entries] == [
        ("im0.png", (1,)), ("im2.png", (3,)), ("im3.png", (2, 4)), ("im4.png", (4,)), ("im5.png", (3, 4))]
    assert dataset.skips.count == 1
