"""The generated trees: layouts read back by the real loaders, determinism, class balance,
``ensure_demo_tree`` and ``get_dataset`` end to end on a generated VOC tree."""

import argparse
import filecmp
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import AdeSegmentationIncremental, VOCSegmentationIncremental, get_dataset, incremental
from dataset.synthetic import (
    MARKER,
    STYLES,
    class_looks,
    ensure_demo_tree,
    generate,
    plan_split,
    voc_palette,
)


@pytest.fixture(autouse=True)
def _fresh_scan_memo():
    incremental._PRESENCE_MEMO.clear()
    yield
    incremental._PRESENCE_MEMO.clear()


@pytest.fixture(scope="module")
def voc_tree(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("gen") / "voc"), "voc", num_train=12, num_val=6,
                    size=64, seed=3, workers=1)


def test_voc_tree_layout_and_files(voc_tree):
    assert sorted(os.listdir(voc_tree)) == [
        "JPEGImages", MARKER, "SegmentationClassAug", "saliency_map", "splits",
    ]
    lines = open(os.path.join(voc_tree, "splits", "train_aug.txt")).read().splitlines()
    assert len(lines) == 12
    assert lines[0] == "/JPEGImages/synth_train_000000.jpg /SegmentationClassAug/synth_train_000000.png"
    mask = Image.open(os.path.join(voc_tree, "SegmentationClassAug", "synth_train_000000.png"))
    assert mask.mode == "P" and mask.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    image = Image.open(os.path.join(voc_tree, "JPEGImages", "synth_train_000000.jpg"))
    assert image.format == "JPEG" and image.height == 64 and 64 <= image.width <= 84
    assert json.load(open(os.path.join(voc_tree, MARKER)))["seed"] == 3


def test_voc_tree_read_by_the_loader(voc_tree):
    raw = VOCSegmentationIncremental(voc_tree, train=True, saliency=True, scan_workers=1)
    assert len(raw) == 12
    for index in range(len(raw)):
        image, label, saliency = raw[index]
        values = set(label.unique().tolist())
        assert values <= set(range(21)) | {255} and 0 in values and values & set(range(1, 21))
        assert 255 in values  # the void band on object borders
        # saliency covers exactly the objects: every object pixel is salient, background is not
        assert bool((saliency[(label > 0) & (label < 255)] == 1).all())
        assert bool((saliency[label == 0] == 0).all())
    assert len(VOCSegmentationIncremental(voc_tree, train=False, scan_workers=1)) == 6


def test_void_band_covers_both_sides_of_every_object_border(voc_tree):
    for name in ("synth_val_000000.png", "synth_val_000001.png"):
        label = np.asarray(Image.open(os.path.join(voc_tree, "SegmentationClassAug", name)))
        salient = np.asarray(Image.open(os.path.join(voc_tree, "saliency_map", name))) > 0
        border = salient[:, 1:] != salient[:, :-1]  # object | background between columns j, j+1
        assert border.any()
        assert (label[:, 1:][border] == 255).all() and (label[:, :-1][border] == 255).all()
        assert (label == 255).mean() < 0.25  # a thin band, not the whole object


def test_ade_tree_read_by_the_loader(tmp_path):
    root = generate(str(tmp_path / "ADEChallengeData2016"), "ade", num_train=8, num_val=4, size=48,
                    seed=1, workers=1)
    assert sorted(os.listdir(os.path.join(root, "images"))) == ["training", "validation"]
    mask = Image.open(os.path.join(root, "annotations", "training", "ADE_train_000000.png"))
    assert mask.mode == "L"
    dataset = AdeSegmentationIncremental(str(tmp_path), train=True, saliency=True, scan_workers=1)
    assert len(dataset) == 8
    values = set(torch.cat([dataset[i][1].flatten() for i in range(8)]).unique().tolist())
    assert 255 not in values and values <= set(range(151))
    assert len(AdeSegmentationIncremental(root, train=False, scan_workers=1)) == 4


def test_generation_is_deterministic_and_seeded(tmp_path):
    a = generate(str(tmp_path / "a"), "voc", num_train=34, num_val=6, size=40, seed=7, workers=1)
    b = generate(str(tmp_path / "b"), "voc", num_train=34, num_val=6, size=40, seed=7, workers=2)
    c = generate(str(tmp_path / "c"), "voc", num_train=34, num_val=6, size=40, seed=8, workers=1)
    for folder in ("JPEGImages", "SegmentationClassAug", "saliency_map", "splits"):
        names = sorted(os.listdir(os.path.join(a, folder)))
        match, mismatch, errors = filecmp.cmpfiles(os.path.join(a, folder), os.path.join(b, folder),
                                                   names, shallow=False)
        assert mismatch == [] and errors == [] and len(match) == len(names)
    masks = sorted(os.listdir(os.path.join(a, "SegmentationClassAug")))
    _, different, _ = filecmp.cmpfiles(os.path.join(a, "SegmentationClassAug"),
                                       os.path.join(c, "SegmentationClassAug"), masks, shallow=False)
    assert len(different) == len(masks)


def test_every_class_tops_enough_images():
    plans = plan_split("voc", 0, 40, seed=0, prefix="x")
    tops = [plan.classes[-1] for plan in plans]
    assert sorted(tops) == sorted(list(range(1, 21)) * 2)
    assert all(1 <= len(plan.classes) <= 4 for plan in plans)
    assert len({len(plan.classes) for plan in plans}) > 1  # several objects, so occlusion happens


