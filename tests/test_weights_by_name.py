"""``--pretrained hf:OWNER/REPO[@REV]`` and ``--pretrained torchvision[:WEIGHTS]``.

The network is off: a child process runs with ``HF_HUB_OFFLINE=1``, ``HF_HOME`` and ``TORCH_HOME`` in
a temporary folder and every HTTP(S) request sent to a closed local port. ``huggingface_hub`` and
``torch.hub`` do the look-ups in caches this file builds in their real layouts:

    $HF_HOME/hub/models--nvidia--mit-b0/{blobs/<sha256>, snapshots/<rev>/model.safetensors -> blob,
                                          refs/main = <rev>}
    $TORCH_HOME/hub/checkpoints/resnet101-cd907fc2.pth     (torchvision's IMAGENET1K_V2 file name)

Each named load must give the same backbone features as loading the same weights by path.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from segmentation_module import make_model
from utils.weights import parse_hf_name, pretrained_path, HubWeights

ROOT = Path(__file__).resolve().parents[1]
REVISION = hashlib.sha1(b"mit-b0 test snapshot").hexdigest()
TORCHVISION_V2_FILE = "resnet101-cd907fc2.pth"  # ResNet101_Weights.IMAGENET1K_V2
TORCHVISION_V1_FILE = "resnet101-63fe2227.pth"  # ResNet101_Weights.IMAGENET1K_V1
CLOSED_PORT_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused


# ------------------------------------------------------------------------------ weights
def _perturbed(state, seed):
    """Every float tensor plus noise, so that norm layers (1/0 at init) carry real values."""
    generator = torch.Generator().manual_seed(seed)
    return {k: (v + 0.1 * torch.randn(v.shape, generator=generator)) if v.is_floating_point() else v
            for k, v in state.items()}


def _official_mit_b0():
    """An ImageNet file in NVIDIA's layout: encoder names plus the 1000-way ``head``."""
    from models.mit import mit_b0

    state = _perturbed(mit_b0().state_dict(), seed=1)
    state["head.weight"], state["head.bias"] = torch.randn(1000, 256), torch.randn(1000)
    return state


# Official MiT name pieces -> transformers' SegformerForImageClassification names.
_STAGE_RENAMES = [
    (r"^patch_embed(\d)\.norm\.", lambda m: f"patch_embeddings.{int(m[1]) - 1}.layer_norm."),
    (r"^patch_embed(\d)\.proj\.", lambda m: f"patch_embeddings.{int(m[1]) - 1}.proj."),
    (r"^norm(\d)\.", lambda m: f"layer_norm.{int(m[1]) - 1}."),
    (r"^block(\d)\.", lambda m: f"block.{int(m[1]) - 1}."),
]
_LAYER_RENAMES = {"norm1": "layer_norm_1", "norm2": "layer_norm_2", "attn.q": "attention.self.query",
                  "attn.k": "attention.self.key", "attn.v": "attention.self.value", "attn.sr": "attention.self.sr", "attn.norm": "attention.self.layer_norm",
                  "attn.proj": "attention.output.dense", "mlp.fc1": "mlp.dense1", "mlp.fc2": "mlp.dense2"}


def _hf_name(key):
    for pattern, replace in _STAGE_RENAMES:
        key = re.sub(pattern, replace, key)
    for ours, theirs in _LAYER_RENAMES.items():
        key = key.replace(f".{ours}.", f".{theirs}.")
    return "segformer.encoder." + key


def _hugging_face_layout(official):
    """The same weights as Hugging Face stores them: ``kv`` split into key (first half) and value."""
    hf = {}
    for key, value in official.items():
        if key.startswith("head."):
            hf["classifier." + key[len("head."):]] = value
        elif ".attn.kv." in key:
            half = value.shape[0] // 2
            hf[_hf_name(key.replace(".attn.kv.", ".attn.k."))] = value[:half].contiguous()
            hf[_hf_name(key.replace(".attn.kv.", ".attn.v."))] = value[half:].contiguous()
        else:
            hf[_hf_name(key)] = value
    return hf


