"""DKD: losses, prediction rule, init, optimiser groups, freezing, memory (utils/dkd.py) and its
network (modules/dkd_model.py, modules/aspp_tv.py). Expected values are computed by hand from the formulas
(float64) unless stated."""
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dataset.memory import MemoryEntry, select_exemplars
from modules.dkd_model import (BACKBONE_BN_MOMENTUM, DKDSegmentationModule, build_dkd_model, dkd_classifier_layout,
                       memory_labelling_model, torchvision_dilations)
from models import net_resnet50
from models.resnet import load_imagenet_state, torchvision_to_mib_names
from modules.aspp_tv import TorchvisionASPP
from modules.norm_act import make_norm_act
from utils.dkd import (EVIDENCE_KEYS, EVIDENCE_NEG, EVIDENCE_POS, DKDLoss, DKDWeights, aux_classifier_loss,
                       build_dkd_memory, decomposed_evidence, decomposed_kd, dkd_memory_pseudo_labels,
                       dkd_param_groups, dkd_prediction, dkd_total, init_new_classifier_from_aux, new_class_bce,
                       old_class_kd, select_dkd_memory)

ATOL = 1e-6


def softplus(x):
    return math.log1p(math.exp(x))


def deeplab_opts(**kw):
    opts = dict(model="deeplab", backbone="resnet50", norm_act="std", output_stride=16, no_pretrained=True)
    opts.update(kw)
    return SimpleNamespace(**opts)


def segformer_opts(head="mlp", **kw):
    return SimpleNamespace(model="segformer_b0", segformer_head=head, no_pretrained=True, **kw)


def is_bn(module):
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


# --------------------------------------------------------------------------------------------
# Loss terms: hand-computed values
# --------------------------------------------------------------------------------------------
def _mbce_case():
    """VOC 15-x step 1: old = aux + 15 classes, new = classes 16 and 17; 2x2 pixels."""
    logits = torch.randn(1, 18, 2, 2)
    logits[0, 16] = torch.tensor([[2.0, -1.0], [0.0, 1.0]])
    logits[0, 17] = torch.tensor([[-2.0, 0.0], [1.0, 3.0]])
    labels = torch.tensor([[[16, 0], [255, 17]]])
    return logits, labels


def test_new_class_bce_counts_void_as_negative():
    logits, labels = _mbce_case()
    assert new_class_bce(logits, labels, 16, pos_weight=2.0).item() == pytest.approx(1.20100954, abs=ATOL)
    assert new_class_bce(logits, labels, 16, pos_weight=1.0).item() == pytest.approx(1.15713070, abs=ATOL)
    # channel 16 alone (a model whose last class is 16; label 17 is then just another negative)
    assert new_class_bce(logits[:, :17], labels, 16, pos_weight=2.0).item() == pytest.approx(0.64338164, abs=ATOL)


def test_new_class_bce_ignore_void_variant():
    logits, labels = _mbce_case()
    value = new_class_bce(logits, labels, 16, pos_weight=2.0, ignore_void=True)
    assert value.item() == pytest.approx(0.62679313 + 0.30574996, abs=ATOL)
    all_void = torch.full_like(labels, 255)
    assert new_class_bce(logits, all_void, 16, ignore_void=True).item() == 0.0


def test_new_class_bce_reads_only_current_channels():
    logits, labels = _mbce_case()
    logits.requires_grad_(True)
    new_class_bce(logits, labels, 16, pos_weight=2.0).backward()
    assert torch.count_nonzero(logits.grad[:, :16]) == 0
    assert torch.count_nonzero(logits.grad[:, 16:]) == 8


def test_new_class_bce_step0_class_to_channel():
    # step 0: channel 0 is the auxiliary score, class c is channel c (slice channel c - 1)
    logits = torch.tensor([5.0, 0.3, -0.7]).view(1, 3, 1, 1)
    labels = torch.tensor([[[1]]])
    assert new_class_bce(logits, labels, 1).item() == pytest.approx(softplus(-0.3) + softplus(-0.7), abs=ATOL)
    labels = torch.tensor([[[2]]])
    assert new_class_bce(logits, labels, 1).item() == pytest.approx(softplus(0.3) + softplus(0.7), abs=ATOL)
    with pytest.raises(ValueError, match="first_new"):
        new_class_bce(logits, labels, 0)


