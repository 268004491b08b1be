"""utils.visualize: feature pooling, CSV summaries and blending on hand-computed values; the three
figures (Python functions and CLI) on a tiny SegFormer-B0 and a generated 64-px VOC tree."""

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import argparser
from segmentation_module import make_model
from utils import visualize
from utils.checkpoint import options_to_dict, save_atomic
from utils.results import append_results_row

ROOT = Path(__file__).resolve().parents[1]
TASK = "15-5"
MIN_PNG_BYTES = 5 * 1024
# t-SNE runs with n_jobs=1 here: two threads on a shared 2-core machine are many times slower.


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Generated VOC tree (8 train / 6 val images of 64 px) and step-0 / step-1 checkpoints of a
    randomly initialised SegFormer-B0 in run.py's format."""
    from dataset.synthetic import generate

    base = tmp_path_factory.mktemp("visualize")
    data_root = generate(str(base / "voc"), num_train=8, num_val=6, size=64, workers=1)
    opts = argparser.parse_options([
        "--data_root", data_root, "--idxs_dir", str(base / "idxs"), "--task", TASK, "--step", "1",
        "--model", "segformer_b0", "--no_pretrained", "--crop_size", "64"])
    checkpoints = {}
    for step, classes in ((0, [16]), (1, [16, 5])):
        checkpoints[step] = _save_checkpoint(base / f"step{step}.pth", opts, step, classes)
    return {"base": base, "data_root": data_root, "ckpt": checkpoints, "opts": opts}


def _save_checkpoint(path, opts, step, classes, stored_classes=None, task=TASK):
    opts = argparse.Namespace(**vars(opts))
    opts.step, opts.task = step, task
    model = make_model(opts, classes)
    save_atomic({"model_state": model.state_dict(), "classes": stored_classes or classes,
                 "step": step, "task": task, "dataset": "voc", "opts": options_to_dict(opts)}, path)
    return str(path)


def _assert_png(path):
    assert os.path.isfile(path), path
    assert os.path.getsize(path) > MIN_PNG_BYTES, os.path.getsize(path)
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) > 200


def _run_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "utils.visualize", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


class EvenPixelFeatures(nn.Module):
    """Stand-in with the model's call signature: head features = the input at even pixels."""

    def forward(self, x, ret_intermediate=False):
        features = x[:, :, ::2, ::2]
        return features, {"pre_logits": features} if ret_intermediate else {}


