"""Pretrained weights and foreign checkpoints: where files are, which format, how keys map.

- ``pretrained_path(opts)``: the file the originals read (``{code_directory}/pretrained/mit_bX.pth``
  for SegFormer, ``{code_directory}/pretrained/{backbone}_{norm_act}.pth.tar`` for DeepLab), or what
  ``--pretrained`` names: a path, ``hf:OWNER/REPO[@REVISION]`` (a Hugging Face MiT, fetched into the
  hub cache) or ``torchvision[:WEIGHTS]`` (torchvision's ImageNet ResNet, fetched into
  ``$TORCH_HOME/hub/checkpoints``). Named weights resolve to the cached file, so the loaders only
  ever see a local path and detect its format themselves.
- ``load_mit_weights(mit, source)``: NVIDIA's ImageNet MiT checkpoints (flat, or wrapped in
  ``state_dict``/``model``) and the Hugging Face ``nvidia/mit-b*`` format (``pytorch_model.bin`` or
  ``model.safetensors``), converted to the official names. Classification heads are dropped;
  every encoder parameter must be found.
- ``load_foreign_checkpoint(model, ckpt)``: a checkpoint written by MiB, PLOP or SATS
  (``model_state`` with DDP ``module.`` prefixes) loaded strictly, with a readable report.

Files are read with ``torch.load(..., weights_only=True)`` (``utils.checkpoint.load_checkpoint``).
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Iterable, Mapping, NamedTuple, Optional
from urllib.parse import urlparse

import torch
from torch import nn

from models.mit import mit_variant
from utils.checkpoint import load_checkpoint, strip_prefix

__all__ = [
    "MIT_WEIGHTS_HELP",
    "RESNET_WEIGHTS_HELP",
    "PRETRAINED_HELP",
    "pretrained_path",
    "resolve_pretrained",
    "HubWeights",
    "parse_hf_name",
    "hf_weights_file",
    "hf_not_cached_message",
    "torchvision_weights_file",
    "missing_pretrained_error",
    "read_weights_file",
    "state_dict_of",
    "is_hf_mit_state_dict",
    "mit_state_dict_from_hf",
    "load_mit_weights",
    "load_foreign_checkpoint",
]

MIT_WEIGHTS_HELP = (
    "The ImageNet-1K MiT weights (mit_b0.pth ... mit_b5.pth) are linked from the NVlabs SegFormer "
    "README (https://github.com/NVlabs/SegFormer, section 'Training': 'Download ImageNet-1K pretrained "
    "weights'); the Hugging Face copies nvidia/mit-b0 ... nvidia/mit-b5 (pytorch_model.bin or "
    "model.safetensors) are accepted too."
)
RESNET_WEIGHTS_HELP = (
    "The In-Place ABN ImageNet ResNets (e.g. resnet101_iabn_sync.pth.tar) are linked from MiB's README "
    "(https://github.com/fcdl94/MiB, 'ImageNet pretrained' / mapillary/inplace_abn model zoo)."
)


PRETRAINED_HELP = (
    "ImageNet weights of the backbone: a file (default: {code_directory}/pretrained/mit_bX.pth for "
    "SegFormer, {code_directory}/pretrained/{backbone}_{norm_act}.pth.tar for DeepLab); "
    "hf:OWNER/REPO[@REVISION] for a Hugging Face MiT encoder (e.g. hf:nvidia/mit-b2; "
    "model.safetensors, else pytorch_model.bin, cached in the Hugging Face hub cache, HF_HOME); "
    "or torchvision[:WEIGHTS] for torchvision's ImageNet ResNet of --backbone (default weights "
    "DEFAULT = IMAGENET1K_V2, or IMAGENET1K_V1; cached in $TORCH_HOME/hub/checkpoints). "
    "Named weights are downloaded once; offline (HF_HUB_OFFLINE=1) only the cache is read. "
    "A missing file is an error"
)

HF_PREFIX = "hf:"
TORCHVISION_NAME = "torchvision"
# Tried in this order: safetensors is read without unpickling.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")


def pretrained_path(opts) -> str:
    """The local ImageNet weights file for ``opts``: ``opts.pretrained`` resolved by
    ``resolve_pretrained`` if set, else the originals' path.

    SegFormer ``segformer_bX`` (``segformer`` = b2): ``{code_directory}/pretrained/mit_bX.pth``
    (SATS reads ``./pretrained/mit_b2.pth``; ``code_directory`` defaults to ``.``).
    DeepLab: ``{code_directory}/pretrained/{backbone}_{norm_act}.pth.tar`` (PLOP/SATS);
    ``iabn_sync_test`` reads the ``iabn_sync`` file, as in the originals.
    """
    explicit = getattr(opts, "pretrained", None)
    if explicit:
        return resolve_pretrained(os.fspath(explicit), opts)
    root = getattr(opts, "code_directory", None) or "."
    model = opts.model
    if model.startswith("segformer"):
        return os.path.join(root, "pretrained", f"{mit_variant(model)}.pth")
    if model == "deeplab":
        norm_act = "iabn_sync" if opts.norm_act == "iabn_sync_test" else opts.norm_act
        return os.path.join(root, "pretrained", f"{opts.backbone}_{norm_act}.pth.tar")
    raise ValueError(f"no pretrained weights are defined for --model {model!r}")


def resolve_pretrained(spec: str, opts) -> str:
    """A local file for the ``--pretrained`` value ``spec``.

    ``hf:OWNER/REPO[@REVISION]`` -> ``hf_weights_file`` (SegFormer models only; a repository named
    ``mit-bN`` must match the model's variant); ``torchvision`` / ``torchvision:WEIGHTS`` ->
    ``torchvision_weights_file`` for ``opts.backbone`` (DeepLab only); anything else is a path and
    is returned as given (a file literally named ``torchvision`` is reached as ``./torchvision``).
    """
    model = opts.model
    if spec.startswith(HF_PREFIX):
        hub = parse_hf_name(spec)
        if not model.startswith("segformer"):
            raise ValueError(
                f"--pretrained {spec}: Hugging Face names are read as MiT encoders, which only the "
                f"SegFormer models use; for --model {model} use --pretrained torchvision or a file")
        _check_mit_repo_variant(hub, model, spec)
        return hf_weights_file(hub)
    if spec == TORCHVISION_NAME or spec.startswith(TORCHVISION_NAME + ":"):
        if model != "deeplab":
            raise ValueError(
                f"--pretrained {spec}: torchvision's weights are ResNets, used by --model deeplab; "
                f"for --model {model} use --pretrained hf:nvidia/{_hf_mit_name(model)} or a file")
        _, _, weights_name = spec.partition(":")
        return torchvision_weights_file(getattr(opts, "backbone", None) or "resnet101", weights_name or None)
    return spec


# ------------------------------------------------------------------------- Hugging Face hub
class HubWeights(NamedTuple):
    """A Hugging Face model repository and the revision to read (``None``: the ``main`` branch)."""

    repo_id: str
    revision: Optional[str] = None


def parse_hf_name(spec: str) -> HubWeights:
    """``hf:OWNER/REPO[@REVISION]`` -> ``HubWeights``; a malformed name is a ``ValueError``."""
    body = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
    repo_id, _, revision = body.partition("@")
    if not _HF_REPO_ID.match(repo_id) or ("@" in body and not revision):
        raise ValueError(
            f"--pretrained {spec}: expected hf:OWNER/REPO or hf:OWNER/REPO@REVISION, "
            f"e.g. hf:nvidia/mit-b2 or hf:nvidia/mit-b2@main")
    return HubWeights(repo_id, revision or None)


def _hf_mit_name(model: str) -> str:
    return mit_variant(model).replace("_", "-")


def _check_mit_repo_variant(hub: HubWeights, model: str, spec: str) -> None:
    """NVIDIA's repositories are named ``mit-bN``: a B0 encoder asked for a B2 model is reported
    here, before the strict load's list of mis-shaped keys."""
    named = re.search(r"(?:^|/)mit-(b\d)$", hub.repo_id)
    if named and f"mit-{named[1]}" != _hf_mit_name(model):
        raise ValueError(
            f"--pretrained {spec} is the MiT-{named[1].upper()} encoder but --model {model} uses "
            f"MiT-{_hf_mit_name(model)[-2:].upper()}: use hf:nvidia/{_hf_mit_name(model)} or the matching --model")


def hf_weights_file(hub: HubWeights) -> str:
    """Local path of ``model.safetensors`` (else ``pytorch_model.bin``) of ``hub`` in the hub cache.

    ``huggingface_hub.hf_hub_download`` does the lookup: the file is downloaded into the cache
    (``HF_HUB_CACHE``, by default ``$HF_HOME/hub``) unless it is there already; with
    ``HF_HUB_OFFLINE=1`` or without a connection only the cache is read. Neither file found is a
    ``FileNotFoundError`` that names the cache folder and the file to put there; an unknown
    repository or revision is a ``ValueError``.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    not_cached = False
    for filename in HF_WEIGHT_FILES:
        try:
            return hf_hub_download(hub.repo_id, filename, revision=hub.revision)
        except LocalEntryNotFoundError:
            not_cached = True  # offline or no connection, and not in the cache
        except EntryNotFoundError:
            continue  # the repository has no such file; try the next format
        except RevisionNotFoundError as error:
            raise ValueError(f"--pretrained {_hf_spec(hub)}: revision {hub.revision!r} does not exist "
                             f"in {hub.repo_id} ({error})") from None
        except RepositoryNotFoundError as error:
            raise ValueError(f"--pretrained {_hf_spec(hub)}: no Hugging Face model repository "
                             f"{hub.repo_id} (or it needs a login: HF_TOKEN) ({error})") from None
    if not_cached:
        raise FileNotFoundError(hf_not_cached_message(hub))
    raise FileNotFoundError(
        f"--pretrained {_hf_spec(hub)}: the repository holds neither {' nor '.join(HF_WEIGHT_FILES)}; "
        "download the weights and pass --pretrained PATH")


def _hf_spec(hub: HubWeights) -> str:
    return HF_PREFIX + hub.repo_id + (f"@{hub.revision}" if hub.revision else "")


def hf_not_cached_message(hub: HubWeights) -> str:
    """What to do when ``hub``'s weights are neither cached nor downloadable: the hub cache's
    own layout (``models--OWNER--REPO/snapshots/<commit>/FILE`` and ``refs/<branch>``)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = constants.HF_HUB_CACHE
    folder = os.path.join(cache, repo_folder_name(repo_id=hub.repo_id, repo_type="model"))
    revision = hub.revision or "main"
    if _COMMIT_HASH.match(revision):
        commit, ref_step = revision, ""
    else:
        commit = "<commit>"
        ref_step = f" and write that commit hash into {os.path.join(folder, 'refs', revision)}"
    target = os.path.join(folder, "snapshots", commit, HF_WEIGHT_FILES[0])
    return (
        f"--pretrained {_hf_spec(hub)}: {' or '.join(HF_WEIGHT_FILES)} of {hub.repo_id} is not in "
        f"the Hugging Face cache {cache} and cannot be downloaded (HF_HUB_OFFLINE=1 or no "
        f"connection). Put the file at {target}{ref_step} (on a machine with internet, "
        f"`hf download {hub.repo_id} {HF_WEIGHT_FILES[0]}"
        f"{f' --revision {hub.revision}' if hub.revision else ''}` fills its cache; copy "
        f"{repo_folder_name(repo_id=hub.repo_id, repo_type='model')}/ from there), point HF_HOME "
        f"or HF_HUB_CACHE at a cache that has it, or download the file and pass --pretrained PATH."
    )


# ------------------------------------------------------------------------------- torchvision
def _torchvision_weights(backbone: str, weights_name: Optional[str]):
    """The torchvision weights enum member for ``backbone`` (``resnet50``/``resnet101``):
    ``DEFAULT`` when ``weights_name`` is None, else ``IMAGENET1K_V1`` style names or the full
    ``ResNet101_Weights.IMAGENET1K_V1`` (which must belong to ``backbone``)."""
    from torchvision.models import get_model_weights, get_weight

    try:
        enum = get_model_weights(backbone)
    except ValueError:
        raise ValueError(f"--pretrained torchvision: torchvision has no weights for --backbone "
                         f"{backbone!r}") from None
    choices = ", ".join(enum.__members__)
    if weights_name is None:
        return enum.DEFAULT
    if "." in weights_name:
        try:
            weights = get_weight(weights_name)
        except (ValueError, KeyError, AttributeError):
            weights = None
        if weights is None or type(weights) is not enum:
            raise ValueError(f"--pretrained torchvision:{weights_name} is not one of {enum.__name__} "
                             f"(--backbone {backbone}): choose from {choices}")
        return weights
    if weights_name not in enum.__members__:
        raise ValueError(f"--pretrained torchvision:{weights_name}: {enum.__name__} has {choices}")
    return enum[weights_name]


def torchvision_weights_file(backbone: str = "resnet101", weights_name: Optional[str] = None) -> str:
    """Local path of torchvision's ImageNet weights for ``backbone`` (``models.resnet`` converts
    their names and norm scales on load).

    The file is the one torchvision itself uses: ``{torch.hub.get_dir()}/checkpoints/<name>``
    (``$TORCH_HOME/hub/checkpoints``, e.g. ``resnet101-cd907fc2.pth`` for ``IMAGENET1K_V2``), read
    from there when present, else downloaded with ``torch.hub.download_url_to_file`` and checked
    against the hash prefix in its name. A failed download is a ``FileNotFoundError`` naming the
    folder, the file name and its URL.
    """
    import torch.hub

    weights = _torchvision_weights(backbone, weights_name)
    filename = os.path.basename(urlparse(weights.url).path)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, filename)
    if os.path.isfile(path):
        return path
    match = torch.hub.HASH_REGEX.search(filename)
    try:
        os.makedirs(folder, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, path, match.group(1) if match else None)
    except OSError as error:  # URLError and socket errors are OSErrors
        raise FileNotFoundError(
            f"--pretrained torchvision ({type(weights).__name__}.{weights.name}) for --backbone "
            f"{backbone}: {filename} is not in {folder} and cannot be downloaded ({error}). Put "
            f"{weights.url} at {path}, point TORCH_HOME at a folder whose hub/checkpoints/ has it, "
            "or pass --pretrained PATH."
        ) from None
    except RuntimeError as error:  # the hash check
        raise ValueError(f"downloaded {weights.url} does not match its name: {error}") from None
    return path