def _add_to_hub_cache(cache, repo_id, filename, write, revision=REVISION):
    """Store a file as ``huggingface_hub`` does: content-addressed blob, snapshot symlink, ref."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    staging = folder / "blobs" / "incoming"
    write(staging)
    blob = folder / "blobs" / hashlib.sha256(staging.read_bytes()).hexdigest()
    staging.rename(blob)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / filename).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(revision)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    from safetensors.torch import save_file
    from torchvision.models import resnet101

    base = tmp_path_factory.mktemp("weights_by_name")
    official = _official_mit_b0()
    (base / "code" / "pretrained").mkdir(parents=True)
    torch.save(official, base / "code" / "pretrained" / "mit_b0.pth")
    hf = _hugging_face_layout(official)
    hub = base / "hf_home" / "hub"
    _add_to_hub_cache(hub, "nvidia/mit-b0", "model.safetensors", lambda path: save_file(hf, str(path)))
    # a repository with only the pickled format (the fallback)
    _add_to_hub_cache(hub, "lab/segformer-b0-imagenet", "pytorch_model.bin", lambda path: torch.save(hf, path))

    checkpoints = base / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(_perturbed(resnet101().state_dict(), seed=2), checkpoints / TORCHVISION_V2_FILE)
    return base


# -------------------------------------------------------------------- the offline child
_CHILD = r"""
import json, sys
from types import SimpleNamespace
import torch
from segmentation_module import make_model
from utils.weights import pretrained_path

cases, result_file = json.loads(sys.argv[1]), sys.argv[2]
x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
results = {}
for name, case in cases.items():
    opts = SimpleNamespace(**case["opts"])
    try:
        entry = {"path": pretrained_path(opts)}
        if case["build"]:
            model = make_model(opts, [16]).eval()
            with torch.no_grad():
                entry["features"] = model.body(x)
    except (ValueError, FileNotFoundError) as error:
        entry = {"error": type(error).__name__ + ": " + str(error)}
    results[name] = entry
