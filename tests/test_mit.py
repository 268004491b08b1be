"""MiT encoders: official names/shapes/counts, hyper-parameters, attention maps, weight loading."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import mit_b0, mit_b1, mit_b2, mit_b3, mit_b4, mit_b5
from models.mit import MIT_CONFIGS, mit_variant
from utils.weights import is_hf_mit_state_dict, load_mit_weights, mit_state_dict_from_hf

# Copied from shared/fixtures (the official checkpoints' names and shapes).
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "mit_official_state_dict_shapes.json"
OFFICIAL = json.loads(FIXTURE.read_text())
BUILDERS = {"mit_b0": mit_b0, "mit_b1": mit_b1, "mit_b2": mit_b2, "mit_b3": mit_b3, "mit_b4": mit_b4, "mit_b5": mit_b5}


@pytest.fixture(scope="module")
def b0():
    """One randomly initialised MiT-B0 for the tests that only run it (eval mode)."""
    torch.manual_seed(0)
    return mit_b0().eval()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_state_dict_names_shapes_order_and_count_equal_official(name):
    with torch.device("meta"):
        net = BUILDERS[name]()
    shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(shapes) == list(OFFICIAL[name]["state_dict"])
    assert shapes == OFFICIAL[name]["state_dict"]
    assert sum(p.numel() for p in net.parameters()) == OFFICIAL[name]["num_params"]


def test_published_parameter_counts():
    expected = {"mit_b0": 3_319_392, "mit_b1": 13_151_424, "mit_b2": 24_196_288,
                "mit_b3": 44_072_128, "mit_b4": 60_842_688, "mit_b5": 81_443_008}
    assert {k: OFFICIAL[k]["num_params"] for k in expected} == expected


def test_hyper_parameters_of_b2():
    with torch.device("meta"):
        net = mit_b2()
    assert net.patch_embed1.proj.kernel_size == (7, 7) and net.patch_embed1.proj.stride == (4, 4)
    assert net.patch_embed1.proj.padding == (3, 3)
    assert net.patch_embed3.proj.kernel_size == (3, 3) and net.patch_embed3.proj.stride == (2, 2)
    assert net.patch_embed2.norm.eps == 1e-5
    block = net.block1[0]
    assert block.norm1.eps == 1e-6 and block.norm2.eps == 1e-6 and net.norm1.eps == 1e-6
    assert block.attn.norm.eps == 1e-5 and block.attn.sr.kernel_size == (8, 8) and block.attn.sr.stride == (8, 8)
    assert not hasattr(net.block4[0].attn, "sr")
    assert [net.stage(s)[1][0].attn.num_heads for s in range(4)] == [1, 2, 5, 8]
    assert net.block3[0].attn.scale == pytest.approx(64 ** -0.5)
    assert net.block1[0].attn.q.bias is not None and net.block1[0].attn.kv.bias is not None
    assert net.block2[0].mlp.fc1.out_features == 4 * 128
    assert net.block1[0].mlp.act.approximate == "none"
    # Stochastic depth: linspace(0, 0.1, 16) over all blocks; rate 0 gives Identity.
    assert isinstance(net.block1[0].drop_path, torch.nn.Identity)
    rates = [blk.drop_path.drop_prob for s in range(4) for blk in net.stage(s)[1] if hasattr(blk.drop_path, "drop_prob")]
    assert rates == pytest.approx([0.1 * i / 15 for i in range(1, 16)])


def test_official_initialisation():
    torch.manual_seed(0)
    net = mit_b0()
    conv = net.patch_embed1.proj  # fan_out = 7·7·32
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / (7 * 7 * 32)), rel=0.05)
    assert conv.bias.abs().sum() == 0
    dw = net.block1[0].mlp.dwconv.dwconv  # depth-wise: fan_out = 3·3·128/128
    assert dw.weight.std().item() == pytest.approx(math.sqrt(2.0 / 9), rel=0.1)
    fc = net.block2[0].mlp.fc1
    assert fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert fc.bias.abs().sum() == 0
    assert torch.equal(net.norm4.weight, torch.ones(256)) and net.norm4.bias.abs().sum() == 0


@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_stage_outputs_and_attention_maps(size, b0):
    net = b0
    h, w = size
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        feats, maps = net(x, return_attentions=True)
    dims, heads, ratios = (32, 64, 160, 256), (1, 2, 5, 8), (8, 4, 2, 1)
    for s in range(4):
        gh, gw = h // 2 ** (s + 2), w // 2 ** (s + 2)
        assert feats[s].shape == (2, dims[s], gh, gw) and feats[s].is_contiguous()
        assert maps[s].shape == (2, heads[s], gh * gw, (gh // ratios[s]) * (gw // ratios[s]))
        assert torch.allclose(maps[s].sum(-1), torch.ones(()), atol=1e-5)
        assert (maps[s] >= 0).all()


def _reference_attention(attn_module, x, grid):
    """The documented formula written out, head by head, from the module's weights."""
    batch, tokens, channels = x.shape
    heads = attn_module.num_heads
    d = channels // heads
    q = x @ attn_module.q.weight.T + attn_module.q.bias
    y = x
    if attn_module.sr_ratio > 1:
        spatial = x.transpose(1, 2).reshape(batch, channels, *grid)
        y = attn_module.sr(spatial).flatten(2).transpose(1, 2)
        y = F.layer_norm(y, (channels,), attn_module.norm.weight, attn_module.norm.bias, 1e-5)
    kv = y @ attn_module.kv.weight.T + attn_module.kv.bias
    k, v = kv[..., :channels], kv[..., channels:]
    probs, outs = [], []
    for i in range(heads):
        sl = slice(i * d, (i + 1) * d)
        p = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)
        probs.append(p)
        outs.append(p @ v[..., sl])
    out = torch.cat(outs, dim=-1) @ attn_module.proj.weight.T + attn_module.proj.bias
    return out, torch.stack(probs, dim=1)


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_attention_matches_written_out_formula(stage, b0):
    net = b0
    attn = net.stage(stage)[1][0].attn
    grid = (4 * 8 // 2 ** stage, 8 * 8 // 2 ** stage)
    x = torch.randn(2, grid[0] * grid[1], net.embed_dims[stage])
    with torch.no_grad():
        ref_out, ref_probs = _reference_attention(attn, x, grid)
        out, probs = attn(x, grid, need_weights=True)
        fused, none = attn(x, grid, need_weights=False)
    assert none is None
    assert torch.allclose(probs, ref_probs, atol=1e-6)
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert torch.allclose(fused, ref_out, atol=1e-5)


def test_fused_and_explicit_paths_agree_with_gradients(b0):
    net = b0
    x = torch.randn(2, 3, 64, 96)
    fused = net(x)
    explicit, maps = net(x, return_attentions=True, attention_blocks="all")
    assert [len(m) for m in maps] == [2, 2, 2, 2]
    for a, b in zip(fused, explicit):
        assert torch.allclose(a, b, atol=1e-5)
    g_fused = torch.autograd.grad(sum(f.square().sum() for f in fused), net.block1[0].attn.q.weight)[0]
    g_explicit = torch.autograd.grad(sum(f.square().sum() for f in explicit), net.block1[0].attn.q.weight)[0]
    assert torch.allclose(g_fused, g_explicit, rtol=1e-4, atol=1e-5)


def test_block_selection(b0):
    net = b0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, all_maps = net(x, return_attentions=True, attention_blocks="all")
        _, last = net(x, return_attentions=True)
        _, chosen = net(x, return_attentions=True, attention_blocks=[(0, 0), (3, -1)])
    assert set(chosen) == {(0, 0), (3, 1)}
    # Blocks computed by the fused kernel differ from the explicit ones by rounding only.
    assert torch.equal(chosen[(0, 0)], all_maps[0][0])
    assert torch.allclose(chosen[(3, 1)], last[3], atol=1e-6)
    assert all(torch.allclose(last[s], all_maps[s][-1], atol=1e-6) for s in range(4))
    with pytest.raises(ValueError, match="stage 4"):
        net(x, return_attentions=True, attention_blocks=[(4, 0)])
    with pytest.raises(ValueError, match="block 2"):
        net(x, return_attentions=True, attention_blocks=[(0, 2)])
    with pytest.raises(ValueError, match="attention_blocks"):
        net(x, return_attentions=True, attention_blocks="first")


def test_training_keeps_only_requested_attention_probabilities(b0):
    """Tensors saved for backward: a (B, h, N, N') map exists only for the requested blocks."""
    net = b0.train()
    x = torch.randn(2, 3, 64, 128)
    map_shapes = [(2, 1, 512, 8), (2, 2, 128, 8), (2, 5, 32, 8), (2, 8, 8, 8)]

    def saved_map_counts(**kwargs):
        saved = []

        def pack(t):
            saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(x, **kwargs)
        return [saved.count(shape) for shape in map_shapes]

    try:
        assert saved_map_counts() == [0, 0, 0, 0]
        assert saved_map_counts(return_attentions=True, attention_blocks=[(2, 0)]) == [0, 0, 1, 0]
        assert saved_map_counts(return_attentions=True) == [1, 1, 1, 1]
    finally:
        net.eval()


def test_mit_variant_names():
    assert mit_variant("segformer") == "mit_b2"
    assert mit_variant("segformer_b5") == "mit_b5"
    with pytest.raises(ValueError, match="segformer_b9"):
        mit_variant("segformer_b9")
    assert set(MIT_CONFIGS) == set(BUILDERS)


# ------------------------------------------------------------------ checkpoints
def _random_official_checkpoint(name):
    """A stand-in for NVIDIA's mit_bX.pth: the fixture's names and shapes, random values, 1000-way head."""
    generator = torch.Generator().manual_seed(1)
    state = {k: torch.randn(shape, generator=generator) * 0.1 for k, shape in OFFICIAL[name]["state_dict"].items()}
    for k in state:
        if re.search(r"norm\d?\.weight$", k):
            state[k] = 1 + state[k]
    state["head.weight"] = torch.randn(1000, OFFICIAL[name]["state_dict"]["norm4.weight"][0], generator=generator)
    state["head.bias"] = torch.zeros(1000)
    return state


# Official name → Hugging Face name (transformers' convert_segformer_original_to_pytorch.py).
_TO_HF = [
    (r"^patch_embed(\d)\.proj\.", lambda m: f"patch_embeddings.{int(m[1]) - 1}.proj."),
    (r"^patch_embed(\d)\.norm\.", lambda m: f"patch_embeddings.{int(m[1]) - 1}.layer_norm."),
    (r"^norm(\d)\.", lambda m: f"layer_norm.{int(m[1]) - 1}."),
    (r"^block(\d)\.(\d+)\.", lambda m: f"block.{int(m[1]) - 1}.{m[2]}."),
    (r"\.norm1\.", lambda m: ".layer_norm_1."),
    (r"\.norm2\.", lambda m: ".layer_norm_2."),
    (r"\.attn\.q\.", lambda m: ".attention.self.query."),
    (r"\.attn\.sr\.", lambda m: ".attention.self.sr."),
    (r"\.attn\.norm\.", lambda m: ".attention.self.layer_norm."),
    (r"\.attn\.proj\.", lambda m: ".attention.output.dense."),
    (r"\.mlp\.fc1\.", lambda m: ".mlp.dense1."),
    (r"\.mlp\.fc2\.", lambda m: ".mlp.dense2."),
]


def _to_hf(official):
    hf = {}
    for key, value in official.items():
        if key.startswith("head."):
            hf["classifier." + key[len("head."):]] = value
            continue
        new = key
        for pattern, repl in _TO_HF:
            new = re.sub(pattern, repl, new)
        new = "segformer.encoder." + new
        if ".attn.kv." in new:
            half = value.shape[0] // 2
            hf[new.replace(".attn.kv.", ".attention.self.key.")] = value[:half].clone()
            hf[new.replace(".attn.kv.", ".attention.self.value.")] = value[half:].clone()
        else:
            hf[new] = value
    return hf


def test_hf_names_follow_transformers():
    hf = _to_hf(_random_official_checkpoint("mit_b0"))
    for key in ["segformer.encoder.patch_embeddings.0.proj.weight", "segformer.encoder.patch_embeddings.3.layer_norm.bias",
                "segformer.encoder.block.0.0.layer_norm_1.weight", "segformer.encoder.block.0.1.attention.self.query.weight",
                "segformer.encoder.block.1.0.attention.self.key.bias", "segformer.encoder.block.2.1.attention.self.value.weight",
                "segformer.encoder.block.0.0.attention.self.sr.weight", "segformer.encoder.block.0.0.attention.self.layer_norm.weight",
                "segformer.encoder.block.3.1.attention.output.dense.weight", "segformer.encoder.block.3.0.mlp.dense1.weight",
                "segformer.encoder.block.3.0.mlp.dwconv.dwconv.weight", "segformer.encoder.layer_norm.2.weight",
                "classifier.weight"]:
        assert key in hf, key
    assert hf["segformer.encoder.block.0.0.attention.self.key.weight"].shape == (32, 32)
    assert is_hf_mit_state_dict(hf) and not is_hf_mit_state_dict(_random_official_checkpoint("mit_b0"))


def test_official_and_hf_checkpoints_load_identically(tmp_path):
    official = _random_official_checkpoint("mit_b0")
    torch.save(official, tmp_path / "mit_b0.pth")
    torch.save({"state_dict": official}, tmp_path / "wrapped.pth")
    torch.save(_to_hf(official), tmp_path / "pytorch_model.bin")
    from safetensors.torch import save_file

    save_file(_to_hf(official), str(tmp_path / "model.safetensors"))

    x = torch.randn(1, 3, 64, 96)
    outputs = []
    net = mit_b0().eval()
    for file in ["mit_b0.pth", "wrapped.pth", "pytorch_model.bin", "model.safetensors"]:
        with torch.no_grad():
            for p in net.parameters():
                p.zero_()
        load_mit_weights(net, tmp_path / file)
        for k, v in net.state_dict().items():
            assert torch.equal(v, official[k]), (file, k)
        with torch.no_grad():
            outputs.append(net(x))
    for other in outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outputs[0], other))


def test_hf_conversion_merges_key_then_value():
    official = _random_official_checkpoint("mit_b0")
    converted = mit_state_dict_from_hf(_to_hf(official))
    assert set(converted) == set(OFFICIAL["mit_b0"]["state_dict"])
    assert torch.equal(converted["block2.1.attn.kv.weight"], official["block2.1.attn.kv.weight"])


def test_incomplete_or_wrong_checkpoint_is_reported(tmp_path, b0):
    official = _random_official_checkpoint("mit_b0")
    del official["block3.1.mlp.fc2.bias"]
    official["extra.weight"] = torch.zeros(1)
    before = {k: v.clone() for k, v in b0.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"block3\.1\.mlp\.fc2\.bias[\s\S]*extra\.weight"):
        load_mit_weights(b0, official)
    with pytest.raises(RuntimeError, match="shape mismatches"):
        load_mit_weights(b0, _random_official_checkpoint("mit_b1"))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_mit_weights(b0, tmp_path / "nowhere.pth")
    assert all(torch.equal(v, before[k]) for k, v in b0.state_dict().items())