def missing_pretrained_error(path: str, model: str) -> FileNotFoundError:
    """The error raised when a pretrained file is absent: names the path, the source, the way out
    (including the by-name forms ``hf:nvidia/mit-bX`` / ``torchvision``)."""
    if model.startswith("segformer"):
        where = MIT_WEIGHTS_HELP
        by_name = f"--pretrained hf:nvidia/{_hf_mit_name(model)} (the Hugging Face copy, downloaded once)"
    else:
        where = RESNET_WEIGHTS_HELP
        by_name = ("--pretrained torchvision (torchvision's ImageNet ResNet, downloaded once; "
                   "plain BN weights, converted on load)")
    return FileNotFoundError(
        f"pretrained weights for --model {model} not found: {path}. {where} Put the file at that path, "
        f"give another one with --pretrained PATH, load them by name with {by_name}, "
        f"or pass --no_pretrained to start from random weights."
    )


def read_weights_file(path) -> dict:
    """Contents of a weights file: ``.safetensors`` through safetensors, anything else through
    ``torch.load(..., weights_only=True)``."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file not found: {path}")
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return load_checkpoint(path)


def state_dict_of(obj: Mapping) -> "OrderedDict[str, torch.Tensor]":
    """The tensor dict inside a loaded file: the file itself, or its ``model_state``,
    ``state_dict`` or ``model`` entry (the wrappers used by MiB/PLOP/SATS, mmseg and timm)."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a dict of tensors or a checkpoint dict, got {type(obj).__name__}")
    for wrapper in ("model_state", "state_dict", "model"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping):
            obj = inner
            break
    non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise ValueError(
            f"not a state dict: entries {non_tensors[:5]} are not tensors "
            f"(known wrappers are 'model_state', 'state_dict', 'model')"
        )
    return OrderedDict(obj)