torch.save(results, result_file)
"""


def _segformer(**kwargs):
    return {"model": "segformer_b0", "no_pretrained": False, **kwargs}


def _deeplab(**kwargs):
    return {"model": "deeplab", "backbone": "resnet101", "output_stride": 16, "norm_act": "iabn_sync",
            "pooling": 32, "no_pretrained": False, **kwargs}


def _offline_env(base):
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("HF_", "HUGGINGFACE_", "TORCH_HOME", "XDG_CACHE", "NO_PROXY"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(base / "hf_home"), TORCH_HOME=str(base / "torch_home"),
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[variable] = CLOSED_PORT_PROXY
    return env


@pytest.fixture(scope="module")
def offline(caches):
    """Results of the child: ``{case: {"path", "features"} or {"error"}}``."""
    checkpoints = caches / "torch_home" / "hub" / "checkpoints"
    cases = {
        "hf_main": (_segformer(pretrained="hf:nvidia/mit-b0"), True),
        "hf_revision": (_segformer(pretrained=f"hf:nvidia/mit-b0@{REVISION}"), True),
        "hf_bin_fallback": (_segformer(pretrained="hf:lab/segformer-b0-imagenet"), True),
        "mit_by_path": (_segformer(code_directory=str(caches / "code")), True),
        "hf_not_cached": (_segformer(pretrained="hf:nvidia/mit-b0@v2.0"), False),
        "hf_other_repo_not_cached": (_segformer(model="segformer_b2", pretrained="hf:nvidia/mit-b2"), False),
        "tv_default": (_deeplab(pretrained="torchvision"), True),
        "tv_by_path": (_deeplab(pretrained=str(checkpoints / TORCHVISION_V2_FILE)), True),
        "tv_v2": (_deeplab(pretrained="torchvision:IMAGENET1K_V2"), False),
        "tv_full_name": (_deeplab(pretrained="torchvision:ResNet101_Weights.IMAGENET1K_V2"), False),
        "tv_v1_not_cached": (_deeplab(pretrained="torchvision:IMAGENET1K_V1"), False),
    }
    payload = {name: {"opts": opts, "build": build} for name, (opts, build) in cases.items()}
    result_file = caches / "results.pt"
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(payload), str(result_file)],
                          cwd=caches, env=_offline_env(caches), capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    return torch.load(result_file, weights_only=True)


def _assert_same_features(a, b):
    flat_a, flat_b = _flatten(a), _flatten(b)
    assert len(flat_a) == len(flat_b) > 0
    for x, y in zip(flat_a, flat_b):
        assert torch.equal(x, y)


def _flatten(value):
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for item in value for t in _flatten(item)]


# ------------------------------------------------------------------------------ tests
def test_hf_name_resolves_to_the_hub_cache_snapshot(offline, caches):
    snapshot = caches / "hf_home" / "hub" / "models--nvidia--mit-b0" / "snapshots" / REVISION
    for case in ("hf_main", "hf_revision"):
        assert "error" not in offline[case], offline[case]
        assert offline[case]["path"] == str(snapshot / "model.safetensors")
    fallback = caches / "hf_home" / "hub" / "models--lab--segformer-b0-imagenet" / "snapshots" / REVISION
    assert offline["hf_bin_fallback"]["path"] == str(fallback / "pytorch_model.bin")


def test_hf_weights_give_the_features_of_the_same_weights_by_path(offline):
    assert offline["mit_by_path"]["path"].endswith(os.path.join("code", "pretrained", "mit_b0.pth"))
    reference = offline["mit_by_path"]["features"]
    for case in ("hf_main", "hf_revision", "hf_bin_fallback"):
        _assert_same_features(offline[case]["features"], reference)
    # and the weights were really loaded: a randomly initialised encoder differs
    torch.manual_seed(0)
    with torch.no_grad():
        fresh = make_model(SimpleNamespace(model="segformer_b0", no_pretrained=True), [16]).eval().body(
            torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(_flatten(fresh)[0], _flatten(reference)[0])


def test_torchvision_name_resolves_to_torch_home(offline, caches):
    expected = str(caches / "torch_home" / "hub" / "checkpoints" / TORCHVISION_V2_FILE)
    for case in ("tv_default", "tv_v2", "tv_full_name"):
        assert offline[case].get("path") == expected, offline[case]
    _assert_same_features(offline["tv_default"]["features"], offline["tv_by_path"]["features"])


def test_offline_hf_error_names_the_cache_folder_and_the_file(offline, caches):
    cache = caches / "hf_home" / "hub"
    repo = cache / "models--nvidia--mit-b0"
    message = offline["hf_not_cached"]["error"]
    assert message.startswith("FileNotFoundError: --pretrained hf:nvidia/mit-b0@v2.0: ")
    assert f"not in the Hugging Face cache {cache} " in message
    assert f"Put the file at {repo / 'snapshots' / '<commit>' / 'model.safetensors'} " in message
    assert f"write that commit hash into {repo / 'refs' / 'v2.0'} " in message
    assert "hf download nvidia/mit-b0 model.safetensors --revision v2.0" in message
    other = offline["hf_other_repo_not_cached"]["error"]
    assert str(cache / "models--nvidia--mit-b2" / "snapshots" / "<commit>" / "model.safetensors") in other
    assert str(cache / "models--nvidia--mit-b2" / "refs" / "main") in other


def test_offline_torchvision_error_names_the_folder_and_the_file(offline, caches):
    folder = caches / "torch_home" / "hub" / "checkpoints"
    message = offline["tv_v1_not_cached"]["error"]
    assert message.startswith("FileNotFoundError: --pretrained torchvision (ResNet101_Weights.IMAGENET1K_V1)")
    assert f"{TORCHVISION_V1_FILE} is not in {folder} and cannot be downloaded" in message
    assert f"Put https://download.pytorch.org/models/{TORCHVISION_V1_FILE} at {folder / TORCHVISION_V1_FILE}" in message
    assert sorted(os.listdir(folder)) == [TORCHVISION_V2_FILE]  # no partial download left behind


def test_missing_default_file_suggests_the_names(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--pretrained hf:nvidia/mit-b0 \(the Hugging Face copy"):
        make_model(SimpleNamespace(**_segformer(code_directory=str(tmp_path))), [16])
    with pytest.raises(FileNotFoundError, match=r"--pretrained torchvision \(torchvision's ImageNet ResNet"):
        make_model(SimpleNamespace(**_deeplab(code_directory=str(tmp_path))), [16])


@pytest.mark.parametrize("options, message", [
    (_segformer(model="segformer_b2", pretrained="hf:nvidia/mit-b0"),
     "hf:nvidia/mit-b0 is the MiT-B0 encoder but --model segformer_b2 uses MiT-B2: use hf:nvidia/mit-b2"),
    (_deeplab(pretrained="hf:nvidia/mit-b0"), "only the SegFormer models use; for --model deeplab use --pretrained torchvision"),
    (_segformer(pretrained="torchvision"), "used by --model deeplab; for --model segformer_b0 use --pretrained hf:nvidia/mit-b0"),
    (_segformer(pretrained="hf:mit-b0"), "expected hf:OWNER/REPO or hf:OWNER/REPO@REVISION"),
    (_segformer(pretrained="hf:nvidia/mit-b0@"), "expected hf:OWNER/REPO or hf:OWNER/REPO@REVISION"),
    (_deeplab(pretrained="torchvision:IMAGENET1K_V9"), "ResNet101_Weights has IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"),
    (_deeplab(pretrained="torchvision:ResNet50_Weights.IMAGENET1K_V1"),
     "is not one of ResNet101_Weights (--backbone resnet101)"),
])
def test_malformed_or_mismatched_names_are_value_errors(options, message):
    with pytest.raises(ValueError) as error:
        pretrained_path(SimpleNamespace(**options))
    assert message in str(error.value)


def test_parse_hf_name():
    assert parse_hf_name("hf:nvidia/mit-b2") == HubWeights("nvidia/mit-b2", None)
    assert parse_hf_name("hf:nvidia/mit-b2@refs/pr/1") == HubWeights("nvidia/mit-b2", "refs/pr/1")
