"""Per-step selection, label mapping, index caching, layouts and bad input of the dataset core.

The hand-made tree has six 6x4 images whose masks are constant along each column:

    image 0: 0 0 1 1 0 0        image 3: 0 2 255 4 4 0
    image 1: 0 1 1 3 3 0        image 4: 0 0 4 4 0 0
    image 2: 0 0 3 3 0 0        image 5: 0 3 3 255 4 0

Both split lists name all six (val = train), so every expected index below is hand-computed.
"""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import incremental
from dataset.ade import AdeSegmentationIncremental, detect_ade_root
from dataset.incremental import (
    INVALID,
    UnreadableSampleError,
    label_lut,
    read_image,
    select_images,
    sidecar_path,
    split_test_on_val,
)
from dataset.synthetic import voc_palette
from dataset.voc import VOCSegmentationIncremental, detect_voc_layout

COLUMNS = [
    [0, 0, 1, 1, 0, 0],
    [0, 1, 1, 3, 3, 0],
    [0, 0, 3, 3, 0, 0],
    [0, 2, 255, 4, 4, 0],
    [0, 0, 4, 4, 0, 0],
    [0, 3, 3, 255, 4, 0],
]
HEIGHT = 4


def mask_array(i):
    return np.tile(np.array(COLUMNS[i], dtype=np.uint8), (HEIGHT, 1))


def image_array(i):
    """An image whose red channel encodes the image index, so samples can be told apart."""
    image = np.zeros((HEIGHT, len(COLUMNS[i]), 3), dtype=np.uint8)
    image[..., 0] = 40 * i
    return image


def save_mask(path, array):
    mask = Image.fromarray(array).convert("P")
    mask.putpalette(voc_palette())
    mask.save(path)


def write_voc(root, layout="sats", saliency=False, n=6):
    """The six-image tree in one of the VOC layouts; returns the data_root to pass."""
    if layout == "mib":
        base = root / "PascalVOC12"
        split_dir, image_base, mask_base = base / "splits", base, base
    elif layout == "plop":
        split_dir, mask_base = root / "list", root
        image_base = root / "VOCdevkit" / "VOC2012"
    else:
        split_dir, image_base, mask_base = root / "splits", root, root
    for folder in (split_dir, image_base / "JPEGImages", mask_base / "SegmentationClassAug"):
        folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.fromarray(image_array(i)).save(image_base / "JPEGImages" / f"im{i}.png")
        save_mask(mask_base / "SegmentationClassAug" / f"im{i}.png", mask_array(i))
        lines.append(f"/JPEGImages/im{i}.png /SegmentationClassAug/im{i}.png\n")
    for name in ("train_aug.txt", "val.txt"):
        (split_dir / name).write_text("".join(lines))
    if saliency:
        (image_base / "saliency_map").mkdir()
        for i in range(n):
            sal = np.where(mask_array(i) > 0, 255, 0).astype(np.uint8)
            Image.fromarray(sal).save(image_base / "saliency_map" / f"im{i}.png")
    return root


@pytest.fixture(autouse=True)
def _fresh_scan_memo():
    incremental._PRESENCE_MEMO.clear()
    yield
    incremental._PRESENCE_MEMO.clear()


@pytest.fixture
def voc_root(tmp_path):
    return write_voc(tmp_path / "voc")


def voc(root, **kwargs):
    kwargs.setdefault("scan_workers", 1)
    return VOCSegmentationIncremental(str(root), **kwargs)


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------

STEPS = [([0, 1, 2], []), ([3], [0, 1, 2]), ([4], [0, 1, 2, 3])]


@pytest.mark.parametrize(
    "step, overlap, expected",
    [
        (0, True, [0, 1, 3]),
        (0, False, [0]),
        (1, True, [1, 2, 5]),
        (1, False, [1, 2]),
        (2, True, [3, 4, 5]),
        (2, False, [3, 4, 5]),
    ],
)
def test_selection_overlap_and_disjoint(voc_root, step, overlap, expected):
    labels, labels_old = STEPS[step]
    dataset = voc(voc_root, labels=labels, labels_old=labels_old, overlap=overlap)
    assert dataset.indices.tolist() == expected


def test_disjoint_steps_partition_the_images(voc_root):
    chosen = [voc(voc_root, labels=l, labels_old=o, overlap=False).indices.tolist() for l, o in STEPS]
    assert sorted(sum(chosen, [])) == list(range(6))


def test_select_images_on_presence_matrix():
    presence = np.zeros((3, 256), dtype=bool)
    presence[0, [0, 5]] = True
    presence[1, [0, 5, 7, 255]] = True
    presence[2, [0, 7]] = True
    assert select_images(presence, [5], [], overlap=True).tolist() == [0, 1]
    assert select_images(presence, [5], [], overlap=False).tolist() == [0]
    assert select_images(presence, [5], [7], overlap=False).tolist() == [0, 1]
    assert select_images(presence, [0], [], overlap=True).tolist() == []


