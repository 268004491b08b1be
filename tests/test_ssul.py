"""SSUL targets, pseudo-labels, evaluation fold, BCE and trainable parameters (utils/ssul.py)."""
import math

import pytest
import torch

from utils.ssul import (
    ssul_bce_loss,
    ssul_classes,
    ssul_fold_unknown,
    ssul_pseudo_label,
    ssul_targets,
    ssul_trainable_parameters,
)


def _logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p)).float()


def _pixels_to_logits(rows):
    """[pixel][channel] sigmoid scores -> (1, C, 1, P) logits."""
    return _logit(rows).T.reshape(1, len(rows[0]), 1, len(rows))


def test_classes_layout():
    assert ssul_classes([16, 1]) == [1, 1, 15, 1]
    assert ssul_classes([11, 1, 1]) == [1, 1, 10, 1, 1]
    with pytest.raises(ValueError):
        ssul_classes([1])


def test_targets_voc_marks_salient_background_unknown():
    labels = torch.tensor([[0, 0, 5, 255], [0, 3, 0, 0]])
    saliency = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 255]])
    targets = ssul_targets(labels, saliency, "voc")
    # +1 shift (bg -> 1, class k -> k+1, 255 kept), then bg & salient -> 0 (unknown)
    assert targets.tolist() == [[0, 1, 6, 255], [1, 4, 0, 0]]
    assert labels.tolist() == [[0, 0, 5, 255], [0, 3, 0, 0]]


def test_targets_ade_all_background_unknown():
    labels = torch.tensor([[0, 0, 5, 255], [0, 3, 0, 0]])
    assert ssul_targets(labels, None, "ade").tolist() == [[0, 0, 6, 255], [0, 4, 0, 0]]


def test_targets_errors():
    labels = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="saliency"):
        ssul_targets(labels, None, "voc")
    with pytest.raises(ValueError, match="voc and ade"):
        ssul_targets(labels, None, "cityscapes")


def test_pseudo_label_rule():
    # channels: unknown, bg, class 1, class 2
    scores = [
        [0.1, 0.2, 0.9, 0.3],   # unknown target, class 1 at 0.9 -> channel 2
        [0.1, 0.2, 0.3, 0.75],  # bg target, class 2 at 0.75 -> channel 3
        [0.1, 0.8, 0.3, 0.2],   # bg target, bg wins -> stays 1
        [0.1, 0.1, 0.95, 0.1],  # new-class target 4 -> kept
        [0.1, 0.1, 0.95, 0.1],  # ignore -> kept
        [0.1, 0.2, 0.65, 0.3],  # bg target, 0.65 < 0.7 -> stays 1
    ]
    targets = torch.tensor([[[0, 1, 1, 4, 255, 1]]])
    out = ssul_pseudo_label(targets, _pixels_to_logits(scores))
    assert out.tolist() == [[[2, 3, 1, 4, 255, 1]]]
    lower = ssul_pseudo_label(targets, _pixels_to_logits(scores), threshold=0.6)
    assert lower.tolist() == [[[2, 3, 1, 4, 255, 2]]]


def test_fold_unknown_into_background():
    scores = [[0.3, 0.4, 0.6, 0.2], [0.1, 0.4, 0.6, 0.2]]
    folded = ssul_fold_unknown(_pixels_to_logits(scores))
    assert folded.shape == (1, 3, 1, 2)
    expected = torch.tensor([[0.7, 0.6, 0.2], [0.5, 0.6, 0.2]]).T.reshape(1, 3, 1, 2)
    assert torch.allclose(folded, expected, atol=1e-6)
    # 0.3 + 0.4 beats class 1's 0.6 -> background; 0.1 + 0.4 does not -> class 1
    assert folded.argmax(1).tolist() == [[[0, 1]]]


def _softplus(x):
    return math.log1p(math.exp(x))


def test_bce_sums_channels_and_averages_valid_pixels():
    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.0, 3.0]]).reshape(1, 2, 1, 3)
    targets = torch.tensor([[[0, 255, 1]]])
    # pixel 0 (target 0): -log s(0) - log(1 - s(1)) = ln 2 + softplus(1)
    # pixel 2 (target 1): -log(1 - s(-1)) - log s(3) = softplus(-1) + softplus(-3)
    expected = ((math.log(2) + _softplus(1)) + (_softplus(-1) + _softplus(-3))) / 2
    assert expected == pytest.approx(1.1841289, abs=1e-6)
    assert ssul_bce_loss(logits, targets).item() == pytest.approx(expected, abs=1e-6)


def test_bce_all_ignored_and_bad_targets():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = ssul_bce_loss(logits, torch.full((1, 2, 2), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ssul_bce_loss(logits, torch.tensor([[[0, 3], [1, 255]]]))


class _TinyIncremental(torch.nn.Module):
    """Stand-in with the IncrementalSegmentationModule attributes the function uses."""

    def __init__(self, classes):
        super().__init__()
        self.classes = classes
        self.body = torch.nn.Conv2d(3, 4, 1)
        self.head = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4))
        self.cls = torch.nn.ModuleList([torch.nn.Conv2d(4, c, 1) for c in classes])


def test_trainable_parameters_groups_and_freezing():
    model = _TinyIncremental([1, 1, 15, 1])
    groups = ssul_trainable_parameters(model, lr=0.01)
    assert [g["name"] for g in groups] == ["ssul_new", "ssul_unknown", "ssul_background"]
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.01, 1e-6])
    assert groups[0]["params"][0] is model.cls[3].weight
    assert groups[1]["params"][0] is model.cls[0].weight
    assert groups[2]["params"][0] is model.cls[1].weight
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"cls.0.weight", "cls.0.bias", "cls.1.weight", "cls.1.bias", "cls.3.weight", "cls.3.bias"}
    torch.optim.SGD(groups, lr=0.01, momentum=0.9, nesterov=True)  # the groups are valid optimiser input


def test_trainable_parameters_rejects_wrong_layout():
    with pytest.raises(ValueError, match=r"\[1, 1, n0 - 1"):
        ssul_trainable_parameters(_TinyIncremental([16, 1]), lr=0.01)