def _strip_ddp_prefix(state: Mapping) -> "OrderedDict[str, torch.Tensor]":
    prefixed = [k.startswith("module.") for k in state]
    if any(prefixed) and not all(prefixed):
        raise ValueError("checkpoint mixes keys with and without the DDP 'module.' prefix")
    return strip_prefix(state) if any(prefixed) else OrderedDict(state)


# Hugging Face SegFormer encoder names (transformers ``modeling_segformer.py``), after the
# ``segformer.encoder.`` prefix, mapped to the official ones. Key and value are separate
# Linear layers there; the official ``kv`` stacks them (keys first), see ``_merge_key_value``.
_HF_RULES = [
    (r"^patch_embeddings\.(\d+)\.proj\.", lambda m: f"patch_embed{int(m[1]) + 1}.proj."),
    (r"^patch_embeddings\.(\d+)\.layer_norm\.", lambda m: f"patch_embed{int(m[1]) + 1}.norm."),
    (r"^layer_norm\.(\d+)\.", lambda m: f"norm{int(m[1]) + 1}."),
    (r"^block\.(\d+)\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}."),
    (r"\.layer_norm_1\.", lambda m: ".norm1."),
    (r"\.layer_norm_2\.", lambda m: ".norm2."),
    (r"\.attention\.self\.query\.", lambda m: ".attn.q."),
    (r"\.attention\.self\.key\.", lambda m: ".attn.k."),
    (r"\.attention\.self\.value\.", lambda m: ".attn.v."),
    (r"\.attention\.self\.sr\.", lambda m: ".attn.sr."),
    (r"\.attention\.self\.layer_norm\.", lambda m: ".attn.norm."),
    (r"\.attention\.output\.dense\.", lambda m: ".attn.proj."),
    (r"\.mlp\.dense1\.", lambda m: ".mlp.fc1."),
    (r"\.mlp\.dense2\.", lambda m: ".mlp.fc2."),
]
_HF_ENCODER_PREFIXES = ("segformer.encoder.", "encoder.")


