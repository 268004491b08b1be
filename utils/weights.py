"""Pretrained weights and foreign checkpoints: where files are, which format, how keys map.

- ``pretrained_path(opts)``: the file the originals read (``{code_directory}/pretrained/mit_bX.pth``
  for SegFormer, ``{code_directory}/pretrained/{backbone}_{norm_act}.pth.tar`` for DeepLab), or
  ``--pretrained PATH``.
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
from typing import Iterable, Mapping

import torch
from torch import nn

from models.mit import mit_variant
from utils.checkpoint import load_checkpoint, strip_prefix

__all__ = [
    "MIT_WEIGHTS_HELP",
    "RESNET_WEIGHTS_HELP",
    "pretrained_path",
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


def pretrained_path(opts) -> str:
    """The ImageNet weights file for ``opts``: ``opts.pretrained`` if set, else the originals' path.

    SegFormer ``segformer_bX`` (``segformer`` = b2): ``{code_directory}/pretrained/mit_bX.pth``
    (SATS reads ``./pretrained/mit_b2.pth``; ``code_directory`` defaults to ``.``).
    DeepLab: ``{code_directory}/pretrained/{backbone}_{norm_act}.pth.tar`` (PLOP/SATS);
    ``iabn_sync_test`` reads the ``iabn_sync`` file, as in the originals.
    """
    explicit = getattr(opts, "pretrained", None)
    if explicit:
        return os.fspath(explicit)
    root = getattr(opts, "code_directory", None) or "."
    model = opts.model
    if model.startswith("segformer"):
        return os.path.join(root, "pretrained", f"{mit_variant(model)}.pth")
    if model == "deeplab":
        norm_act = "iabn_sync" if opts.norm_act == "iabn_sync_test" else opts.norm_act
        return os.path.join(root, "pretrained", f"{opts.backbone}_{norm_act}.pth.tar")
    raise ValueError(f"no pretrained weights are defined for --model {model!r}")


def missing_pretrained_error(path: str, model: str) -> FileNotFoundError:
    """The error raised when a pretrained file is absent: names the path, the source, the way out."""
    where = MIT_WEIGHTS_HELP if model.startswith("segformer") else RESNET_WEIGHTS_HELP
    return FileNotFoundError(
        f"pretrained weights for --model {model} not found: {path}. {where} Put the file at that path, "
        f"give another one with --pretrained PATH, or pass --no_pretrained to start from random weights."
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