def test_callers_lists_are_not_mutated(voc_root):
    labels, labels_old = [0, 3], [0, 1, 2]
    voc(voc_root, labels=labels, labels_old=labels_old)
    assert labels == [0, 3] and labels_old == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# Label mapping (shuffled order: step 0 = [0, 3, 1], step 1 = [4], step 2 = [2])
# ---------------------------------------------------------------------------------------------

RAW = np.array([0, 1, 2, 3, 4, 5, 255])


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(data_masking="current"), [0, 0, 0, 0, 3, 0, 255]),
        (dict(data_masking="current+old"), [0, 2, 0, 1, 3, 0, 255]),
        (dict(data_masking="new"), [0, 255, 255, 255, 3, 255, 255]),
        (dict(data_masking="all", labels_future=[2]), [0, 2, 4, 1, 3, 0, 255]),
        (dict(data_masking="all"), [0, 2, 4, 1, 3, 5, 255]),
        (dict(masking=False), [0, 2, 0, 1, 3, 0, 255]),
        (dict(ignore_test_bg=True), [255, 255, 255, 255, 3, 255, 255]),
    ],
)
def test_label_lut_modes_on_shuffled_order(kwargs, expected):
    lut = label_lut([4], [0, 3, 1], n_classes=21, **kwargs)
    assert lut[RAW].tolist() == expected


def test_label_lut_test_set_and_ignore_test_bg():
    assert label_lut([0, 3, 1, 4], [], 21)[RAW].tolist() == [0, 2, 0, 1, 3, 0, 255]
    assert label_lut([0, 3, 1, 4], [], 21, ignore_test_bg=True)[RAW].tolist() == [
        255, 2, 255, 1, 3, 255, 255,
    ]


def test_label_lut_flags_non_class_values_and_rejects_bad_lists():
    lut = label_lut([2], [1], n_classes=5)
    assert lut[5] == INVALID and lut[254] == INVALID and lut[255] == 255
    with pytest.raises(ValueError, match="disjoint"):
        label_lut([2], [1, 2], n_classes=5)
    with pytest.raises(ValueError, match="not class ids"):
        label_lut([7], [1], n_classes=5)
    with pytest.raises(ValueError, match="data_masking"):
        label_lut([2], [1], n_classes=5, data_masking="old")


def labels_of(dataset, file_index):
    position = dataset.indices.tolist().index(file_index)
    return dataset[position][1][0].tolist()  # first row; the masks are constant per column


@pytest.mark.parametrize(
    "data_masking, image, expected",
    [
        ("current", 5, [0, 0, 0, 255, 3, 0]),
        ("current+old", 5, [0, 1, 1, 255, 3, 0]),
        ("new", 5, [0, 255, 255, 255, 3, 0]),
        ("current", 3, [0, 0, 255, 3, 3, 0]),
        ("all", 3, [0, 4, 255, 3, 3, 0]),
    ],
)
def test_train_and_val_labels_of_a_shuffled_step(voc_root, data_masking, image, expected):
    for train in (True, False):
        dataset = voc(
            voc_root, train=train, labels=[4], labels_old=[0, 3, 1], data_masking=data_masking,
            labels_future=[2],
        )
        assert dataset.indices.tolist() == [3, 4, 5]
        assert labels_of(dataset, image) == expected


def test_disjoint_shuffled_step_excludes_future_class(voc_root):
    dataset = voc(voc_root, labels=[4], labels_old=[0, 3, 1], overlap=False)
    assert dataset.indices.tolist() == [4, 5]


def test_test_set_of_a_shuffled_step(voc_root):
    step0 = voc(voc_root, train=False, labels=[0, 3, 1])
    assert step0.indices.tolist() == [0, 1, 2, 5]
    assert labels_of(step0, 1) == [0, 2, 2, 1, 1, 0]
    test = voc(voc_root, train=False, labels=[0, 3, 1, 4])
    assert test.indices.tolist() == [0, 1, 2, 3, 4, 5]
    assert labels_of(test, 3) == [0, 0, 255, 3, 3, 0]
    ignoring = voc(voc_root, train=False, labels=[0, 3, 1, 4], ignore_test_bg=True)
    assert labels_of(ignoring, 3) == [255, 255, 255, 3, 3, 255]


def test_sample_types_and_raw_dataset(voc_root):
    image, label = voc(voc_root, labels=[4], labels_old=[0, 3, 1])[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 4, 6)
    assert label.dtype == torch.int64 and label.shape == (4, 6)
    assert type(label) is torch.Tensor
    raw = voc(voc_root)
    assert len(raw) == 6 and raw[3][1][0].tolist() == COLUMNS[3]
    assert int(raw[2][0][0, 0, 0]) == 80  # red channel encodes the image index