def is_hf_mit_state_dict(state: Mapping) -> bool:
    """True for the Hugging Face layout (``[segformer.]encoder.block.0.0.attention.self.query...``)."""
    return any(k.startswith(p + "block.") for k in state for p in _HF_ENCODER_PREFIXES)


def _rename_hf_key(key: str) -> str:
    for pattern, replace in _HF_RULES:
        key = re.sub(pattern, replace, key, count=1)
    return key


def _merge_key_value(state: "OrderedDict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
    """Stacks HF's separate key/value projections into the official ``kv`` (rows: k then v)."""
    merged = OrderedDict()
    for key, value in state.items():
        if ".attn.k." in key:
            partner = key.replace(".attn.k.", ".attn.v.")
            if partner not in state:
                raise KeyError(f"Hugging Face checkpoint has {key} but no matching value projection {partner}")
            merged[key.replace(".attn.k.", ".attn.kv.")] = torch.cat([value, state[partner]], dim=0)
        elif ".attn.v." in key:
            if key.replace(".attn.v.", ".attn.k.") not in state:
                raise KeyError(f"Hugging Face checkpoint has {key} but no matching key projection")
        else:
            merged[key] = value
    return merged


def mit_state_dict_from_hf(state: Mapping) -> "OrderedDict[str, torch.Tensor]":
    """Hugging Face ``nvidia/mit-b*`` encoder weights under the official MiT names.

    Keys outside the encoder (``classifier.*``, ``decode_head.*``) are dropped.
    """
    renamed = OrderedDict()
    for key, value in state.items():
        prefix = next((p for p in _HF_ENCODER_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            renamed[_rename_hf_key(key[len(prefix):])] = value
    return _merge_key_value(renamed)


def _mit_encoder_state(state: Mapping) -> "OrderedDict[str, torch.Tensor]":
    state = _strip_ddp_prefix(state)
    if is_hf_mit_state_dict(state):
        return mit_state_dict_from_hf(state)
    # Official ImageNet files carry a 1000-way ``head``; mmseg-style files prefix ``backbone.``.
    if any(k.startswith("backbone.") for k in state):
        state = OrderedDict((k[len("backbone."):], v) for k, v in state.items() if k.startswith("backbone."))
    return OrderedDict((k, v) for k, v in state.items() if not k.startswith("head."))


def load_mit_weights(mit: nn.Module, source) -> None:
    """Loads ImageNet weights into a ``MixVisionTransformer``.

    ``source`` is a path or an already-loaded dict, in the official layout (flat, or under
    ``state_dict``/``model``; ``head.*`` ignored) or the Hugging Face layout. Every encoder key
    must be present with the right shape and nothing else may remain; otherwise a ``RuntimeError``
    lists what was missing, unexpected or mis-shaped.
    """
    where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the given state dict"
    raw = read_weights_file(source) if isinstance(source, (str, os.PathLike)) else source
    state = _mit_encoder_state(state_dict_of(raw))
    _check_and_load(mit, state, where=where, allow_missing=())


def _is_bn_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _check_and_load(model: nn.Module, state: Mapping, where: str, allow_missing: Iterable[str]) -> list[str]:
    allow_missing = tuple(allow_missing)
    expected = model.state_dict()
    # inplace_abn < 1.1 (the MiB/PLOP era) stores no BN step counter; newer BN layers do.
    # The counter only matters for momentum=None, so its absence or presence is not an error.
    missing = [k for k in expected if k not in state and not _is_bn_counter(k)]
    unexpected = [k for k in state if k not in expected and not _is_bn_counter(k)]
    mis_shaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    allowed = [k for k in missing if k.startswith(allow_missing)] if allow_missing else []
    missing = [k for k in missing if k not in allowed]
    if missing or unexpected or mis_shaped:
        raise RuntimeError(_load_report(where, missing, unexpected, mis_shaped))
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return allowed


def _load_report(where: str, missing, unexpected, mis_shaped) -> str:
    def listing(title, keys):
        if not keys:
            return ""
        shown = "\n    ".join(keys[:20])
        more = f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else ""
        return f"\n  {title} ({len(keys)}):\n    {shown}{more}"

    hint = ""
    if any(k.startswith("salient_detector.") for k in unexpected):
        hint = (
            "\n  'salient_detector.*' comes from SATS's SSUL re-implementation, whose channel order "
            "(0 background, 1 unknown) differs from clovaai/SSUL's (0 unknown, 1 background) used here."
        )
    return (
        f"weights in {where} do not match the model"
        + listing("missing from the file", missing)
        + listing("unexpected in the file", unexpected)
        + listing("shape mismatches", mis_shaped)
        + hint
    )


def load_foreign_checkpoint(model: nn.Module, ckpt: Mapping, allow_missing: Iterable[str] = ()) -> list[str]:
    """Loads a MiB / PLOP / SATS checkpoint (or a bare state dict) into ``model`` strictly.

    ``ckpt`` is the loaded file (its ``model_state`` is used) or a state dict; the DDP ``module.``
    prefix is removed when every key has it. Names must then equal the model's (``body.*``,
    ``head.*``, ``cls.N.*``, ``scalar``), except BN ``num_batches_tracked`` counters, which may be
    absent on either side. ``allow_missing`` lists key prefixes that may be absent from the file
    (e.g. ``("cls.2.",)`` for the newest classifier when continuing a task); the keys that were
    allowed to be missing are returned. Anything else missing, unexpected or mis-shaped raises a
    ``RuntimeError`` listing it.
    """
    state = _strip_ddp_prefix(state_dict_of(ckpt))
    return _check_and_load(model, state, where="the checkpoint", allow_missing=allow_missing)