def test_old_class_kd_excludes_aux_channel():
    new = torch.tensor([[7.0, 7.0], [1.0, -1.0], [0.5, 2.0], [3.0, -3.0]]).view(1, 4, 1, 2)  # aux, c1, c2, new c3
    old = torch.tensor([[-4.0, -4.0], [0.0, -2.0], [1.0, 1.0]]).view(1, 3, 1, 2)  # aux, c1, c2
    assert old_class_kd(new, old).item() == pytest.approx(1.25954242, abs=ATOL)
    new[0, 0], old[0, 0] = -9.0, 12.0
    new[0, 3] = 0.0
    assert old_class_kd(new, old).item() == pytest.approx(1.25954242, abs=ATOL)
    assert old_class_kd(new, old[:, :2]).item() == pytest.approx(0.62286315, abs=ATOL)  # class 1 only


def test_aux_classifier_loss():
    aux = torch.tensor([[0.0, 2.0], [-1.0, -3.0]]).view(1, 2, 2)
    assert aux_classifier_loss(aux).item() == pytest.approx(0.79548106, abs=ATOL)
    assert aux_classifier_loss(aux.unsqueeze(1)).item() == pytest.approx(0.79548106, abs=ATOL)


def test_decomposed_evidence_and_dkd_terms():
    x = torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    weight = torch.tensor([[0.5, -1.0, 2.0], [-0.5, 0.25, 1.0]], requires_grad=True)
    bias = torch.tensor([0.1, -0.2])
    pos, neg = decomposed_evidence(x, weight)
    assert pos.flatten().tolist() == pytest.approx([1.5, 1.0])
    assert neg.flatten().tolist() == pytest.approx([-2.0, -0.5])
    full = F.conv2d(x, weight.detach()[:, :, None, None], bias)
    assert (pos + neg + bias.view(1, 2, 1, 1)).flatten().tolist() == pytest.approx([-0.4, 0.3])
    assert full.flatten().tolist() == pytest.approx([-0.4, 0.3])

    x_old = torch.ones(1, 3, 1, 1)
    weight_old = torch.tensor([[0.4, -0.8, 2.0], [-0.5, 0.5, 1.0]])
    pos_old, neg_old = decomposed_evidence(x_old, weight_old[:, :, None, None])
    assert pos_old.flatten().tolist() == pytest.approx([2.4, 1.5])
    assert neg_old.flatten().tolist() == pytest.approx([-0.8, -0.5])
    assert decomposed_kd(pos, pos_old).item() == pytest.approx(0.82185953, abs=ATOL)
    assert decomposed_kd(neg, neg_old).item() == pytest.approx(1.40982637, abs=ATOL)
    # one old class: the new model's first channel only
    assert decomposed_kd(pos, pos_old[:, :1]).item() == pytest.approx(0.32617232, abs=ATOL)

    # pos reaches only positive weights, neg only negative ones (gradient of the sum = x there)
    pos.sum().backward()
    expected = torch.where(weight > 0, x.view(1, 3).expand(2, 3), torch.zeros(2, 3))
    assert torch.equal(weight.grad, expected)
    weight.grad = None
    _, neg = decomposed_evidence(x, weight)
    neg.sum().backward()
    assert torch.equal(weight.grad, torch.where(weight < 0, x.view(1, 3).expand(2, 3), torch.zeros(2, 3)))


def test_total_with_published_weights():
    raw = {"mbce": 1.15713070, "kd": 1.25954242, "dkd_pos": 0.82185953, "dkd_neg": 1.40982637, "ac": 0.79548106}
    raw = {k: torch.tensor(v, dtype=torch.float64) for k, v in raw.items()}
    assert dkd_total(raw).item() == pytest.approx(19.40875338, abs=ATOL)
    assert dkd_total({"mbce": raw["mbce"], "ac": raw["ac"]}).item() == pytest.approx(1.95261176, abs=ATOL)
    assert DKDWeights().items() == [("mbce", 1.0), ("kd", 5.0), ("dkd_pos", 5.0), ("dkd_neg", 5.0), ("ac", 1.0)]
    with pytest.raises(ValueError, match="unknown terms"):
        dkd_total({"ce": raw["mbce"]})