def _pooling_batch():
    """One 4×4 image with two channels; at even pixels channel 0 is [[1, 2], [3, 4]], channel 1
    ten times that, labels [[0, 5], [5, 255]]; odd pixels hold other values and class 7."""
    image = torch.full((1, 2, 4, 4), 99.0)
    image[0, 0, ::2, ::2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    image[0, 1, ::2, ::2] = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    labels = torch.full((1, 4, 4), 7, dtype=torch.long)
    labels[0, ::2, ::2] = torch.tensor([[0, 5], [5, 255]])
    return image, labels


# ------------------------------------------------------------------------ exact values
def test_downsample_labels_takes_the_top_left_pixel_of_each_cell():
    labels = torch.arange(16).view(1, 4, 4)
    assert visualize.downsample_labels(labels, (2, 2)).tolist() == [[[0, 2], [8, 10]]]
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        visualize.downsample_labels(labels[0], (2, 2))


def test_pooled_class_features_means_per_image_and_class():
    image, labels = _pooling_batch()
    other = (torch.zeros_like(image), torch.zeros_like(labels))
    result = visualize.pooled_class_features(EvenPixelFeatures(), [(image, labels), other], "cpu",
                                             max_images=1)
    np.testing.assert_allclose(result.features, [[1.0, 10.0], [2.5, 25.0]])
    assert result.labels.tolist() == [0, 5]
    assert result.pooled.tolist() == [True, True]
    without_background = visualize.pooled_class_features(
        EvenPixelFeatures(), [(image, labels)], "cpu", max_images=5, skip_background=True)
    np.testing.assert_allclose(without_background.features, [[2.5, 25.0]])


def test_pooled_class_features_samples_pixels_of_the_class():
    image, labels = _pooling_batch()
    batch = (image.repeat(2, 1, 1, 1), labels.repeat(2, 1, 1))
    result = visualize.pooled_class_features(EvenPixelFeatures(), [batch], "cpu", max_images=1,
                                             pixels_per_class=3, seed=1)
    # class 0: mean + its single pixel; class 5: mean + both pixels (3 asked, 2 exist); one image.
    assert result.labels.tolist() == [0, 0, 5, 5, 5]
    assert result.pooled.tolist() == [True, False, True, False, False]
    np.testing.assert_allclose(result.features[1], [1.0, 10.0])
    assert sorted(map(tuple, result.features[3:].tolist())) == [(2.0, 20.0), (3.0, 30.0)]


def test_pooled_class_features_rejects_images_without_labels():
    image, labels = _pooling_batch()
    with pytest.raises(ValueError, match="no labelled pixel"):
        visualize.pooled_class_features(EvenPixelFeatures(), [(image, torch.full_like(labels, 255))],
                                        "cpu", max_images=1)


def test_read_step_summaries_base_new_all(tmp_path):
    path = tmp_path / "run.csv"
    append_results_row(path, 0, [0.5, 0.7, math.nan], 5, 3, 0.6)
    append_results_row(path, 1, [0.4, 0.6, 0.8, 0.2, math.nan], 5, 5, 0.5)
    summary = visualize.read_step_summaries(str(path))
    assert summary["step"] == [0, 1]
    np.testing.assert_allclose(summary["base"], [0.6, 0.6])  # (0.5+0.7)/2, (0.4+0.6+0.8)/3
    np.testing.assert_allclose(summary["new"], [math.nan, 0.2])
    np.testing.assert_allclose(summary["all"], [0.6, 0.5])
    two_base = visualize.read_step_summaries(str(path), n_base=2)
    np.testing.assert_allclose(two_base["new"], [math.nan, (0.8 + 0.2) / 2])
    with pytest.raises(ValueError, match="21"):
        visualize.read_step_summaries(str(path), n_classes=21)


def test_read_step_summaries_errors(tmp_path):
    path = tmp_path / "late.csv"
    append_results_row(path, 2, [0.5, 0.5, 0.5], 4, 3, 0.5)
    with pytest.raises(ValueError, match="--dataset and --task"):
        visualize.read_step_summaries(str(path))
    with pytest.raises(ValueError, match="fewer than the 4 base"):
        visualize.read_step_summaries(str(path), n_base=4)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        visualize.read_step_summaries(str(tmp_path / "missing.csv"))


def test_base_class_count_and_legend_names():
    assert visualize.base_class_count("voc", "15-1") == 16
    assert visualize.base_class_count("ade", "100-50") == 101
    names = visualize.class_legend_names("voc", "19-1b", 1)
    assert (names[4], names[5], names[19], names[20]) == ("4", "5 (id 6)", "19 (id 20)", "20 (id 5) new")
    assert visualize.class_legend_names("voc", TASK, 0)[15] == "15"


def test_denormalize_and_blend_labels():
    np.testing.assert_array_equal(visualize.denormalize(torch.zeros(3, 1, 1)), [[[124, 116, 104]]])
    image = np.full((1, 2, 3), 100, dtype=np.uint8)
    from utils.logger import color_map

    blended = visualize.blend_labels(image, np.array([[0, 1]]), color_map("voc"), alpha=0.5)
    # background kept; class 1 (VOC colour (128, 0, 0)) half-way: (100+128)/2, 100/2, 100/2
    np.testing.assert_array_equal(blended, [[[100, 100, 100], [114, 50, 50]]])
    with pytest.raises(ValueError, match="alpha"):
        visualize.blend_labels(image, np.array([[0, 1]]), color_map("voc"), alpha=1.5)


def test_embed_tsne_shape_and_minimum_size():
    points = visualize.embed_tsne(np.random.default_rng(0).normal(size=(12, 8)), seed=0, n_jobs=1)
    assert points.shape == (12, 2) and np.isfinite(points).all()
    with pytest.raises(ValueError, match="at least 4"):
        visualize.embed_tsne(np.zeros((3, 8)))


# ----------------------------------------------------------------- checkpoints and errors
def test_load_model_restores_the_checkpoint(workspace):
    model, opts = visualize.load_model(workspace["ckpt"][1])
    assert (opts.step, opts.task, opts.dataset, model.classes) == (1, TASK, "voc", [16, 5])
    assert not model.training
    stored = torch.load(workspace["ckpt"][1], weights_only=True)["model_state"]
    assert torch.equal(model.state_dict()["cls.1.weight"], stored["cls.1.weight"])


def test_checkpoint_errors(workspace):
    base = workspace["base"]
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        visualize.load_model(str(base / "nothing.pth"))
    wrong = _save_checkpoint(base / "wrong.pth", workspace["opts"], 1, [16, 5], stored_classes=[16, 4])
    with pytest.raises(ValueError, match=r"class counts \[16, 4\].*\[16, 5\]"):
        visualize.load_model(wrong)
    misfit = _save_checkpoint(base / "misfit.pth", workspace["opts"], 1, [16, 4], stored_classes=[16, 5])
    with pytest.raises(ValueError, match="weights do not fit"):
        visualize.load_model(misfit)
    save_atomic({"model_state": {}}, base / "bare.pth")
    with pytest.raises(ValueError, match="lacks"):
        visualize.load_model(str(base / "bare.pth"))
    _, new = visualize.load_model(workspace["ckpt"][1])
    other_task = _save_checkpoint(base / "other.pth", workspace["opts"], 0, [11], task="10-10")
    _, old = visualize.load_model(other_task)
    with pytest.raises(ValueError, match="10-10"):
        visualize.check_old_new(old, new)
    with pytest.raises(ValueError, match="not earlier"):
        visualize.check_old_new(new, new)


# --------------------------------------------------------------------------- figures
def test_tsne_figure_of_old_and_new_model(workspace, tmp_path):
    model_old, opts_old = visualize.load_model(workspace["ckpt"][0])
    model, opts = visualize.load_model(workspace["ckpt"][1])
    visualize.check_old_new(opts_old, opts)
    data = visualize.build_split(opts, "test")
    features = {}
    for name, network in (("old", model_old), ("new", model)):
        loader = torch.utils.data.DataLoader(data, batch_size=1)
        features[name] = visualize.pooled_class_features(network, loader, "cpu", max_images=3,
                                                         pixels_per_class=2)
        assert features[name].features.shape[1] == 256
    # same images, labels and sampled pixels for both models
    np.testing.assert_array_equal(features["old"].labels, features["new"].labels)
    figure = visualize.tsne_figure(features, "voc", seed=0,
                                   class_names=visualize.class_legend_names("voc", TASK, 1), n_jobs=1)
    _assert_png(visualize.save_figure(figure, str(tmp_path / "tsne.png")))


def test_curves_figure(tmp_path):
    paths = []
    for name, offset in (("ft", 0.0), ("mib", 0.1)):
        path = tmp_path / f"{name}.csv"
        for step in range(3):
            n_seen = 16 + 2 * step
            append_results_row(path, step, [0.3 + offset] * n_seen, 21, n_seen, 0.3 + offset)
        paths.append(str(path))
    figure = visualize.curves_figure(paths, labels=["FT", "MiB"], n_base=16, n_classes=21)
    _assert_png(visualize.save_figure(figure, str(tmp_path / "curves.png")))
    with pytest.raises(ValueError, match="2 labels for 1"):
        visualize.curves_figure(paths[:1], labels=["a", "b"])


def test_overlay_figure(workspace, tmp_path):
    model, opts = visualize.load_model(workspace["ckpt"][1])
    data = visualize.build_split(opts, "test")
    figure = visualize.overlay_figure(model, data, [0, 2], dataset_name="voc")
    _assert_png(visualize.save_figure(figure, str(tmp_path / "overlay.png")))
    with pytest.raises(IndexError, match="out of range"):
        visualize.overlay_figure(model, data, [len(data)])


# -------------------------------------------------------------------------------- CLI
def test_cli_tsne_in_a_subprocess(workspace, tmp_path):
    out, ckpt = tmp_path / "figures", workspace["ckpt"]
    tsne = _run_cli("tsne", "--ckpt", ckpt[1], "--ckpt_old", ckpt[0], "--out", out, "--num_images", 2,
                    "--n_jobs", 1, "--device", "cpu", "--logdir", tmp_path / "tb", cwd=tmp_path)
    assert tsne.returncode == 0, tsne.stderr
    assert tsne.stdout.split()[-1] == str(out / f"tsne_{TASK}-voc_step1.png")
    _assert_png(tsne.stdout.split()[-1])
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))


def test_cli_overlay_and_curves(workspace, tmp_path):
    # In-process to spare two interpreter start-ups; the parser and runners are the CLI's.
    out = tmp_path / "figures"
    [overlay] = visualize.main(["overlay", "--ckpt", workspace["ckpt"][1], "--indices", "1", "3",
                                "--out", str(out), "--device", "cpu"])
    assert overlay == str(out / f"overlay_{TASK}-voc_step1.png")
    _assert_png(overlay)

    csv_path = tmp_path / "run.csv"
    for step in range(2):
        append_results_row(csv_path, step, [0.5] * (16 + 5 * step), 21, 16 + 5 * step, 0.5)
    [curves] = visualize.main(["curves", "--csv", str(csv_path), "--dataset", "voc", "--task", TASK,
                               "--out", str(out)])
    assert curves == str(out / "curves.png")
    _assert_png(curves)

    with pytest.raises(SystemExit) as exit_info:
        visualize.main(["curves", "--csv", str(tmp_path / "none.csv"), "--out", str(out)])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        visualize.main(["curves", "--csv", str(csv_path), "--dataset", "voc", "--out", str(out)])
