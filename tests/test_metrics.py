import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metrics import SUMMARY_KEYS, StreamSegMetrics, harmonic_mean, summarize_step, summary_labels

# One 2x3 image, 3 classes; 255 is ignored.
GT = [[0, 0, 1], [1, 255, 2]]
PRED = [[0, 1, 1], [1, 0, 0]]
# Pixel pairs (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,0)
CM = [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_confusion_matrix_and_scores_by_hand():
    metrics = StreamSegMetrics(3)
    metrics.update(torch.tensor([GT]), torch.tensor([PRED]))
    np.testing.assert_array_equal(metrics.confusion_matrix, CM)
    results = metrics.get_results()
    assert results["Total samples"] == 1
    assert results["Overall Acc"] == pytest.approx(3 / 5)
    # IoU_c = M_cc / (gt_c + pred_c - M_cc): gt = [2, 2, 1], pred = [2, 3, 0]
    iou = [1 / 3, 2 / 3, 0.0]
    assert [results["Class IoU"][c] for c in range(3)] == pytest.approx(iou, rel=1e-5)
    assert results["Mean IoU"] == pytest.approx(1 / 3, rel=1e-5)
    assert [results["Class Acc"][c] for c in range(3)] == pytest.approx([0.5, 1.0, 0.0], rel=1e-5)
    assert results["Mean Acc"] == pytest.approx(0.5, rel=1e-5)
    # FreqW = sum_c gt_c / total * IoU_c = 0.4/3 + 0.4*2/3 + 0
    assert results["FreqW Acc"] == pytest.approx(0.4, rel=1e-5)
    np.testing.assert_allclose(results["Confusion Matrix"],
                               [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_absent_classes_are_nan_and_left_out_of_means():
    metrics = StreamSegMetrics(5)
    # class 3 is only predicted (false positive), class 4 appears nowhere
    metrics.update(np.array([0, 0, 1, 2]).reshape(1, 2, 2), np.array([0, 3, 1, 2]).reshape(1, 2, 2))
    results = metrics.get_results()
    assert math.isnan(results["Class IoU"][3]) and math.isnan(results["Class IoU"][4])
    assert math.isnan(results["Class Acc"][3])
    # IoU_0 = 1 / (2 + 1 - 1) = 0.5; IoU_1 = IoU_2 = 1
    assert results["Class IoU"][0] == pytest.approx(0.5, rel=1e-5)
    assert results["Mean IoU"] == pytest.approx(2.5 / 3, rel=1e-5)
    assert results["Mean Acc"] == pytest.approx((0.5 + 1 + 1) / 3, rel=1e-5)


def test_valid_cls_restricts_means_without_touching_the_callers_list():
    metrics = StreamSegMetrics(3)
    metrics.update(torch.tensor([GT]), torch.tensor([PRED]))
    valid = [2]
    results = metrics.get_results(valid_cls=valid)
    assert valid == [2]
    assert math.isnan(results["Class IoU"][1])
    assert results["Mean IoU"] == pytest.approx((1 / 3 + 0.0) / 2, rel=1e-5)


def test_batches_accumulate_and_reset_clears():
    metrics = StreamSegMetrics(3)
    gt = torch.tensor([GT, GT])
    pred = torch.tensor([PRED, PRED])
    metrics.update(gt, pred)
    metrics.update(np.array(GT), np.array(PRED))  # a single (H, W) image
    np.testing.assert_array_equal(metrics.confusion_matrix, 3 * np.array(CM))
    assert metrics.get_results()["Total samples"] == 3
    metrics.reset()
    results = metrics.get_results()
    assert results["Total samples"] == 0
    assert math.isnan(results["Mean IoU"]) and math.isnan(results["Overall Acc"])
    assert all(math.isnan(v) for v in results["Class IoU"].values())


def test_ground_truth_beyond_n_classes_is_ignored():
    metrics = StreamSegMetrics(2)
    metrics.update(torch.tensor([[0, 1, 2, 255]]), torch.tensor([[0, 1, 1, 0]]))
    np.testing.assert_array_equal(metrics.confusion_matrix, [[1, 0], [0, 1]])


def test_bad_inputs_raise():
    metrics = StreamSegMetrics(3)
    with pytest.raises(ValueError, match="predictions must lie in"):
        metrics.update(torch.tensor([GT]), torch.tensor([[[0, 1, 3], [1, 0, 0]]]))
    with pytest.raises(ValueError, match="shape"):
        metrics.update(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        metrics.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="n_classes"):
        StreamSegMetrics(0)


def test_to_str_lists_scalars_and_classes():
    metrics = StreamSegMetrics(3)
    metrics.update(torch.tensor([GT]), torch.tensor([PRED]))
    text = metrics.to_str(metrics.get_results())
    assert "Overall Acc: 0.600000" in text
    assert "Mean IoU: 0.333333" in text
    assert "\tclass 2: 0.0" in text
    assert "Confusion Matrix" not in text


def test_summarize_step_counts_background_among_base_classes():
    # 15-5 style: classes 0..15 base, 16..20 new
    class_iou = {c: 0.8 for c in range(16)}
    class_iou.update({c: 0.5 for c in range(16, 21)})
    class_iou[20] = float("nan")
    summary = summarize_step(class_iou, n_base=16, n_seen=21)
    assert summary["base"] == pytest.approx(0.8)
    assert summary["new"] == pytest.approx(0.5)
    assert summary["all"] == pytest.approx((16 * 0.8 + 4 * 0.5) / 20)
    step0 = summarize_step([0.5, "X", 0.7], n_base=3, n_seen=3)
    assert step0["base"] == pytest.approx(0.6) and math.isnan(step0["new"])
    assert summary_labels(16, 21) == ["0-15", "16-20", "all"]
    assert summary_labels(20, 21) == ["0-19", "20", "all"]
    with pytest.raises(ValueError):
        summarize_step(class_iou, n_base=22, n_seen=21)


def test_hiou_is_the_harmonic_mean_of_base_and_new():
    # base = (0.9+0.6+0.3)/3 = 0.6, new = (0.4+0.2)/2 = 0.3, hIoU = 2·0.6·0.3/0.9 = 0.4
    summary = summarize_step([0.9, 0.6, 0.3, 0.4, 0.2], n_base=3, n_seen=5, hiou=True)
    assert summary["base"] == pytest.approx(0.6) and summary["new"] == pytest.approx(0.3)
    assert summary["all"] == pytest.approx(0.48)
    assert summary["hIoU"] == pytest.approx(0.4)
    assert list(summary) == ["base", "new", "all", "hIoU"]
    # the default keys and values do not move
    assert summarize_step([0.9, 0.6, 0.3, 0.4, 0.2], 3, 5) == {k: summary[k] for k in ("base", "new", "all")}


def test_hiou_on_dkd_worked_example():
    # 4 classes, old = {0, 1}, new = {2, 3}; IoU 50.0000125, 66.6666889, 50.000025, 0 (in %)
    summary = summarize_step([0.500000125, 0.666666889, 0.50000025, 0.0], n_base=2, n_seen=4, hiou=True)
    assert 100 * summary["base"] == pytest.approx(58.3333507, abs=1e-6)
    assert 100 * summary["new"] == pytest.approx(25.0000125, abs=1e-6)
    assert 100 * summary["hIoU"] == pytest.approx(35.0000154, abs=1e-6)


def test_hiou_is_undefined_without_new_classes_and_zero_when_both_are():
    step0 = summarize_step([0.5, 0.7], n_base=2, n_seen=2, hiou=True, old_without_background=True)
    assert math.isnan(step0["new"]) and math.isnan(step0["hIoU"]) and math.isnan(step0["hIoU_fg"])
    assert step0["base_fg"] == pytest.approx(0.7)
    absent_new = summarize_step([0.5, 0.7, "X"], n_base=2, n_seen=3, hiou=True)
    assert math.isnan(absent_new["hIoU"])
    assert summarize_step([0.0, 0.0, 0.0], n_base=2, n_seen=3, hiou=True)["hIoU"] == 0.0
    assert harmonic_mean(0.6, 0.0) == 0.0 and math.isnan(harmonic_mean(math.nan, 0.5))


def test_old_without_background():
    # base_fg = (0.6+0.3)/2 = 0.45, hIoU_fg = 2·0.45·0.3/0.75 = 0.36; background 0.9 left out
    summary = summarize_step([0.9, 0.6, 0.3, 0.4, 0.2], n_base=3, n_seen=5, old_without_background=True)
    assert list(summary) == ["base", "new", "all", "base_fg", "hIoU_fg"]
    assert summary["base_fg"] == pytest.approx(0.45)
    assert summary["hIoU_fg"] == pytest.approx(0.36)
    assert summary["base"] == pytest.approx(0.6)
    assert summary_labels(16, 21, hiou=True, old_without_background=True) == [
        "0-15", "16-20", "all", "hIoU", "1-15", "hIoU 1-15"]
    assert summary_labels(2, 3, old_without_background=True) == ["0-1", "2", "all", "1", "hIoU 1"]
    assert list(SUMMARY_KEYS) == ["base", "new", "all", "hIoU", "base_fg", "hIoU_fg"]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _synch_worker(rank, port, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        metrics = StreamSegMetrics(3)
        if rank == 0:
            metrics.update(torch.tensor([GT]), torch.tensor([PRED]))
        else:
            metrics.update(torch.tensor([GT, GT]), torch.tensor([GT, GT]))  # perfect predictions
        metrics.synch(torch.device("cpu"))
        try:
            metrics.synch(torch.device("cpu"))
            twice = "no error"
        except RuntimeError:
            twice = "error"
        queue.put((rank, metrics.confusion_matrix.tolist(), metrics.total_samples, twice))
    finally:
        dist.destroy_process_group()


def test_synch_all_reduces_over_two_gloo_processes():
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_synch_worker, args=(_free_port(), queue), nprocs=2, start_method="spawn")
    outputs = sorted(queue.get() for _ in range(2))
    # rank 1 adds twice the perfect diagonal: gt counts per image [2, 2, 1]
    expected = (np.array(CM) + np.diag([4, 4, 2])).tolist()
    for rank, matrix, samples, twice in outputs:
        assert matrix == expected
        assert samples == 3
        assert twice == "error"


def test_synch_without_process_group_is_a_no_op():
    metrics = StreamSegMetrics(3)
    metrics.update(torch.tensor([GT]), torch.tensor([PRED]))
    metrics.synch(torch.device("cpu"))
    np.testing.assert_array_equal(metrics.confusion_matrix, CM)