def test_dkd_loss_is_the_weighted_sum_of_the_terms():
    torch.manual_seed(3)
    logits = torch.randn(2, 6, 8, 8)  # aux, 3 old classes, 2 new (4, 5)
    old_logits = torch.randn(2, 4, 8, 8)
    labels = torch.randint(0, 6, (2, 8, 8))
    labels[0, 0] = 255
    extras = {EVIDENCE_POS: torch.rand(2, 5, 4, 4), EVIDENCE_NEG: -torch.rand(2, 5, 4, 4)}
    old_extras = {EVIDENCE_POS: torch.rand(2, 3, 4, 4), EVIDENCE_NEG: -torch.rand(2, 3, 4, 4)}
    loss = DKDLoss(first_new=4, weights=DKDWeights(kd=2.0), pos_weight=35.0)
    terms = loss.terms(logits, labels, extras, old_logits, old_extras)
    expected = {
        "mbce": new_class_bce(logits, labels, 4, 35.0),
        "kd": 2.0 * old_class_kd(logits, old_logits),
        "dkd_pos": 5.0 * decomposed_kd(extras[EVIDENCE_POS], old_extras[EVIDENCE_POS]),
        "dkd_neg": 5.0 * decomposed_kd(extras[EVIDENCE_NEG], old_extras[EVIDENCE_NEG]),
        "ac": aux_classifier_loss(logits[:, 0]),
    }
    assert list(terms) == list(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-6)
    total = loss(logits, labels, extras, old_logits, old_extras)
    assert total.item() == pytest.approx(sum(v.item() for v in expected.values()), rel=1e-6)
    assert loss.wants == frozenset(EVIDENCE_KEYS)

    step0 = DKDLoss(first_new=1)
    assert list(step0.terms(logits, labels)) == ["mbce", "ac"] and step0.wants == frozenset()
    assert list(DKDLoss(4, DKDWeights(dkd_pos=0, dkd_neg=0)).terms(logits, labels, None, old_logits)) == \
        ["mbce", "kd", "ac"]
    with pytest.raises(ValueError, match="old model's logits"):
        loss.terms(logits, labels, extras)
    with pytest.raises(ValueError, match="evidence_pos"):
        loss.terms(logits, labels, extras, old_logits, {})
    with pytest.raises(ValueError, match="5 channels, expected 4"):
        loss.terms(logits, labels, extras, torch.randn(2, 5, 8, 8), old_extras)


# --------------------------------------------------------------------------------------------
# Prediction rule and pseudo-labels
# --------------------------------------------------------------------------------------------
def _pixels(rows):
    """[pixel][channel] logits -> (1, C, 1, P)."""
    return torch.tensor(rows, dtype=torch.float32).T.reshape(1, len(rows[0]), 1, len(rows))


def test_prediction_rule():
    logits = _pixels([[5, -1, -0.5, -2], [-3, 0.2, 1.5, -1], [0, 0, 0, 0], [0, 1e-3, 0, 0]])
    assert dkd_prediction(logits).flatten().tolist() == [0, 2, 0, 1]


def test_prediction_rule_thresholds_fp32_sigmoids():
    # σ(3e-8) rounds to 0.5 in fp32 (not > 0.5: background); σ(18) = σ(25) = 1.0 (first class wins)
    logits = _pixels([[0, 3e-8, -1, -1], [0, 18, 25, -1], [0, -1, 17, 25]])
    assert dkd_prediction(logits).flatten().tolist() == [0, 1, 2]


def test_memory_pseudo_labels():
    # channels: aux, class 1, class 2, class 3
    logits = _pixels([[-5, 0, 3.0, -5],    # label 0, class 2 at σ = 0.9526 -> 2
                      [-5, 1.7, -5, -5],   # label 0, best σ = 0.8455 < 0.9 -> stays 0
                      [-5, 4, -5, -5],     # labelled 5: kept
                      [-5, 4, -5, -5],     # void: kept
                      [9, -5, -5, -5]])    # only the aux channel is high: stays 0
    labels = torch.tensor([[[0, 0, 5, 255, 0]]])
    assert dkd_memory_pseudo_labels(labels, logits).flatten().tolist() == [2, 0, 5, 255, 0]
    assert dkd_memory_pseudo_labels(labels, logits, threshold=0.8).flatten().tolist() == [2, 1, 5, 255, 0]


