"""DeepLab side of the models: ABN layers, MiB's ResNet body, the ASPP head, ImageNet loading."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from models.resnet import ResNet, load_imagenet_state, load_resnet_imagenet, net_resnet50, net_resnet101, torchvision_to_mib_names
from modules.deeplab import DeeplabV3, image_pool
from modules.norm_act import ABN, SyncABN, make_norm_act

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "mib_deeplab_state_dict_shapes.json"  # copied from shared/fixtures
EPS = 1e-5


def fixture():
    """MiB's official parameter names and shapes."""
    return json.loads(FIXTURE.read_text())


def shapes_without_counter(module):
    return {k: list(v.shape) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


def randomize_norms(model, seed=0):
    """Non-trivial BN parameters and statistics (a third of the scales negative)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_((torch.rand(n, generator=gen) * 2.0 - 0.7))
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def one_channel(norm_act, weight, bias, mean=0.0, var=1.0, **kwargs):
    layer = make_norm_act(norm_act)(1, **kwargs)
    with torch.no_grad():
        layer.weight.fill_(weight)
        layer.bias.fill_(bias)
        layer.running_mean.fill_(mean)
        layer.running_var.fill_(var)
    return layer


# ---------------------------------------------------------------------------------------------
# Norm + activation semantics on hand-computed numbers


@pytest.mark.parametrize(
    "norm_act, weight, expected",
    [
        # x_hat = (2.5 - 0.5) / sqrt((1 - eps) + eps) = 2, bias 0.5
        ("iabn", -3.0, 2 * (3 + EPS) + 0.5),  # |w| + eps = 3.00001 -> 6.50002
        ("iabn_sync", -3.0, 2 * (3 + EPS) + 0.5),
        ("abn", -3.0, 0.01 * (2 * -3 + 0.5)),  # leaky_relu(-5.5) = -0.055
        ("std", -3.0, 0.0),  # relu(-5.5)
        ("iabn", 0.0, 2 * EPS + 0.5),  # the scale never drops below eps: 0.50002
        ("abn", 0.0, 0.5),
    ],
)
def test_eval_scale_and_activation_on_one_channel(norm_act, weight, expected):
    layer = one_channel(norm_act, weight, bias=0.5, mean=0.5, var=1 - EPS).eval()
    y = layer(torch.full((1, 1, 1, 1), 2.5))
    assert y.item() == pytest.approx(expected, abs=2e-7)


def test_training_statistics_and_abs_weight_gradient():
    # x = [1, 3]: batch mean 2, biased variance 1 -> x_hat = -+1/sqrt(1 + eps); unbiased variance 2.
    x_hat = 1 / math.sqrt(1 + EPS)
    layer = one_channel("iabn", weight=-2.0, bias=0.5, activation="identity").train()
    y = layer(torch.tensor([1.0, 3.0]).view(2, 1, 1, 1))
    assert y.flatten().tolist() == pytest.approx([-(2 + EPS) * x_hat + 0.5, (2 + EPS) * x_hat + 0.5], abs=1e-6)
    assert layer.running_mean.item() == pytest.approx(0.9 * 0 + 0.1 * 2)
    assert layer.running_var.item() == pytest.approx(0.9 * 1 + 0.1 * 2)
    # d|w|/dw = sign(w): with loss sum(y * [1, 2]) dL/dw = sign(w) * (-x_hat + 2 x_hat).
    (y.flatten() * torch.tensor([1.0, 2.0])).sum().backward()
    assert layer.weight.grad.item() == pytest.approx(-x_hat, abs=1e-6)
    # inplace_abn takes the derivative of |w| as +1 at w == 0 (torch.abs would give 0).
    at_zero = one_channel("iabn", weight=0.0, bias=0.0, activation="identity").train()
    (at_zero(torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)).flatten() * torch.tensor([1.0, 2.0])).sum().backward()
    assert at_zero.weight.grad.item() == pytest.approx(x_hat, abs=1e-6)
    # the leaky ReLU of the default activation: -1.5 -> -0.015
    leaky = one_channel("iabn", weight=-2.0, bias=0.5).train()
    assert leaky(torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)).flatten().tolist() == pytest.approx(
        [0.01 * (-(2 + EPS) * x_hat + 0.5), (2 + EPS) * x_hat + 0.5], abs=1e-6
    )


def test_factory_defaults_and_errors():
    assert make_norm_act("std")(4).activation == "relu"
    for name in ("abn", "iabn", "iabn_sync", "iabn_sync_test"):
        layer = make_norm_act(name)(4)
        assert (layer.activation, layer.activation_param) == ("leaky_relu", 0.01)
        assert layer.abs_weight == (name != "abn")
        assert type(layer) is ABN
    assert make_norm_act("iabn", activation="relu")(4).activation == "relu"
    assert make_norm_act("iabn")(4, activation="identity").activation == "identity"
    assert type(make_norm_act("iabn_sync", world_size=2)(4)) is SyncABN
    assert type(make_norm_act("iabn", world_size=2)(4)) is ABN
    with pytest.raises(ValueError, match="unknown norm_act 'inplace'"):
        make_norm_act("inplace")
    with pytest.raises(ValueError, match="unknown activation 'elu'"):
        make_norm_act("abn")(4, activation="elu")
    with pytest.raises(ValueError, match="world_size"):
        make_norm_act("abn", world_size=0)
    with pytest.raises(ValueError, match=r"expects \(N, 4, H, W\)"):
        make_norm_act("abn")(4)(torch.zeros(2, 3, 2, 2))


def test_num_batches_tracked_may_be_absent_or_present():
    layer = make_norm_act("iabn")(3)
    inplace_abn_era = {"weight": torch.ones(3) * 2, "bias": torch.zeros(3), "running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    layer.load_state_dict(inplace_abn_era, strict=True)
    assert layer.weight.tolist() == [2.0, 2.0, 2.0] and layer.num_batches_tracked.item() == 0
    layer.load_state_dict(dict(inplace_abn_era, num_batches_tracked=torch.tensor(7)), strict=True)
    assert layer.num_batches_tracked.item() == 7


def test_sync_abn_without_process_group_is_a_clear_error():
    layer = make_norm_act("iabn_sync", world_size=2)(2).train()
    with pytest.raises(RuntimeError, match="not initialised"):
        layer(torch.randn(2, 2, 3, 3))
    layer.eval()
    assert layer(torch.randn(2, 2, 3, 3)).shape == (2, 2, 3, 3)


def _sync_worker(rank, world_size, workdir):
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world_size)
    try:
        data = torch.load(Path(workdir) / "data.pt", weights_only=True)
        layer = make_norm_act("iabn_sync", world_size=world_size)(3).train()
        layer.load_state_dict(data["state"])
        x = data["inputs"][rank].clone().requires_grad_(True)
        y = layer(x)
        (y * data["upstream"][rank]).sum().backward()
        torch.save(
            {"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad, "db": layer.bias.grad,
             "running_mean": layer.running_mean, "running_var": layer.running_var},
            Path(workdir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_sync_abn_equals_one_process_on_the_whole_batch(tmp_path):
    # Two processes with unequal batches (2 and 3 images of different sizes would not concatenate, so equal H, W).
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, 3, 4, 5, generator=gen) * 2 + 1, torch.randn(3, 3, 4, 5, generator=gen) - 0.5]
    upstream = [torch.randn(2, 3, 4, 5, generator=gen), torch.randn(3, 3, 4, 5, generator=gen)]
    reference = make_norm_act("iabn")(3).train()
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([-1.5, 0.0, 0.7]))
        reference.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    torch.save({"state": reference.state_dict(), "inputs": inputs, "upstream": upstream}, tmp_path / "data.pt")
    mp.spawn(_sync_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    x = torch.cat(inputs).requires_grad_(True)
    y = reference(x)
    (y * torch.cat(upstream)).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ranks[0]["dw"] + ranks[1]["dw"], reference.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ranks[0]["db"] + ranks[1]["db"], reference.bias.grad, rtol=1e-4, atol=1e-5)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], reference.running_mean)
        torch.testing.assert_close(r["running_var"], reference.running_var)


# ---------------------------------------------------------------------------------------------
# Structure: names, shapes, counts, strides


@pytest.mark.parametrize("name, builder", [("resnet50", net_resnet50), ("resnet101", net_resnet101)])
def test_body_state_dict_equals_mib_fixture(name, builder):
    expected = fixture()[name]
    with torch.device("meta"):
        body = builder(norm_act=make_norm_act("iabn_sync"), output_stride=16)
    assert list(shapes_without_counter(body).items()) == list(expected["state_dict"].items())
    assert sum(p.numel() for p in body.parameters()) == expected["num_params"]
    assert body.out_channels == 2048
    extra = set(body.state_dict()) - set(expected["state_dict"])
    assert extra and all(k.endswith("num_batches_tracked") for k in extra)


def test_head_state_dict_equals_mib_fixture():
    expected = fixture()["deeplabv3_head"]
    with torch.device("meta"):
        head = DeeplabV3(2048, 256, 256, out_stride=16, norm_act=make_norm_act("iabn_sync"), pooling_size=32)
    assert list(shapes_without_counter(head).items()) == list(expected["state_dict"].items())
    assert sum(p.numel() for p in head.parameters()) == expected["num_params"]


@pytest.mark.parametrize(
    "output_stride, strided, dilations",
    [(16, {"mod3", "mod4"}, {"mod2": 1, "mod3": 1, "mod4": 1, "mod5": 2}),
     (8, {"mod3"}, {"mod2": 1, "mod3": 1, "mod4": 2, "mod5": 4})],
)
def test_block_strides_and_dilations(output_stride, strided, dilations):
    with torch.device("meta"):
        body = net_resnet101(norm_act=make_norm_act("iabn"), output_stride=output_stride)
    for mod_name in ("mod2", "mod3", "mod4", "mod5"):
        for block_name, block in getattr(body, mod_name).named_children():
            stride = 2 if (block_name == "block1" and mod_name in strided) else 1
            assert block.convs.conv2.stride == (stride, stride), (mod_name, block_name)
            assert block.convs.conv2.dilation == (dilations[mod_name],) * 2, (mod_name, block_name)
            assert block.convs.conv2.padding == (dilations[mod_name],) * 2
            assert (block.proj_conv is not None) == (block_name == "block1")
            assert block.convs.bn3.activation == "identity" and block.convs.bn1.activation == "leaky_relu"
            if block.proj_bn is not None:
                assert block.proj_bn.activation == "identity" and block.proj_conv.stride == (stride, stride)


def test_head_rates():
    with torch.device("meta"):
        for out_stride, rates in ((16, (6, 12, 18)), (8, (12, 24, 32))):
            head = DeeplabV3(out_stride=out_stride, norm_act=make_norm_act("abn"))
            assert [c.dilation[0] for c in head.map_convs[1:]] == list(rates)
            assert [c.padding[0] for c in head.map_convs[1:]] == list(rates)
            assert head.map_convs[0].kernel_size == (1, 1)


def test_construction_errors():
    with pytest.raises(ValueError, match="output_stride must be 8 or 16, got 32"):
        net_resnet50(output_stride=32)
    with pytest.raises(ValueError, match="out_stride must be 8 or 16"):
        DeeplabV3(out_stride=4)
    with pytest.raises(TypeError, match="use make_norm_act"):
        net_resnet50(norm_act=nn.BatchNorm2d)
    with pytest.raises(ValueError, match="pooling_size"):
        DeeplabV3(pooling_size=(3, 4, 5))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        net_resnet50()(torch.zeros(1, 1, 32, 32))


# ---------------------------------------------------------------------------------------------
# Forward


@pytest.fixture(scope="module", params=[16, 8], ids=["os16", "os8"])
def deeplab(request):
    """(output_stride, ResNet-50 body, head) in eval mode, built once per output stride."""
    norm_act = make_norm_act("iabn_sync")
    body = net_resnet50(norm_act=norm_act, output_stride=request.param).eval()
    head = DeeplabV3(out_stride=request.param, norm_act=norm_act, pooling_size=32).eval()
    return request.param, body, head


@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_forward_sizes(deeplab, size):
    output_stride, body, head = deeplab
    h, w = size
    with torch.no_grad():
        x_b, sums = body(torch.randn(2, 3, h, w))
        out = head(x_b)
    low = (h // output_stride, w // output_stride)
    assert x_b.shape == (2, 2048) + low
    assert out.shape == (2, 256) + low
    mod3 = (h // 8, w // 8)
    assert [tuple(s.shape) for s in sums] == [
        (2, 256, h // 4, w // 4), (2, 512) + mod3, (2, 1024) + (mod3 if output_stride == 8 else low), (2, 2048) + low
    ]
    # sums are pre-activation (they take negative values), x_b is their leaky ReLU
    assert (sums[-1] < 0).any()
    torch.testing.assert_close(x_b, torch.nn.functional.leaky_relu(sums[-1], 0.01))


def test_keep_outputs_returns_every_module_output():
    body = ResNet((2, 1, 1, 2), norm_act=make_norm_act("abn"), keep_outputs=True).eval()
    with torch.no_grad():
        outputs, sums = body(torch.randn(1, 3, 64, 64))
    assert [o.shape[1:] for o in outputs] == [(64, 16, 16), (256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 4, 4)]
    for out, s in zip(outputs[1:], sums):
        torch.testing.assert_close(out, torch.nn.functional.leaky_relu(s, 0.01))


def test_block_backward_keeps_the_distilled_sums_intact():
    body = ResNet((2, 1, 1, 2), norm_act=make_norm_act("iabn")).train()
    x_b, sums = body(torch.randn(2, 3, 32, 32))
    before = [s.detach().clone() for s in sums]
    (x_b.sum() + sum(s.pow(2).mean() for s in sums)).backward()
    for s, b in zip(sums, before):
        assert torch.equal(s.detach(), b)
    assert body.mod1.conv1.weight.grad is not None


def test_image_pool_hand_computed():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # 2x2 windows, stride 1: 3x3 averages, padded by (0 before, 1 after) per axis (even kernel)
    expected = torch.tensor(
        [[2.5, 3.5, 4.5, 4.5], [6.5, 7.5, 8.5, 8.5], [10.5, 11.5, 12.5, 12.5], [10.5, 11.5, 12.5, 12.5]]
    )
    assert torch.equal(image_pool(x, 2, global_mean=False)[0, 0], expected)
    # 3x3 windows (odd): 2x2 averages [[5, 6], [9, 10]] padded by 1 before and 1 after
    odd = image_pool(x, 3, global_mean=False)[0, 0]
    assert torch.equal(odd, torch.tensor([[5.0, 5, 6, 6], [5, 5, 6, 6], [9, 9, 10, 10], [9, 9, 10, 10]]))
    # window larger than the map, or training: the global mean 7.5
    assert torch.equal(image_pool(x, 32, global_mean=False), torch.full((1, 1, 4, 4), 7.5))
    assert torch.equal(image_pool(x, 2, global_mean=True), torch.full((1, 1, 1, 1), 7.5))
    assert torch.equal(image_pool(x, None, global_mean=False), torch.full((1, 1, 1, 1), 7.5))
    # rectangular window (h, w) = (1, 4) on a 4x4 map: row means, no padding needed vertically
    assert torch.equal(image_pool(x, (1, 4), global_mean=False)[0, 0], torch.tensor([1.5, 5.5, 9.5, 13.5]).view(4, 1).expand(4, 4))


def test_head_pooling_in_training_and_eval():
    torch.manual_seed(0)
    norm_act = make_norm_act("iabn")
    windowed = DeeplabV3(in_channels=16, out_channels=8, hidden_channels=4, norm_act=norm_act, pooling_size=2)
    global_only = DeeplabV3(in_channels=16, out_channels=8, hidden_channels=4, norm_act=norm_act, pooling_size=None)
    global_only.load_state_dict(windowed.state_dict())
    randomize_norms(windowed, seed=3)
    randomize_norms(global_only, seed=3)
    x = torch.randn(2, 16, 6, 6)
    # training: both pool globally (batch statistics; same parameters -> same output)
    torch.testing.assert_close(windowed.train()(x), global_only.train()(x))
    windowed.eval(), global_only.eval()
    with torch.no_grad():
        windowed_out, global_out = windowed(x), global_only(x)
        # eval: the pooled branch of the global head is the same at every pixel; the windowed one is not
        red = global_only.red_conv(global_only.map_bn(torch.cat([c(x) for c in global_only.map_convs], 1)))
        pooled_global = global_only.pool_red_conv(global_only.global_pooling_bn(global_only.global_pooling_conv(x.mean((2, 3), keepdim=True))))
        torch.testing.assert_close(global_out, global_only.red_bn(red + pooled_global))
        pooled_windowed = windowed.pool_red_conv(windowed.global_pooling_bn(windowed.global_pooling_conv(image_pool(x, 2, False))))
        torch.testing.assert_close(windowed_out, windowed.red_bn(red + pooled_windowed))
        assert not torch.allclose(windowed_out, global_out)
        # a window covering the map is the global pooling
        windowed.pooling_size = 32
        torch.testing.assert_close(windowed(x), global_out)


def test_head_init():
    head = DeeplabV3(in_channels=64, out_channels=32, hidden_channels=16, norm_act=make_norm_act("abn"))
    gain = nn.init.calculate_gain("leaky_relu", 0.01)
    conv = head.map_convs[1]
    fan_in, fan_out = 64 * 9, 16 * 9
    expected_std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert torch.equal(head.red_bn.weight, torch.ones(32)) and torch.equal(head.red_bn.bias, torch.zeros(32))


# ---------------------------------------------------------------------------------------------
# ImageNet weights


def torchvision_resnet50_os16():
    """torchvision's ResNet-50 with MiB's OS16 layout: layer4 not strided, all its 3x3 convs dilated by 2."""
    import torchvision  # here, not at the top: the spawned sync workers re-import this file

    net = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, False, True])
    net.layer4[0].conv2.dilation = (2, 2)  # torchvision keeps dilation 1 in the first dilated block
    net.layer4[0].conv2.padding = (2, 2)
    randomize_norms(net, seed=1)
    return net.eval()


def torchvision_features(net, x):
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    outputs = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        x = layer(x)
        outputs.append(x)
    return outputs


def assert_same_torchvision_features(body, reference):
    body.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torchvision_features(reference, x)
        x_b, sums = body(x)
    for ours, theirs in zip([torch.relu(s) for s in sums] + [x_b], expected + expected[-1:]):
        scale = theirs.abs().max()
        torch.testing.assert_close(ours / scale, theirs / scale, rtol=0, atol=1e-5)


def test_torchvision_checkpoint_file_gives_torchvision_outputs(tmp_path):
    reference = torchvision_resnet50_os16()
    path = tmp_path / "resnet50-random.pth"
    torch.save(reference.state_dict(), path)
    body = net_resnet50(norm_act=make_norm_act("std"), output_stride=16)
    assert load_resnet_imagenet(body, path) == "torchvision"
    assert_same_torchvision_features(body, reference)


def test_torchvision_weights_in_abs_weight_layers_keep_the_outputs():
    # |w| + eps cannot be negative: negative torchvision scales are folded into the preceding conv.
    reference = torchvision_resnet50_os16()
    assert (reference.layer1[0].bn1.weight < 0).any() and (reference.layer1[0].downsample[1].weight < 0).any()
    body = net_resnet50(norm_act=make_norm_act("iabn", activation="relu"), output_stride=16)
    load_imagenet_state(body, torchvision_to_mib_names(reference.state_dict()), source="torchvision")
    assert (body.mod2.block1.convs.bn1.weight >= 0).all()
    assert_same_torchvision_features(body, reference)


def mib_imagenet_file(body, path):
    """Write ``body`` as inplace_abn's ImageNet training wrote it: DataParallel keys, classifier, outer dict, no counters."""
    state = {f"module.{k}": v for k, v in body.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["module.classifier.fc.weight"] = torch.randn(1000, 2048)
    state["module.classifier.fc.bias"] = torch.randn(1000)
    torch.save({"epoch": 90, "best_prec1": 77.1, "state_dict": state}, path)


def test_mib_imagenet_file_loads_every_key(tmp_path):
    source = net_resnet50(norm_act=make_norm_act("iabn_sync"))
    randomize_norms(source, seed=2)
    path = tmp_path / "resnet50_iabn_sync.pth.tar"
    mib_imagenet_file(source, path)
    target = net_resnet50(norm_act=make_norm_act("iabn_sync"))
    assert load_resnet_imagenet(target, path) == "mib"
    loaded = target.state_dict()
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[key], value), key


def test_mib_weights_trained_with_iabn_load_into_an_abn_body():
    source = net_resnet50(norm_act=make_norm_act("iabn"))
    randomize_norms(source, seed=4)
    target = net_resnet50(norm_act=make_norm_act("abn"))
    load_imagenet_state(target, source.state_dict(), source="mib", checkpoint_norm_act="iabn")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, _ = source.eval()(x)
        ours, _ = target.eval()(x)
    scale = expected.abs().max()
    torch.testing.assert_close(ours / scale, expected / scale, rtol=0, atol=1e-5)


def test_loading_errors(tmp_path):
    body = net_resnet50(norm_act=make_norm_act("iabn"))
    missing = tmp_path / "pretrained" / "resnet50_iabn.pth.tar"
    with pytest.raises(FileNotFoundError, match="--no_pretrained") as error:
        load_resnet_imagenet(body, missing)
    assert str(missing) in str(error.value) and "inplace_abn" in str(error.value)

    state = {f"module.{k}": v for k, v in body.state_dict().items()}
    state["module.mod6.block1.convs.conv1.weight"] = torch.zeros(1)
    del state["module.mod2.block1.convs.bn1.bias"]
    bad = tmp_path / "bad.pth.tar"
    torch.save({"state_dict": state}, bad)
    with pytest.raises(ValueError, match="mod6.block1.convs.conv1.weight") as error:
        load_resnet_imagenet(body, bad)
    assert "mod2.block1.convs.bn1.bias" in str(error.value) and "bad.pth.tar" in str(error.value)

    not_weights = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_weights)
    with pytest.raises(ValueError, match="holds no state dict"):
        load_resnet_imagenet(body, not_weights)
