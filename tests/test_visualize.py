"""utils.visualize: feature pooling, CSV summaries and blending on hand-computed values; the three
figures (Python functions and CLI) on a tiny SegFormer-B0 and a generated 64-px VOC tree."""

import argparse
import math
import os
import re
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
from utils.results import append_results_row, write_run_info

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
    # 19-1b moves VOC class 5 (bottle) to the last step: label 5 is id 6 (bus), label 20 is id 5
    assert (names[4], names[5], names[19], names[20]) == (
        "4 boat", "5 bus (id 6)", "19 tvmonitor (id 20)", "20 bottle (id 5) new")
    assert visualize.class_legend_names("voc", TASK, 0)[15] == "15 person"
    assert len(visualize.class_legend_names("voc", TASK, 0)) == 16


def test_task_class_names_follow_the_task_order():
    assert visualize.task_class_names("voc", "15-1")[:3] == ["background", "aeroplane", "bicycle"]
    assert visualize.task_class_names("voc", "19-1b")[19:] == ["tvmonitor", "bottle"]
    assert visualize.task_class_names("voc", "15-1", 16)[-1] == "person"
    ade = visualize.task_class_names("ade", "100-50")
    assert (len(ade), ade[0], ade[150]) == (151, "other", "flag")
    with pytest.raises(ValueError, match="22"):
        visualize.task_class_names("voc", "15-1", 22)


def test_confusion_matrix_has_a_tick_per_class_with_its_name():
    counts = np.array([[3, 1, 0], [0, 2, 0], [1, 0, 1]])
    figure = visualize.confusion_matrix_figure(counts, class_names=["background", "aeroplane", "bicycle"])
    axes = figure.axes[0]
    assert axes.get_xticks().tolist() == [0, 1, 2] and axes.get_yticks().tolist() == [0, 1, 2]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["0 background", "1 aeroplane", "2 bicycle"]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["0 background", "1 aeroplane", "2 bicycle"]
    np.testing.assert_allclose(axes.images[0].get_array(), [[0.75, 0.25, 0], [0, 1, 0], [0.5, 0, 0.5]])
    plain = visualize.confusion_matrix_figure(np.eye(3)).axes[0]
    assert [t.get_text() for t in plain.get_xticklabels()] == ["0", "1", "2"]  # integers, never 0.5 steps
    with pytest.raises(ValueError, match="2 class names for a 3-class"):
        visualize.confusion_matrix_figure(counts, class_names=["a", "b"])


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
    # pooled rows are coloured with the VOC palette of their label
    from utils.logger import color_map

    pooled_points = figure.axes[0].collections[-1]
    labels = features["old"].labels[features["old"].pooled]
    np.testing.assert_allclose(pooled_points.get_facecolors()[:, :3], color_map("voc")[labels] / 255.0)
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend == [visualize.class_legend_names("voc", TASK, 1)[c] for c in sorted(set(labels.tolist()))]
    _assert_png(visualize.save_figure(figure, str(tmp_path / "tsne.png")))