# --------------------------------------------------------------------------------------------
# Memory (DKD-M)
# --------------------------------------------------------------------------------------------
def _arranged(seed, candidates, class_order):
    """Inputs such that, after select_exemplars' seeded shuffles, the candidates are visited in the
    given order and the classes in ``class_order``."""
    rng = np.random.RandomState(seed)
    pool = list(range(len(candidates)))
    rng.shuffle(pool)
    positions = list(range(len(class_order)))
    rng.shuffle(positions)
    arranged = [None] * len(candidates)
    for visit, index in enumerate(pool):
        arranged[index] = candidates[visit]
    classes = [None] * len(class_order)
    for visit, position in enumerate(positions):
        classes[position] = class_order[visit]
    return arranged, classes


def test_memory_round_robin_published_case():
    seed = 7
    visits = [("A", (1, 2)), ("B", (2,)), ("C", (3,)), ("D", (1,)), ("E", (2, 3))]
    candidates, old_classes = _arranged(seed, visits, [2, 1, 3])
    sets = [c for _, c in candidates]
    chosen = select_dkd_memory(sets, old_classes, 4, seed)
    # class_2 = [A, B], class_1 = [D], class_3 = [C], stored grouped by old_classes as passed
    per_class = {2: ["A", "B"], 1: ["D"], 3: ["C"]}
    assert [candidates[i][0] for i in chosen] == [n for c in old_classes for n in per_class[c]]
    assert sorted(candidates[i][0] for i in chosen) == ["A", "B", "C", "D"]

    with pytest.warns(RuntimeWarning, match="only 5 of 6"):
        chosen = select_dkd_memory(sets, old_classes, 6, seed)
    assert sorted(candidates[i][0] for i in chosen) == ["A", "B", "C", "D", "E"]