def test_split_test_on_val_is_seeded_80_20(voc_root):
    assert split_test_on_val(np.arange(6), train=True).tolist() == [2, 1, 4, 0]
    assert split_test_on_val(np.arange(6), train=False).tolist() == [3, 5]
    train = voc(voc_root, train=True, labels=[0, 3, 1, 4], test_on_val=True)
    test = voc(voc_root, train=False, labels=[0, 3, 1, 4], test_on_val=True)
    assert train.indices.tolist() == [2, 1, 4, 0] and test.indices.tolist() == [3, 5]


def test_saliency_samples(tmp_path):
    root = write_voc(tmp_path / "voc", saliency=True)
    image, label, saliency = voc(root, labels=[4], labels_old=[0, 3, 1], saliency=True)[2]
    assert saliency.dtype == torch.int64
    assert saliency[0].tolist() == [0, 1, 1, 1, 1, 0]  # image 5: 0 3 3 255 4 0


# ---------------------------------------------------------------------------------------------
# Index cache
# ---------------------------------------------------------------------------------------------


def test_index_cache_written_reused_and_rebuilt(voc_root, tmp_path, monkeypatch):
    idxs = tmp_path / "idx" / "train-1.npy"
    first = voc(voc_root, labels=[3], labels_old=[0, 1, 2], idxs_path=str(idxs))
    assert first.indices.tolist() == [1, 2, 5]
    assert np.load(idxs).tolist() == [1, 2, 5]
    assert os.path.isfile(sidecar_path(str(idxs)))
    assert os.path.isfile(tmp_path / "idx" / "classes-train.npy")

    def no_scan(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    incremental._PRESENCE_MEMO.clear()
    monkeypatch.setattr(incremental, "scan_class_presence", no_scan)
    again = voc(voc_root, labels=[3], labels_old=[0, 1, 2], idxs_path=str(idxs))
    assert again.indices.tolist() == [1, 2, 5]
    # another selection on the same split reuses the cached class scan
    other = voc(voc_root, labels=[4], labels_old=[0, 1, 2, 3], idxs_path=str(tmp_path / "idx" / "train-2.npy"))
    assert other.indices.tolist() == [3, 4, 5]
    monkeypatch.undo()

    # the split list changes (image 1 dropped): lines shift, the cache is rebuilt
    split = voc_root / "splits" / "train_aug.txt"
    split.write_text("".join(l for l in split.read_text().splitlines(True) if "im1." not in l))
    incremental._PRESENCE_MEMO.clear()
    rebuilt = voc(voc_root, labels=[3], labels_old=[0, 1, 2], idxs_path=str(idxs))
    assert rebuilt.indices.tolist() == [1, 4]  # images 2 and 5 are now lines 1 and 4
    assert np.load(idxs).tolist() == [1, 4]


def test_index_cache_rebuilt_when_a_mask_changes(voc_root, tmp_path):
    idxs = str(tmp_path / "idx" / "train-1.npy")
    assert voc(voc_root, labels=[3], labels_old=[0, 1, 2], idxs_path=idxs).indices.tolist() == [1, 2, 5]
    save_mask(voc_root / "SegmentationClassAug" / "im0.png", np.full((HEIGHT, 6), 3, np.uint8))
    os.utime(voc_root / "SegmentationClassAug" / "im0.png", ns=(1, 1))
    incremental._PRESENCE_MEMO.clear()
    assert voc(voc_root, labels=[3], labels_old=[0, 1, 2], idxs_path=idxs).indices.tolist() == [0, 1, 2, 5]


def test_index_file_without_sidecar_is_used_with_a_warning(voc_root, tmp_path, caplog):
    idxs = tmp_path / "train-0.npy"
    np.save(idxs, np.array([5, 0]))
    with caplog.at_level(logging.WARNING):
        dataset = voc(voc_root, labels=[1, 2], idxs_path=str(idxs))
    assert dataset.indices.tolist() == [5, 0]
    assert "no fingerprint" in caplog.text
    np.save(idxs, np.array([0, 6]))
    with pytest.raises(ValueError, match="lists 6 images"):
        voc(voc_root, labels=[1, 2], idxs_path=str(idxs))


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["sats", "mib", "plop"])
def test_voc_layouts_are_detected_and_read(tmp_path, layout):
    root = write_voc(tmp_path / "voc", layout=layout)
    assert detect_voc_layout(str(root)).name == layout
    dataset = voc(root, labels=[3], labels_old=[0, 1, 2])
    assert dataset.indices.tolist() == [1, 2, 5]
    assert int(dataset[0][0][0, 0, 0]) == 40  # image 1, read from the layout's image folder