def test_class_looks_are_distinct_and_colour_sharing_classes_differ_in_shape():
    for dataset, style in STYLES.items():
        looks = class_looks(dataset)
        assert len(looks) == style.n_foreground
        assert len({(l.shape, l.texture, l.hue) for l in looks}) == style.n_foreground
        for hue in {l.hue for l in looks}:
            shapes = [l.shape for l in looks if l.hue == hue]
            assert len(shapes) == len(set(shapes))
    voc = class_looks("voc")
    assert (voc[0].hue, voc[0].shape) == (0.0, 0) and (voc[10].hue, voc[10].shape) == (0.0, 1)


def test_voc_palette_values():
    palette = voc_palette()
    assert palette[3:6] == [128, 0, 0]
    assert palette[15 * 3:16 * 3] == [192, 128, 128]  # person
    assert palette[255 * 3:] == [224, 224, 192]


def test_generate_refuses_a_non_empty_folder_and_bad_arguments(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        generate(str(tmp_path / "busy"), num_train=2, num_val=2, size=32)
    with pytest.raises(ValueError, match="dataset"):
        generate(str(tmp_path / "x"), dataset="coco")
    with pytest.raises(ValueError, match="size"):
        generate(str(tmp_path / "x"), size=16)
    assert not os.path.exists(tmp_path / "x")
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no staging left over


def test_ensure_demo_tree_is_idempotent(tmp_path):
    path = str(tmp_path / "demo")
    assert ensure_demo_tree(path, num_train=3, num_val=2, size=32, workers=1) == path
    marker = os.path.join(path, MARKER)
    stamp = os.stat(marker).st_mtime_ns
    assert ensure_demo_tree(path, num_train=3, num_val=2, size=32, workers=1) == path
    assert os.stat(marker).st_mtime_ns == stamp
    assert len(os.listdir(os.path.join(path, "JPEGImages"))) == 5
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.txt").write_text("x")
    with pytest.raises(FileExistsError):
        ensure_demo_tree(str(tmp_path / "other"), num_train=3, num_val=2, size=32, workers=1)


def make_opts(data_root, idxs_dir, **overrides):
    opts = dict(
        data_root=data_root, dataset="voc", task="15-1", step=1, overlap=True, crop_size=32,
        crop_val=True, data_masking="current", no_mask=False, test_on_val=False, cross_val=False,
        val_on_trainset=False, ignore_test_bg=False, random_seed=42, idxs_dir=idxs_dir,
        method="MiB",
    )
    opts.update(overrides)
    return argparse.Namespace(**opts)


@pytest.fixture(scope="module")
def balanced_tree(tmp_path_factory):
    """40 + 40 images: every class is the top object of two images per split."""
    return generate(str(tmp_path_factory.mktemp("gen") / "voc40"), "voc", num_train=40, num_val=40,
                    size=32, seed=0, workers=1)


def images_with(dataset_root, train, classes):
    raw = VOCSegmentationIncremental(dataset_root, train=train, scan_workers=1)
    presence = raw.class_presence()
    return np.flatnonzero(presence[:, classes].any(axis=1)).tolist()


def test_get_dataset_builds_the_three_sets_of_a_step(balanced_tree, tmp_path):
    opts = make_opts(balanced_tree, str(tmp_path / "idx"))
    train, val, test, n_seen = get_dataset(opts)
    assert n_seen == 17
    assert train.indices.tolist() == images_with(balanced_tree, True, [16])
    assert val.indices.tolist() == images_with(balanced_tree, False, [16])
    assert test.indices.tolist() == images_with(balanced_tree, False, list(range(1, 17)))
    assert len(train) >= 2 and len(val) >= 2
    assert os.path.isfile(tmp_path / "idx" / "voc" / "15-5s-ov" / "train-1.npy")
    image, label = train[0]
    assert image.shape == (3, 32, 32) and set(label.unique().tolist()) <= {0, 16, 255}
    assert set(torch.cat([test[i][1].flatten() for i in range(len(test))]).unique().tolist()) <= set(range(17)) | {255}


def test_get_dataset_disjoint_cross_val_and_saliency(balanced_tree, tmp_path):
    opts = make_opts(balanced_tree, str(tmp_path / "idx"), overlap=False, cross_val=True, method="SSUL")
    train, val, test, _ = get_dataset(opts)
    assert os.path.isdir(tmp_path / "idx" / "voc" / "15-5s")
    parent = train.dataset
    assert len(train) + len(val) == len(parent) and len(train) == int(0.8 * len(parent))
    assert set(train.indices).isdisjoint(val.indices)
    assert len(train[0]) == 3  # SSUL: (image, label, saliency)
    image, label = val[0]
    assert image.shape == (3, 32, 32) and val.dataset.transform is not parent.transform


def test_get_dataset_test_on_val_splits_train_and_test(balanced_tree, tmp_path):
    plain = get_dataset(make_opts(balanced_tree, str(tmp_path / "a"), step=0))
    split = get_dataset(make_opts(balanced_tree, str(tmp_path / "b"), step=0, test_on_val=True))
    assert len(split[0]) == int(0.8 * len(plain[0]))
    assert len(split[2]) == len(plain[2]) - int(0.8 * len(plain[2]))
    assert len(split[1]) == len(plain[1])  # validation set untouched


def test_get_dataset_on_missing_root_explains_the_demo_tree(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m dataset.synthetic --out DIR"):
        get_dataset(make_opts(str(tmp_path / "missing"), str(tmp_path / "idx")))