def test_memory_selection_shares_the_round_robin():
    rng = np.random.RandomState(0)
    sets = [tuple(sorted(set(rng.randint(1, 6, size=rng.randint(1, 4)).tolist()))) for _ in range(40)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_dkd_memory(sets, [1, 2, 3, 4, 5], 12, 3) == select_exemplars(sets, [1, 2, 3, 4, 5], 12, 3)


class _Candidates(torch.utils.data.Dataset):
    """Images whose pixels are the logits a stand-in old model returns (aux + 3 classes)."""

    def __init__(self, logits, labels, names):
        self.logits, self.labels, self.file_names = logits, labels, names

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.logits[i], self.labels[i]


class _LogitsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x, {}


def test_build_dkd_memory_labels_candidates_with_the_old_model():
    low = torch.full((4, 1, 2), -6.0)
    logits = low.repeat(3, 1, 1, 1)
    logits[0, 2, 0, 0] = 3.0   # img0: class 2 at 0.95 on a background pixel -> class 2
    logits[1, 3, 0, 1] = 2.0   # img1: class 3 at 0.88 only -> nothing
    labels = torch.tensor([[[0, 0]], [[0, 0]], [[3, 0]]])  # img2 shows class 3 in its label
    dataset = _Candidates(logits, labels, ["img0", "img1", "img2"])
    previous = [MemoryEntry("mem0", (1,))]
    entries = build_dkd_memory(_LogitsModel(), dataset, step=2, mem_size=3, seed=0, device="cpu",
                               nb_old_classes=4, previous_memory=previous)
    assert [(e.name, e.classes) for e in entries] == [("img0", (2,)), ("img2", (3,)), ("mem0", (1,))]
    with pytest.raises(ValueError, match="trained step-1 model"):
        build_dkd_memory(None, dataset, step=2, mem_size=3, seed=0, device="cpu", nb_old_classes=4)
    with pytest.warns(RuntimeWarning, match="only 3 of 5"):
        build_dkd_memory(_LogitsModel(), dataset, step=2, mem_size=5, seed=0, device="cpu", nb_old_classes=4,
                         previous_memory=previous)


def test_memory_labelling_model_legacy_is_an_untrained_eval_model():
    opts = segformer_opts("sats")
    old = build_dkd_model(opts, [16])
    assert memory_labelling_model(old, opts, [16]) is old
    legacy = memory_labelling_model(old, opts, [16], legacy=True)
    assert legacy is not old and not legacy.training and legacy.classes == [1, 15]
    assert not torch.equal(legacy.cls[1].weight, old.cls[1].weight)


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------
def test_classifier_layout():
    assert dkd_classifier_layout([16, 1, 1]) == [1, 15, 1, 1]
    assert dkd_classifier_layout([151]) == [1, 150]
    for bad in ([1, 1], [], [16, 0]):
        with pytest.raises(ValueError):
            dkd_classifier_layout(bad)
    with pytest.raises(ValueError, match="auxiliary"):
        DKDSegmentationModule(nn.Identity(), nn.Identity(), 8, [16, 1])


def test_deeplab_shapes_voc_15_1_step2():
    model = build_dkd_model(deeplab_opts(backbone="resnet101"), [16, 1, 1]).eval()
    assert model.classes == [1, 15, 1, 1] and isinstance(model.head, TorchvisionASPP)
    with torch.no_grad():
        logits, extras = model(torch.randn(1, 3, 512, 512), wants=EVIDENCE_KEYS)
    assert logits.shape == (1, 18, 512, 512)
    assert extras[EVIDENCE_POS].shape == extras[EVIDENCE_NEG].shape == (1, 17, 32, 32)
    # the head ends in a ReLU: sign-pure evidence
    assert bool((extras[EVIDENCE_POS] >= 0).all()) and bool((extras[EVIDENCE_NEG] <= 0).all())
    bias = torch.cat([c.bias for c in model.cls[1:]]).view(1, -1, 1, 1)
    with torch.no_grad():
        small, _ = model(torch.randn(1, 3, 64, 64), wants=["sem_logits_small", *EVIDENCE_KEYS])
        _, ex = model(torch.randn(1, 3, 64, 64), ret_intermediate=True)
    assert set(ex) == {"body", "pre_logits", "attentions", "featuremaps", "sem_logits_small", *EVIDENCE_KEYS}
    # z_small = pos + neg + b on the class channels
    assert torch.allclose(ex["sem_logits_small"][:, 1:], ex[EVIDENCE_POS] + ex[EVIDENCE_NEG] + bias, atol=1e-4)


def test_old_deeplab_model_shapes():
    model = build_dkd_model(deeplab_opts(), [16, 1]).eval()
    with torch.no_grad():
        logits, extras = model(torch.randn(1, 3, 512, 512), wants=EVIDENCE_KEYS)
    assert logits.shape == (1, 17, 512, 512) and extras[EVIDENCE_POS].shape == (1, 16, 32, 32)


@pytest.mark.parametrize("head", ["mlp", "sats"])
def test_segformer_b0_shapes(head):
    model = build_dkd_model(segformer_opts(head), [16, 1, 1])
    logits, extras = model(torch.randn(2, 3, 64, 64), wants=[*EVIDENCE_KEYS, "attn_maps"])
    assert logits.shape == (2, 18, 64, 64)
    assert extras[EVIDENCE_POS].shape == extras[EVIDENCE_NEG].shape == (2, 17, 16, 16)
    assert len(extras["attn_maps"]) == 4
    if head == "mlp":  # BN + ReLU decoder output: sign-pure evidence
        assert bool((extras[EVIDENCE_POS] >= 0).all()) and bool((extras[EVIDENCE_NEG] <= 0).all())
    with pytest.raises(ValueError, match="unknown extra"):
        model(torch.randn(1, 3, 32, 32), wants=["pos_reg"])


def test_head_is_torchvision_aspp_plus_conv_block():
    from torchvision.models.segmentation.deeplabv3 import ASPP

    torch.manual_seed(1)
    reference = ASPP(64, [6, 12, 18], 32)
    head = TorchvisionASPP(64, 32, 32, output_stride=16)
    for module in list(reference.modules()) + list(head.modules()):
        if is_bn(module):  # non-trivial statistics and affine
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    missing, unexpected = head.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("last_conv.") for key in missing) and missing
    reference.eval()
    head.eval()
    x = torch.randn(2, 64, 9, 9)
    with torch.no_grad():
        assert torch.allclose(head(x), head.last_conv(reference(x)), atol=1e-5)
        assert bool((head(x) >= 0).all())
    assert head.project[-1].p == 0.1
    assert TorchvisionASPP(64, 32, 32, output_stride=8).rates == (12, 24, 36)


