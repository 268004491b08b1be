"""IncrementalSegmentationModule: construction, forward extras, names, checkpoints, classifier inits."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules import SATSHead, SegFormerMLPHead
from segmentation_module import EXTRA_KEYS, INTERMEDIATE_KEYS, classifier_layout, main, make_model
from utils.checkpoint import load_checkpoint
from utils.weights import load_foreign_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # copied from shared/fixtures
MIT = json.loads((FIXTURES / "mit_official_state_dict_shapes.json").read_text())
DEEPLAB = json.loads((FIXTURES / "mib_deeplab_state_dict_shapes.json").read_text())


def opts(**kwargs):
    base = dict(model="segformer_b0", no_pretrained=True)
    base.update(kwargs)
    return SimpleNamespace(**base)


def deeplab_opts(**kwargs):
    base = dict(model="deeplab", backbone="resnet50", output_stride=16, norm_act="iabn_sync", pooling=32)
    base.update(kwargs)
    return opts(**base)


@pytest.fixture(scope="module")
def b0_model():
    torch.manual_seed(0)
    return make_model(opts(), [16, 2]).eval()


def without_counters(state):
    return {k: list(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_segformer_forward_shapes_and_extras(b0_model, size):
    x = torch.randn(2, 3, *size)
    h, w = size
    with torch.no_grad():
        logits, extras = b0_model(x)
        assert logits.shape == (2, 18, h, w) and extras == {}
        logits2, extras = b0_model(x, ret_intermediate=True, wants=["attn_maps"])
    assert torch.allclose(logits, logits2, atol=1e-5)
    assert set(extras) == set(EXTRA_KEYS)
    assert extras["body"].shape == (2, 256, h // 32, w // 32)
    assert extras["pre_logits"].shape == (2, 256, h // 4, w // 4)
    assert extras["sem_logits_small"].shape == (2, 18, h // 4, w // 4)
    assert [t.shape[1] for t in extras["attentions"]] == [32, 64, 160, 256, 256]
    assert extras["attentions"][-1] is extras["pre_logits"] and extras["attentions"][3] is extras["body"]
    assert [t.shape[1] for t in extras["featuremaps"]] == [32, 64, 160, 256]
    n1 = (h // 4) * (w // 4)
    assert [tuple(m.shape) for m in extras["attn_maps"]] == [
        (2, 1, n1, n1 // 64), (2, 2, n1 // 4, n1 // 64), (2, 5, n1 // 16, n1 // 64), (2, 8, n1 // 64, n1 // 64)]
    expected = F.interpolate(extras["sem_logits_small"], size=size, mode="bilinear", align_corners=False)
    assert torch.equal(logits2, expected)


def test_extras_are_only_what_was_asked(b0_model):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, extras = b0_model(x, wants=["body"])
        assert set(extras) == {"body"}
        _, extras = b0_model(x, ret_intermediate=True)
        assert set(extras) == set(INTERMEDIATE_KEYS)
        first = extras["attentions"]
        first.append("mutated by a caller")
        _, again = b0_model(x, ret_intermediate=True)
    assert len(again["attentions"]) == 5 and again["attentions"] is not first
    with pytest.raises(ValueError, match="attn_map'"):
        b0_model(x, wants=["attn_map"])


def test_logits_are_classifiers_in_step_order(b0_model):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, extras = b0_model(x, wants=["pre_logits", "sem_logits_small"])
        pre = extras["pre_logits"]
        expected = torch.cat([b0_model.cls[0](pre), b0_model.cls[1](pre)], dim=1)
    assert torch.allclose(extras["sem_logits_small"], expected, atol=1e-6)


def test_folded_classifiers_give_the_unfolded_logits_and_gradients():
    """The classifiers are folded into SATS's head, also when the head output is requested (POD):
    the logits and every gradient are those of classifying the head output."""
    torch.manual_seed(0)
    model = make_model(opts(), [16, 2, 3]).train()
    assert model._folds_classifier()
    x = torch.randn(2, 3, 64, 96)
    weights = torch.randn(2, 21, 64, 96)

    def unfolded(x):
        small = model._classify(model.head(model.body(x)))
        return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False), {}

    grads = []
    for forward in (lambda x: model(x), lambda x: model(x, wants=["pre_logits"]), unfolded):
        model.zero_grad()
        torch.manual_seed(1)  # the same drop-path draws
        logits, _ = forward(x)
        (logits * weights).sum().backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (want, g_want) = grads[-1]
    for got, g_got in grads[:-1]:
        assert torch.allclose(got, want, atol=1e-5)
        for name, grad in g_want.items():
            assert torch.allclose(g_got[name], grad, rtol=1e-3, atol=1e-4), name


def test_requested_head_output_is_the_plain_head_map():
    torch.manual_seed(0)
    model = make_model(opts(), [16, 5]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, extras = model(x, wants=["pre_logits", "attentions", "sem_logits_small"])
        stages = model.body(x)
        assert torch.equal(extras["pre_logits"], model.head(stages))
        assert extras["attentions"][-1] is extras["pre_logits"]
        assert torch.allclose(extras["sem_logits_small"], model._classify(extras["pre_logits"]), atol=1e-5)
        assert torch.equal(logits, model(x)[0])


# ----------------------------------------------------------------------- names
def sats_head_shapes(dims):
    shapes = {}
    for i, c in enumerate(dims):
        shapes[f"head.to_fused.{i}.0.weight"] = [256, c, 1, 1]
        shapes[f"head.to_fused.{i}.0.bias"] = [256]
    shapes["head.to_segmentation.weight"] = [256, 1024, 1, 1]
    shapes["head.to_segmentation.bias"] = [256]
    return shapes


def test_segformer_b2_state_dict_is_sats_layout():
    with torch.device("meta"):
        model = make_model(opts(model="segformer"), [16, 1])
    expected = {f"body.mit.{k}": v for k, v in MIT["mit_b2"]["state_dict"].items()}
    expected.update(sats_head_shapes((64, 128, 320, 512)))
    expected.update({"cls.0.weight": [16, 256, 1, 1], "cls.0.bias": [16], "cls.1.weight": [1, 256, 1, 1], "cls.1.bias": [1]})
    assert without_counters(model.state_dict()) == expected
    assert sum(p.numel() for p in model.head.parameters()) == 525_568


def test_mlp_head_official_names():
    with torch.device("meta"):
        model = make_model(opts(model="segformer_b2", segformer_head="mlp"), [21])
    head = {k: list(v.shape) for k, v in model.head.state_dict().items()}
    expected = {}
    for i, c in enumerate((64, 128, 320, 512)):
        expected[f"linear_c{i + 1}.proj.weight"] = [768, c]
        expected[f"linear_c{i + 1}.proj.bias"] = [768]
    expected["linear_fuse.conv.weight"] = [768, 3072, 1, 1]
    for name in ("weight", "bias", "running_mean", "running_var"):
        expected[f"linear_fuse.bn.{name}"] = [768]
    expected["linear_fuse.bn.num_batches_tracked"] = []
    assert head == expected
    assert model.cls[0].in_channels == 768
    assert isinstance(model.head.dropout, nn.Dropout2d) and model.head.dropout.p == 0.1


def test_mlp_head_computation():
    head = SegFormerMLPHead((4, 6), embed_dim=5).eval()
    feats = [torch.randn(1, 4, 8, 8), torch.randn(1, 6, 4, 4)]
    with torch.no_grad():
        c1 = torch.einsum("bchw,ec->behw", feats[0], head.linear_c1.proj.weight) + head.linear_c1.proj.bias[:, None, None]
        c2 = torch.einsum("bchw,ec->behw", feats[1], head.linear_c2.proj.weight) + head.linear_c2.proj.bias[:, None, None]
        c2 = F.interpolate(c2, size=(8, 8), mode="bilinear", align_corners=False)
        fuse = head.linear_fuse
        expected = torch.relu(fuse.bn(F.conv2d(torch.cat([c2, c1], 1), fuse.conv.weight)))
        assert torch.allclose(head(feats), expected, atol=1e-6)


def test_sats_head_equals_sats_upsample_by_powers_of_two():
    head = SATSHead((3, 5, 7, 9), channels=4).double()
    feats = [torch.randn(2, c, 16 // 2 ** i, 24 // 2 ** i, dtype=torch.float64, requires_grad=True)
             for i, c in enumerate((3, 5, 7, 9))]
    # SATS's order: upsample by 2**i, concatenate, fuse
    fused = [nn.Upsample(scale_factor=2 ** i)(head.to_fused[i][0](f)) for i, f in enumerate(feats)]
    expected = head.to_segmentation(torch.cat(fused, dim=1))
    assert torch.equal(head.forward_reference(feats), expected)
    # forward evaluates the same linear map per stage before upsampling: equal up to rounding,
    # gradients for every weight and input included
    out = head(feats)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    inputs = list(head.parameters()) + feats
    for got, want in zip(torch.autograd.grad(out.square().sum(), inputs),
                         torch.autograd.grad(expected.square().sum(), inputs)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="stage 1"):
        head([feats[0], torch.randn(2, 4, 8, 12), feats[2], feats[3]])


@pytest.mark.parametrize("channels, height, width, ratio", [
    (256, 64, 64, 2), (256, 64, 64, 4), (21, 16, 24, 8), (21, 24, 24, 4)])
def test_nearest_upsampled_add_has_the_broadcast_forms_bits(channels, height, width, ratio):
    """The head's CPU upsample-and-add: values and both gradients are the same bits as the plain
    broadcast form's (its backward sums blocks in the order of torch's reduction)."""
    from modules.segformer_head import _add_nearest_upsampled

    torch.manual_seed(ratio + channels)
    out = torch.randn(2, channels, height, width, requires_grad=True)
    x = torch.randn(2, channels, height // ratio, width // ratio, requires_grad=True)
    grad = torch.randn(2, channels, height, width)
    got = _add_nearest_upsampled(out, x, (height, width))
    blocks = out.view(2, channels, height // ratio, ratio, width // ratio, ratio)
    want = (blocks + x[:, :, :, None, :, None]).view_as(out)
    assert torch.equal(got, want)
    assert torch.equal(got, out + F.interpolate(x, size=(height, width), mode="nearest"))
    for g_got, g_want in zip(torch.autograd.grad(got, (out, x), grad), torch.autograd.grad(want, (out, x), grad)):
        assert torch.equal(g_got, g_want)
    x_half = x.detach().bfloat16().requires_grad_()
    half = _add_nearest_upsampled(out.detach().bfloat16(), x_half, (height, width))
    (g_half,) = torch.autograd.grad(half, x_half, grad.bfloat16())
    assert g_half.dtype == torch.bfloat16
    assert torch.allclose(g_half.float(), torch.autograd.grad(want, x, grad)[0], rtol=1e-2, atol=0.1)


@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_deeplab_forward_and_extras(size):
    torch.manual_seed(0)
    model = make_model(deeplab_opts(), [16, 1]).eval()
    h, w = size
    with torch.no_grad():
        logits, extras = model(torch.randn(1, 3, h, w), ret_intermediate=True)
    assert logits.shape == (1, 17, h, w)
    assert extras["body"].shape == (1, 2048, h // 16, w // 16)
    assert extras["pre_logits"].shape == (1, 256, h // 16, w // 16)
    assert [tuple(t.shape[1:]) for t in extras["attentions"]] == [
        (256, h // 4, w // 4), (512, h // 8, w // 8), (1024, h // 16, w // 16), (2048, h // 16, w // 16), (256, h // 16, w // 16)]
    assert len(extras["featuremaps"]) == 5 and extras["featuremaps"] is not extras["attentions"]
    assert extras["sem_logits_small"].shape == (1, 17, h // 16, w // 16)
    with pytest.raises(ValueError, match="only for SegFormer"):
        model(torch.randn(1, 3, h, w), wants=["attn_maps"])


def test_deeplab_state_dict_is_mib_layout():
    with torch.device("meta"):
        model = make_model(deeplab_opts(backbone="resnet101"), [15, 5])
    expected = {f"body.{k}": v for k, v in DEEPLAB["resnet101"]["state_dict"].items()}
    expected.update({f"head.{k}": v for k, v in DEEPLAB["deeplabv3_head"]["state_dict"].items()})
    expected.update({"cls.0.weight": [15, 256, 1, 1], "cls.0.bias": [15], "cls.1.weight": [5, 256, 1, 1], "cls.1.bias": [5]})
    assert without_counters(model.state_dict()) == expected


# ----------------------------------------------------------------- checkpoints
def test_sats_checkpoint_with_ddp_prefix_loads_strictly(tmp_path):
    torch.manual_seed(1)
    source = make_model(opts(), [16, 1]).eval()
    ckpt = {
        "epoch": 29,
        "model_state": {f"module.{k}": v for k, v in source.state_dict().items()},
        "optimizer_state": {},
        "best_score": 0.5,
    }
    torch.save(ckpt, tmp_path / "15-5-voc_SATS_1.pth")
    torch.manual_seed(2)
    target = make_model(opts(), [16, 1]).eval()
    load_foreign_checkpoint(target, load_checkpoint(tmp_path / "15-5-voc_SATS_1.pth"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source(x)[0], target(x)[0])


def test_foreign_checkpoint_mismatches_are_reported():
    torch.manual_seed(1)
    old = make_model(opts(), [16])
    new = make_model(opts(), [16, 1])
    with pytest.raises(RuntimeError, match=r"missing from the file \(2\):\s+cls\.1\.weight"):
        load_foreign_checkpoint(new, {"model_state": old.state_dict()})
    allowed = load_foreign_checkpoint(new, {"model_state": old.state_dict()}, allow_missing=("cls.1.",))
    assert allowed == ["cls.1.weight", "cls.1.bias"]
    assert torch.equal(new.cls[0].weight, old.cls[0].weight)
    with pytest.raises(RuntimeError, match=r"unexpected in the file \(2\):\s+cls\.1\.weight"):
        load_foreign_checkpoint(old, new.state_dict())
    mixed = {("module." + k if i else k): v for i, (k, v) in enumerate(old.state_dict().items())}
    with pytest.raises(ValueError, match="module."):
        load_foreign_checkpoint(old, mixed)


def test_deeplab_checkpoint_without_bn_counters_loads():
    """MiB/PLOP files (inplace_abn < 1.1) have no num_batches_tracked."""
    torch.manual_seed(0)
    source = make_model(deeplab_opts(), [16]).eval()
    state = {f"module.{k}": v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    target = make_model(deeplab_opts(), [16]).eval()
    load_foreign_checkpoint(target, {"model_state": state})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source(x)[0], target(x)[0])


def test_missing_pretrained_file_names_path_source_and_way_out(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        make_model(opts(model="segformer", no_pretrained=False, code_directory=str(tmp_path)), [16])
    message = str(info.value)
    assert str(tmp_path / "pretrained" / "mit_b2.pth") in message
    assert "NVlabs/SegFormer" in message and "--no_pretrained" in message and "--pretrained" in message
    with pytest.raises(FileNotFoundError) as info:
        make_model(deeplab_opts(no_pretrained=False, code_directory=str(tmp_path)), [16])
    assert str(tmp_path / "pretrained" / "resnet50_iabn_sync.pth.tar") in str(info.value)
    assert "MiB" in str(info.value) and "--no_pretrained" in str(info.value)


def test_pretrained_mit_is_loaded_from_given_path(tmp_path):
    torch.manual_seed(3)
    reference = make_model(opts(), [16])
    state = {k[len("body.mit."):]: v for k, v in reference.state_dict().items() if k.startswith("body.mit.")}
    state["head.weight"], state["head.bias"] = torch.zeros(1000, 256), torch.zeros(1000)
    torch.save(state, tmp_path / "mit_b0.pth")
    (tmp_path / "pretrained").mkdir()
    torch.save(state, tmp_path / "pretrained" / "mit_b0.pth")
    for options in (opts(no_pretrained=False, pretrained=str(tmp_path / "mit_b0.pth")),
                    opts(no_pretrained=False, code_directory=str(tmp_path))):
        torch.manual_seed(4)
        model = make_model(options, [16])
        assert all(torch.equal(v, reference.body.mit.state_dict()[k]) for k, v in model.body.mit.state_dict().items())


# ------------------------------------------------------------------- layouts
def test_classifier_layouts():
    assert classifier_layout([16, 1, 1]) == [16, 1, 1]
    assert classifier_layout([16, 1, 1], nb_background_modes=3) == [3, 15, 1, 1]
    assert classifier_layout([16, 1, 1], unknown=True) == [1, 1, 15, 1, 1]
    assert classifier_layout([16, 1, 1], base_weights=True) == [16]
    with pytest.raises(ValueError, match="positive"):
        classifier_layout([16, 0])
    model = make_model(opts(method="SSUL"), [16, 1])
    assert model.classes == [1, 1, 15, 1] and model.unknown
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32))[0].shape[1] == 18


def test_unknown_model_and_head_are_rejected():
    with pytest.raises(ValueError, match="segformer_b7"):
        make_model(opts(model="segformer_b7"), [16])
    with pytest.raises(ValueError, match="'all_mlp'"):
        make_model(opts(segformer_head="all_mlp"), [16])
    with pytest.raises(ValueError, match="resnet18"):
        make_model(deeplab_opts(backbone="resnet18"), [16])


# ------------------------------------------------------------ classifier inits
def test_balanced_init_splits_old_background_probability():
    """After init, softmax(bg) = softmax(new_c) = P_old(bg)/(n+1) and old classes keep their probability."""
    torch.manual_seed(5)
    old = make_model(opts(), [4]).eval()
    new = make_model(opts(), [4, 3]).eval()
    load_foreign_checkpoint(new, old.state_dict(), allow_missing=("cls.1.",))
    with torch.no_grad():
        old.cls[0].bias.copy_(torch.tensor([0.7, -0.2, 0.1, 0.3]))
        new.cls[0].bias.copy_(old.cls[0].bias)
        new.init_new_classifier()
        x = torch.randn(2, 3, 32, 32)
        p_old = old(x)[0].softmax(dim=1)
        p_new = new(x)[0].softmax(dim=1)
    assert new.cls[0].bias[0].item() == pytest.approx(0.7 - math.log(4))
    assert torch.allclose(new.cls[1].bias, torch.full((3,), 0.7 - math.log(4)))
    assert torch.equal(new.cls[1].weight, old.cls[0].weight[:1].expand(3, -1, -1, -1))
    for c in [0, 4, 5, 6]:
        assert torch.allclose(p_new[:, c], p_old[:, 0] / 4, atol=1e-6)
    assert torch.allclose(p_new[:, 1:4], p_old[:, 1:4], atol=1e-6)


def test_balanced_init_with_cosine_copies_weights_only():
    model = make_model(opts(cosine=True), [3, 2])
    assert "scalar" in model.state_dict() and model.cls[0].bias is None
    with torch.no_grad():
        model.init_new_classifier()
    assert torch.equal(model.cls[1].weight[1], model.cls[0].weight[0])


def test_cosine_classifier():
    model = make_model(opts(cosine=True), [3]).eval()
    with torch.no_grad():
        model.scalar.fill_(2.5)
        _, extras = model(torch.randn(1, 3, 64, 64), wants=["pre_logits", "sem_logits_small"])
        pre, small = extras["pre_logits"], extras["sem_logits_small"]
        w = model.cls[0].weight[:, :, 0, 0]
        cos = torch.einsum("bchw,kc->bkhw", pre / pre.norm(dim=1, keepdim=True), w / w.norm(dim=1, keepdim=True))
        assert torch.allclose(small, 2.5 * cos, atol=1e-5)
        model.cosine_legacy = True
        _, extras = model(torch.randn(1, 3, 64, 64), wants=["pre_logits", "sem_logits_small"])
        legacy = torch.einsum("bchw,kc->bkhw", extras["pre_logits"], w / w.norm(dim=1, keepdim=True))
        assert torch.allclose(extras["sem_logits_small"], legacy, atol=1e-4)


def test_unknown_init_copies_weight_and_bias():
    model = make_model(opts(method="SSUL"), [16, 2])
    with torch.no_grad():
        model.cls[0].bias.fill_(-1.25)
        model.init_unknown_classifier()
    assert torch.equal(model.cls[-1].weight, model.cls[0].weight.expand(2, -1, -1, -1))
    assert torch.equal(model.cls[-1].bias, torch.tensor([-1.25, -1.25]))
    with pytest.raises(RuntimeError, match="init_unknown_classifier"):
        model.init_new_classifier()
    with pytest.raises(RuntimeError, match="unknown channel"):
        make_model(opts(), [16, 2]).init_unknown_classifier()


def _set_rows(conv, norms):
    with torch.no_grad():
        conv.weight.zero_()
        for row, norm in enumerate(norms):
            conv.weight[row, row % 7, 0, 0] = norm


# Old-row mean norms: all (1+3+2+2)/4 = 2, old (3+2+2)/3 = 7/3, background 1; newest mean 6.
@pytest.mark.parametrize("on, gamma", [("all", 2 / 6), ("old", (7 / 3) / 6), ("background", 1 / 6)])
def test_align_weight(on, gamma):
    model = make_model(opts(), [2, 2, 2])
    _set_rows(model.cls[0], [1.0, 3.0])  # background 1, old class 3
    _set_rows(model.cls[1], [2.0, 2.0])  # intermediate step
    _set_rows(model.cls[2], [4.0, 8.0])  # newest: mean norm 6
    bias = model.cls[2].bias.clone()
    model.align_weight(on)
    assert model.cls[2].weight[:, :, 0, 0].norm(dim=1).tolist() == pytest.approx([4 * gamma, 8 * gamma])
    assert torch.equal(model.cls[2].bias, bias)


def test_multimodal_background():
    model = make_model(opts(nb_background_modes=2, multimodal_fusion="sum"), [4, 2]).eval()
    assert model.classes == [2, 3, 2]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits_small = model(x, wants=["sem_logits_small", "pre_logits"])[1]
        modes = model.cls[0](logits_small["pre_logits"])
        assert logits_small["sem_logits_small"].shape[1] == 6
        assert torch.allclose(logits_small["sem_logits_small"][:, 0], modes.sum(dim=1), atol=1e-6)
        assert model(x, only_bg=True)[0].shape[1] == 2
        model.cls[0].weight[1] = -model.cls[0].weight[0]  # opposite modes: both win somewhere
        model.cls[0].bias.copy_(torch.tensor([0.01, -0.01]))
        winner = model(x, only_bg=True)[0].argmax(dim=1)
        assert 0 < int(winner.sum()) < winner.numel()


# ----------------------------------------------------------------------- fix_bn
def test_fix_bn_survives_train():
    model = make_model(deeplab_opts(), [3])
    model.fix_bn()
    model.train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not m.training for m in norms)
    assert all(not p.requires_grad for m in norms for p in m.parameters(recurse=False))
    assert model.training and model.head.training and model.cls[0].weight.requires_grad
    running = norms[0].running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(norms[0].running_mean, running)


def test_profile_command_prints_a_row(capsys):
    main(["--profile", "--size", "32", "--repeats", "1", "--models", "segformer_b0"])
    out = capsys.readouterr().out
    # MiT-B0 3,319,392 + SATS head 256·512 + 256·4 + 256·1024 + 256 + classifier 256·21 + 21
    assert "segformer_b0" in out and "3,719,285" in out