def test_plop_layout_without_devkit_reads_images_beside_masks(tmp_path):
    root = write_voc(tmp_path / "voc")
    (root / "splits").rename(root / "list")
    layout = detect_voc_layout(str(root))
    assert layout.name == "plop" and layout.image_base == str(root)
    assert len(voc(root)) == 6


def write_ade(root, n_train=3):
    for split, count in (("training", n_train), ("validation", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(image_array(i)).save(root / "images" / split / f"ADE_{split}_{i}.jpg")
            Image.fromarray((mask_array(i) % 255) * 30).save(root / "annotations" / split / f"ADE_{split}_{i}.png")
    (root / "images" / "training" / ".DS_Store").write_text("x")
    return root


@pytest.mark.parametrize("pass_parent", [False, True])
def test_ade_layout_both_roots(tmp_path, pass_parent):
    ade_root = write_ade(tmp_path / "ADEChallengeData2016")
    data_root = tmp_path if pass_parent else ade_root
    assert detect_ade_root(str(data_root)) == str(ade_root)
    dataset = AdeSegmentationIncremental(str(data_root), labels=[0, 30], scan_workers=1)
    assert dataset.indices.tolist() == [0, 1]  # masks 0 and 1 hold class 30 (1 x 30)
    assert dataset[1][1][0].tolist() == [0, 1, 1, 0, 0, 0]  # 30 -> 1, 90 (future) -> 0
    assert len(AdeSegmentationIncremental(str(data_root), train=False, scan_workers=1)) == 2


def test_ade_without_saliency_folder_is_all_salient(tmp_path):
    ade_root = write_ade(tmp_path / "ADEChallengeData2016")
    sample = AdeSegmentationIncremental(str(ade_root), saliency=True, scan_workers=1)[0]
    assert sample[2].tolist() == [[1] * 6] * HEIGHT


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_missing_root_explains_how_to_get_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m dataset.synthetic"):
        voc(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        AdeSegmentationIncremental(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="splits/, PascalVOC12/splits/ and list/"):
        voc(tmp_path / "empty")


def test_missing_split_file_is_named(voc_root):
    os.remove(voc_root / "splits" / "val.txt")
    with pytest.raises(FileNotFoundError, match=r"val\.txt"):
        voc(voc_root, train=False)


def test_malformed_split_line_is_named(voc_root):
    (voc_root / "splits" / "val.txt").write_text("/JPEGImages/im0.png\n")
    with pytest.raises(ValueError, match=r"val\.txt:1"):
        voc(voc_root, train=False)


def test_image_without_mask_is_named(voc_root, tmp_path):
    os.remove(voc_root / "SegmentationClassAug" / "im4.png")
    with pytest.raises(FileNotFoundError, match=r"im4\.png"):
        voc(voc_root)
    ade_root = write_ade(tmp_path / "ADEChallengeData2016")
    os.remove(ade_root / "annotations" / "training" / "ADE_training_2.png")
    with pytest.raises(FileNotFoundError, match="ADE_training_2.png"):
        AdeSegmentationIncremental(str(ade_root))


def test_mask_value_outside_the_classes_is_named(voc_root):
    bad = mask_array(2)
    bad[0, 0] = 21
    save_mask(voc_root / "SegmentationClassAug" / "im2.png", bad)
    with pytest.raises(ValueError, match=r"im2\.png: mask values \[21\].*\[0, 20\] or 255"):
        voc(voc_root, labels=[3], labels_old=[0, 1, 2])  # found by the class scan
    with pytest.raises(ValueError, match=r"im2\.png: mask values \[21\]"):
        voc(voc_root)[2]  # found when the sample is read (no scan without labels)


def test_rgb_mask_is_rejected(voc_root):
    Image.fromarray(image_array(0)).save(voc_root / "SegmentationClassAug" / "im0.png")
    with pytest.raises(ValueError, match=r"im0\.png: expected a single-channel PNG"):
        voc(voc_root)[0]


def test_mask_of_another_size_is_rejected(voc_root):
    save_mask(voc_root / "SegmentationClassAug" / "im0.png", np.zeros((3, 6), np.uint8))
    with pytest.raises(ValueError, match=r"im0\.png is 6x3 but its image .* is 6x4"):
        voc(voc_root)[0]


def test_unreadable_image_is_named(voc_root):
    (voc_root / "JPEGImages" / "im3.png").write_bytes(b"not an image")
    with pytest.raises(UnreadableSampleError, match=r"im3\.png"):
        read_image(str(voc_root / "JPEGImages" / "im3.png"))


def test_missing_saliency_folder_is_an_error(voc_root):
    with pytest.raises(FileNotFoundError, match="saliency_map"):
        voc(voc_root, saliency=True)