@pytest.mark.parametrize("output_stride,dilate", [(16, [False, False, True]), (8, [False, True, True])])
def test_backbone_is_torchvision_resnet(output_stride, dilate):
    from torchvision.models import resnet50

    torch.manual_seed(2)
    reference = resnet50(replace_stride_with_dilation=dilate).eval()
    for module in reference.modules():
        if is_bn(module):
            module.running_mean.uniform_(-0.1, 0.1)
            module.bias.data.uniform_(-0.1, 0.1)
    body = net_resnet50(norm_act=make_norm_act("std"), output_stride=output_stride)
    load_imagenet_state(body, torchvision_to_mib_names(reference.state_dict()), "torchvision")
    body.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))))))
        mib_style = body(x)[0]
        torchvision_dilations(body)
        out = body(x)[0]
    assert torch.allclose(out, expected, atol=1e-4)
    assert not torch.allclose(mib_style, expected, atol=1e-2)  # the dilation pattern matters


def test_norm_momentum_dropout_and_init():
    model = build_dkd_model(deeplab_opts(), [16, 2])
    backbone_bn = [m for m in model.body.modules() if is_bn(m)]
    head_bn = [m for m in model.head.modules() if is_bn(m)]
    assert backbone_bn and all(m.momentum == BACKBONE_BN_MOMENTUM for m in backbone_bn)
    assert head_bn and all(m.momentum == 0.1 for m in head_bn)
    assert [type(m).__name__ for m in model.head.project] == ["Conv2d", "BatchNorm2d", "ReLU", "Dropout"]
    # Kaiming-normal classifiers (std √(2/256)), default bias in ±1/16
    weights = torch.cat([c.weight.flatten() for c in model.cls])
    assert weights.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.1)
    assert all(bool((c.bias.abs() <= 1 / 16).all()) for c in model.cls)


def test_missing_pretrained_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "resnet101-63fe2227.pth"
    with pytest.raises(FileNotFoundError, match="resnet101-63fe2227.pth.*--no_pretrained"):
        build_dkd_model(deeplab_opts(no_pretrained=False, pretrained=str(path)), [16])


def test_aux_classifier_reads_detached_features():
    model = build_dkd_model(segformer_opts("sats"), [16, 1])
    logits, _ = model(torch.randn(2, 3, 64, 64))
    aux_classifier_loss(logits[:, 0]).backward()
    assert model.cls[0].weight.grad is not None and torch.count_nonzero(model.cls[0].weight.grad) > 0
    untouched = list(model.body.parameters()) + list(model.head.parameters()) + list(model.cls[1:].parameters())
    # the concatenation passes zeros to the class channels; nothing reaches the features
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in untouched)


def test_init_new_classifier_from_aux():
    opts = segformer_opts("sats")
    old = build_dkd_model(opts, [16])
    new = build_dkd_model(opts, [16, 3])
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    assert sorted(missing) == ["cls.2.bias", "cls.2.weight"] and not unexpected
    new.init_new_classifier()
    aux = old.cls[0]
    assert torch.equal(new.cls[2].weight, aux.weight.expand(3, -1, -1, -1))
    assert torch.equal(new.cls[2].bias, aux.bias.expand(3))
    for i in (0, 1):
        assert torch.equal(new.cls[i].weight, old.cls[i].weight) and torch.equal(new.cls[i].bias, old.cls[i].bias)
    with pytest.raises(RuntimeError, match="step > 0"):
        init_new_classifier_from_aux(old)


# --------------------------------------------------------------------------------------------
# Optimiser groups and freezing
# --------------------------------------------------------------------------------------------
def _ids(params):
    return {id(p) for p in params}


def _bn_ids(module):
    return {id(p) for m in module.modules() if is_bn(m) for p in m.parameters(recurse=False)}


def test_param_groups_incremental_step():
    model = build_dkd_model(deeplab_opts(), [16, 1, 1])
    groups = dkd_param_groups(model, lr=1e-4, weight_decay=1e-4, step=2)
    assert [g["name"] for g in groups] == ["backbone", "head", "old_classifiers", "new_classifier"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-3, 1e-3, 1e-3])
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0, 0.0, 1e-4]
    bn = _bn_ids(model)
    by_name = {g["name"]: _ids(g["params"]) for g in groups}
    assert not any(ids & bn for ids in by_name.values())
    assert by_name["backbone"] == _ids(model.body.parameters()) - bn
    assert by_name["head"] == _ids(model.head.parameters()) - bn
    assert by_name["old_classifiers"] == _ids(list(model.cls[0].parameters()) + list(model.cls[1].parameters())
                                              + list(model.cls[2].parameters()))
    assert by_name["new_classifier"] == _ids(model.cls[3].parameters())