def test_voc_palette_separates_neighbouring_labels():
    from utils.logger import color_map

    palette = color_map("voc")[:21].astype(int)
    assert palette[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    # consecutive labels differ by at least 64 in some channel
    assert (np.abs(np.diff(palette, axis=0)).max(axis=1) >= 64).all()


def _mit_query_grids(height, width):
    """Token grids of the four MiT stages: stride-4 patch embedding (kernel 7, padding 3), then
    stride 2 (kernel 3, padding 1): each halves the grid, rounding up."""
    grids = [(math.ceil(height / 4), math.ceil(width / 4))]
    for _ in range(3):
        grids.append(tuple(math.ceil(side / 2) for side in grids[-1]))
    return grids


def test_attention_panels_are_upscaled_blocks(workspace):
    from utils import tensorboard_samples as tb

    model_old, _ = visualize.load_model(workspace["ckpt"][0])
    model, opts = visualize.load_model(workspace["ckpt"][1])
    data = visualize.build_split(opts, "test")
    panels = tb.pooled_attention_panels(model, model_old, data, [0], "cpu")
    label = data[0][1]
    grids = _mit_query_grids(*label.shape)
    assert label.shape[0] == 64 and [grid[0] for grid in grids] == [16, 8, 4, 2]
    # a class is pooled where it survives the downscaled labels (the 2x3 stage-4 grid may lose it)
    assert {1, 2} <= {int(tag[-1]) for tag, _ in panels} <= {1, 2, 3, 4}
    assert all(re.fullmatch(r"img0/class[1-9]\d*/stage[1-4]", tag) for tag, _ in panels)  # background not pooled
    for tag, panel in panels:
        stage = int(tag[-1])
        (h, w), reduction = grids[stage - 1], tb.SR_RATIOS[stage - 1]
        scale = 128 // h  # 64-px images: 8, 16, 32, 64, so every map is 128 px high
        assert panel.shape == (128, 2 * w * scale + tb.SEPARATOR_PX), tag
        assert panel.min() >= 0.0 and panel.max() <= 1.0
        assert (panel[:, w * scale:w * scale + tb.SEPARATOR_PX] == 1.0).all()
        key_h, key_w = max(h // reduction, 1), max(w // reduction, 1)
        block_h, block_w = 128 // key_h, w * scale // key_w
        assert block_h * key_h == 128 and block_w * key_w == w * scale  # whole blocks on these sizes
        for side in (panel[:, :w * scale], panel[:, w * scale + tb.SEPARATOR_PX:]):
            cells = side[::block_h, ::block_w]  # one value per key cell, repeated as a sharp block
            assert cells.shape == (key_h, key_w)
            np.testing.assert_array_equal(np.kron(cells, np.ones((block_h, block_w))), side)
            assert side.min() == 0.0 and side.max() == 1.0  # min-max normalised per map
    assert tb.upscale_factor(16, 16) == 8 and tb.upscale_factor(2, 3) == 64
    assert tb.upscale_factor(200, 300) == 1 and tb.upscale_factor(100, 500) == 2


def _legend_texts(figure):
    assert len(figure.legends) == 1
    return [text.get_text() for text in figure.legends[0].get_texts()]


def test_curves_figure(tmp_path):
    paths = []
    for name, offset in (("ft", 0.0), ("mib", 0.1)):
        path = tmp_path / f"{name}.csv"
        for step in range(3):
            n_seen = 16 + 2 * step
            append_results_row(path, step, [0.3 + offset] * n_seen, 21, n_seen, 0.3 + offset)
        paths.append(str(path))
    figure = visualize.curves_figure(paths, labels=["FT", "MiB"], n_base=16, n_classes=21)
    assert _legend_texts(figure) == ["FT", "MiB"]
    assert [line.get_label() for line in figure.axes[2].get_lines()] == ["FT", "MiB"]
    np.testing.assert_allclose(figure.axes[0].get_lines()[1].get_ydata(), [40.0, 40.0, 40.0])
    _assert_png(visualize.save_figure(figure, str(tmp_path / "curves.png")))
    with pytest.raises(ValueError, match="2 labels for 1"):
        visualize.curves_figure(paths[:1], labels=["a", "b"])


def test_curves_are_named_after_the_runs(tmp_path):
    results = tmp_path / "results"
    files = {}
    for stem, name in (("2024-01-01_voc_15-5_SATS-s1", "SATS-s1"), ("2024-01-02_voc_15-5_MiB", "MiB"),
                       ("2024-01-03_voc_15-5_FT", None), ("2024-01-04_voc_15-5_FT", None), ("mine", None)):
        path = results / f"{stem}.csv"
        for step in range(2):
            append_results_row(path, step, [0.5] * (16 + 5 * step), 21, 16 + 5 * step, 0.5)
            if name:  # run.py's companion JSON; the label is the run name stored there
                write_run_info(path, {"options": {"name": name if step else "old-name", "task": TASK}}, step=step)
        files[stem] = str(path)
    assert visualize.run_label(files["2024-01-01_voc_15-5_SATS-s1"]) == "SATS-s1"
    assert visualize.run_label(files["2024-01-03_voc_15-5_FT"], "voc", TASK) == "FT"
    assert visualize.run_label(files["2024-01-03_voc_15-5_FT"]) == "15-5_FT"
    assert visualize.run_label(files["mine"]) == "mine"
    figure = visualize.curves_figure(list(files.values()), n_base=16, dataset="voc", task=TASK)
    assert _legend_texts(figure) == ["SATS-s1", "MiB", "FT (2024-01-03_voc_15-5_FT.csv)",
                                     "FT (2024-01-04_voc_15-5_FT.csv)", "mine"]
    single = visualize.curves_figure([files["mine"]], n_base=16)
    assert _legend_texts(single) == ["mine"]  # a legend even for one line


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


@pytest.mark.parametrize("argv, message", [
    (["curves", "--csv", "run.csv", "--dataset", "voc", "--out", "o"], "--dataset and --task go together"),
    (["curves", "--csv", "run.csv", "--dataset", "voc", "--task", "15-7", "--out", "o"], "task '15-7'"),
    (["overlay", "--ckpt", "c.pth", "--indices", "0", "--out", "o", "--device", "gpu0"], "--device gpu0"),
])
def test_cli_argument_errors_print_usage_and_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        visualize.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: python -m utils.visualize") and message in err


def test_cli_user_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "bad.csv").write_text("step,0,1,mIoU\n0,0.5,abc,0.5\n")
    script = ("import sys\nfrom utils import visualize\n"
              "for argv in (['overlay', '--ckpt', 'garbage.pth', '--indices', '0', '--out', 'o', '--device', 'cpu'],"
              " ['curves', '--csv', 'bad.csv', '--out', 'o'], ['tsne', '--ckpt', 'none.pth', '--out', 'o', '--device', 'cpu']):\n"
              "    try:\n        visualize.main(argv)\n    except SystemExit as exit:\n"
              "        print('exit', exit.code, file=sys.stderr)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert "Traceback" not in done.stderr, done.stderr
    reports = done.stderr.split("exit 2\n")  # torch's own reason for the garbage file spans lines
    assert len(reports) == 4 and reports[3] == "", done.stderr
    assert reports[0].startswith("error: cannot load checkpoint garbage.pth: it is truncated or corrupt")
    assert reports[1] == "error: bad.csv, step 0: could not convert string to float: 'abc'\n"
    assert reports[2] == "error: checkpoint not found: none.pth\n"