def test_param_groups_step0_include_bn():
    model = build_dkd_model(deeplab_opts(), [16])
    groups = dkd_param_groups(model, lr=1e-3, weight_decay=1e-4, step=0)
    assert [g["name"] for g in groups] == ["backbone", "head", "classifiers"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-2, 1e-2])
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    assert set().union(*(_ids(g["params"]) for g in groups)) == _ids(model.parameters())
    assert _bn_ids(model) <= _ids(groups[0]["params"]) | _ids(groups[1]["params"])


def test_param_groups_segformer_keep_layernorm():
    model = build_dkd_model(segformer_opts("mlp"), [16, 1])
    groups = {g["name"]: _ids(g["params"]) for g in dkd_param_groups(model, 1e-4, 1e-4, step=1)}
    layer_norms = {id(p) for m in model.body.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    assert layer_norms and layer_norms <= groups["backbone"]
    assert not _bn_ids(model) & set().union(*groups.values())


def _step_models(opts, old_classes, classes):
    old = build_dkd_model(opts, old_classes)
    new = build_dkd_model(opts, classes)
    new.load_state_dict(old.state_dict(), strict=False)
    new.init_new_classifier()
    old.eval()
    new.freeze_bn_and_dropout()
    new.train()
    return old, new


def test_freezing_keeps_bn_and_dropout_through_an_iteration():
    torch.manual_seed(4)
    old, model = _step_models(deeplab_opts(), [16], [16, 2])
    model.train()  # a later train() keeps the freeze
    assert model.training and not any(m.training for m in model.modules() if is_bn(m))
    assert not model.head.project[-1].training
    bn_state = {k: v.clone() for k, v in model.state_dict().items()
                if any(k.startswith(n + ".") for n, m in model.named_modules() if is_bn(m))}
    conv_before = model.body.mod2.block1.convs.conv1.weight.detach().clone()
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 18, (2, 64, 64))
    loss = DKDLoss(first_new=16)
    with torch.no_grad():
        old_logits, old_extras = old(images, wants=loss.wants)
    logits, extras = model(images, wants=loss.wants)
    optimizer = torch.optim.SGD(dkd_param_groups(model, 0.01, 1e-4, step=1), lr=0.01, momentum=0.9, nesterov=True)
    loss(logits, labels, extras, old_logits, old_extras).backward()
    optimizer.step()
    state = model.state_dict()
    assert bn_state and all(torch.equal(state[k], v) for k, v in bn_state.items())
    assert not torch.equal(model.body.mod2.block1.convs.conv1.weight, conv_before)


def test_segformer_decoder_dropout2d_is_frozen():
    model = build_dkd_model(segformer_opts("mlp"), [16, 1])
    model.freeze_bn_and_dropout()
    model.train()
    assert isinstance(model.head.dropout, nn.Dropout2d) and not model.head.dropout.training
    assert not model.head.linear_fuse.bn.training
    assert not model.head.linear_fuse.bn.weight.requires_grad


def test_distillation_gradient_is_zero_at_the_start_of_a_step():
    torch.manual_seed(5)
    old, model = _step_models(deeplab_opts(), [16], [16, 2])
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 18, (2, 64, 64))
    loss = DKDLoss(first_new=16)
    with torch.no_grad():
        old_logits, old_extras = old(images, wants=loss.wants)
    logits, extras = model(images, wants=loss.wants)
    terms = loss.terms(logits, labels, extras, old_logits, old_extras)
    assert terms["kd"].item() > 0
    (terms["kd"] + terms["dkd_pos"] + terms["dkd_neg"]).backward(retain_graph=True)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and max(g.abs().max().item() for g in grads) < 1e-7

    model.zero_grad(set_to_none=True)
    terms["mbce"].backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.cls[:2].parameters())  # aux and old rows
    assert torch.count_nonzero(model.cls[2].weight.grad) > 0
    assert torch.count_nonzero(model.head.last_conv[0].weight.grad) > 0
