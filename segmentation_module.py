"""The incremental segmentation network: backbone body, decoder head, one 1×1 classifier per step.

``make_model(opts, classes)`` builds SegFormer (``--model segformer_b0 … segformer_b5``;
``segformer`` = B2, SATS's model) or DeepLabV3 (``--model deeplab``, ``--backbone resnet50|101``)
and wraps it in ``IncrementalSegmentationModule``. Parameter names are the
originals' (``body.*``, ``head.*``, ``cls.N.*``, ``scalar``): SegFormer's encoder sits under
``body.mit.*`` and SATS's head under ``head.to_fused.*`` / ``head.to_segmentation.*``, DeepLab's
ResNet under ``body.mod*`` and the ASPP under ``head.*``; a MiB/PLOP/SATS ``model_state`` loads
strictly once the DDP ``module.`` prefix is removed (``utils.weights.load_foreign_checkpoint``).

Classifier channel layout (``classes`` = per-step class counts, step 0 including background):

- default: ``[n0, n1, …]`` → channel 0 background, channel k class k (task order);
- ``nb_background_modes = M > 1`` (PLOP): ``[M, n0 − 1, n1, …]``; the M background channels are
  fused into one logit, so the logits keep the default layout;
- SSUL (``opts.method == 'SSUL'`` or ``opts.unknown``), clovaai/SSUL's order
  ``[1, 1, n0 − 1, n1, …]`` → channel 0 **unknown**, channel 1
  background, channel k + 1 class k. (SATS's re-implementation swaps channels 0 and 1.)

Run ``python -m segmentation_module --profile`` for parameter counts and CPU forward times.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time
from types import SimpleNamespace
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models import load_resnet_imagenet, net_resnet50, net_resnet101
from models.mit import MIT_CONFIGS, MixVisionTransformer, mit_variant
from modules.norm_act import batch_norm_layer
from modules import DeeplabV3, make_norm_act
from modules.segformer_head import MLP_DECODER_DIMS, SATSHead, SegFormerMLPHead
from utils.weights import load_mit_weights, missing_pretrained_error, pretrained_path

__all__ = [
    "SEGFORMER_MODELS",
    "INTERMEDIATE_KEYS",
    "EXTRA_KEYS",
    "SegFormerBody",
    "IncrementalSegmentationModule",
    "classifier_layout",
    "make_model",
]

logger = logging.getLogger(__name__)

SEGFORMER_MODELS = ("segformer",) + tuple(f"segformer_{name[len('mit_'):]}" for name in MIT_CONFIGS)
SATS_HEAD_CHANNELS = 256
DEEPLAB_HEAD_CHANNELS = 256
INTERMEDIATE_KEYS = ("body", "pre_logits", "attentions", "featuremaps", "sem_logits_small")
EXTRA_KEYS = INTERMEDIATE_KEYS + ("attn_maps",)
ALIGN_ON = ("old", "background", "all")
MULTIMODAL_FUSIONS = ("sum", "mean", "max", "softmax")


class SegFormerBody(nn.Module):
    """Holds the MiT as ``self.mit`` so that its parameters are named ``body.mit.*`` as in SATS.

    ``forward(x)`` → the four stage outputs; ``forward(x, return_attentions=True)`` →
    ``(stage outputs, last-block attention map of each stage)``.
    """

    def __init__(self, mit: MixVisionTransformer):
        super().__init__()
        self.mit = mit
        self.out_channels = mit.out_channels
        self.stage_channels = mit.embed_dims

    def forward(self, x: torch.Tensor, return_attentions: bool = False):
        return self.mit(x, return_attentions=return_attentions, attention_blocks="last")


def classifier_layout(
    classes: Sequence[int], nb_background_modes: int = 1, base_weights: bool = False, unknown: bool = False
) -> list[int]:
    """Per-classifier output counts built from the per-step class counts (see the module docstring).

    ``base_weights`` keeps only the step-0 classifier (PLOP's ``--base_weights``).
    """
    classes = [int(c) for c in classes]
    if not classes or any(c < 1 for c in classes):
        raise ValueError(f"classes must be a non-empty list of positive counts, got {classes}")
    if nb_background_modes < 1:
        raise ValueError(f"nb_background_modes must be >= 1, got {nb_background_modes}")
    if unknown and nb_background_modes > 1:
        raise ValueError("the SSUL unknown channel and several background modes cannot be combined")
    if (unknown or nb_background_modes > 1) and classes[0] < 2:
        raise ValueError(f"step 0 needs background plus at least one class here, got classes[0] = {classes[0]}")
    if base_weights:
        classes = classes[:1]
    if nb_background_modes > 1:
        return [nb_background_modes, classes[0] - 1] + classes[1:]
    if unknown:
        return [1, 1, classes[0] - 1] + classes[1:]
    return classes


class IncrementalSegmentationModule(nn.Module):
    """body → head → one 1×1 conv per step, logits concatenated in class order and upsampled.

    ``forward(x, ret_intermediate=False, wants=None, only_bg=False)`` returns ``(logits, extras)``
    with logits (B, tot_classes', H, W) bilinearly upsampled (align_corners=False) to the input
    size (tot_classes' = tot_classes, minus M − 1 with M background modes). ``extras`` holds only
    what was asked: all of ``INTERMEDIATE_KEYS`` with ``ret_intermediate=True``, and each name in
    ``wants`` (any of ``EXTRA_KEYS``):

    - ``body``: stage-4 output (SegFormer) / mod5 output after activation (DeepLab);
    - ``pre_logits``: head output, the classifiers' input;
    - ``attentions``: POD's list, the four stage outputs (SegFormer) or the four pre-activation
      module sums (DeepLab), then ``pre_logits`` — a new list on every call;
    - ``featuremaps``: as in SATS, the four stage outputs (SegFormer) or ``attentions`` (DeepLab);
    - ``sem_logits_small``: logits at head resolution (H/4 SegFormer, H/OS DeepLab);
    - ``attn_maps`` (SegFormer only): the softmax attention of the last block of each stage,
      (B, heads_s, N_s, N'_s); the maps are only materialised when asked.

    With ``only_bg`` the logits are those of ``cls[0]`` alone (all background modes, unfused).
    """

    # what ``wants`` may name, and what ``ret_intermediate=True`` returns (a subclass may add keys)
    extra_keys = EXTRA_KEYS
    intermediate_keys = INTERMEDIATE_KEYS

    def __init__(
        self,
        body: nn.Module,
        head: nn.Module,
        head_channels: int,
        classes: Sequence[int],
        nb_background_modes: int = 1,
        multimodal_fusion: str = "sum",
        use_cosine: bool = False,
        cosine_legacy: bool = False,
        unknown: bool = False,
    ):
        super().__init__()
        classes = [int(c) for c in classes]
        if nb_background_modes > 1 and classes[0] != nb_background_modes:
            raise ValueError(f"with {nb_background_modes} background modes, classes[0] must be {nb_background_modes}")
        if nb_background_modes > 1 and use_cosine:
            raise ValueError("the cosine classifier does not support several background modes")
        if multimodal_fusion not in MULTIMODAL_FUSIONS:
            raise ValueError(f"unknown multimodal_fusion {multimodal_fusion!r}; choose from {MULTIMODAL_FUSIONS}")
        self.body = body
        self.head = head
        self.head_channels = head_channels
        self.is_segformer = isinstance(body, SegFormerBody)
        self.cls = nn.ModuleList(nn.Conv2d(head_channels, c, 1, bias=not use_cosine) for c in classes)
        self.classes = classes
        self.tot_classes = sum(classes)
        self.nb_background_modes = nb_background_modes
        self.multimodal_fusion = multimodal_fusion
        self.use_cosine = use_cosine
        self.cosine_legacy = cosine_legacy
        self.scalar = nn.Parameter(torch.tensor(1.0)) if use_cosine else None
        self.unknown = unknown
        self._bn_fixed = False

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ret_intermediate: bool = False, wants: Iterable[str] | None = None, only_bg: bool = False):
        requested = self._requested_extras(ret_intermediate, wants)
        fold = not only_bg and self._folds_classifier()
        features = self._features(x, with_attn_maps="attn_maps" in requested,
                                  project=self._classifier_map() if fold else None,
                                  plain=not fold or bool({"pre_logits", "attentions"} & set(requested)))
        if fold:
            small = features.pop("projected")
        elif only_bg:
            small = self.cls[0](features["pre_logits"])
        else:
            small = self._classify(features["pre_logits"])
        logits = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
        features["sem_logits_small"] = small
        return logits, {name: features[name] for name in requested}

    def _folds_classifier(self) -> bool:
        """SATS's head and plain 1×1 classifiers are all linear: the classifiers are folded into
        the head's per-stage maps (same function, ~C/256 of the head's work). Whoever reads the
        head output itself (POD) gets it computed beside the folded logits, which is still cheaper
        than classifying it (a 256 → C conv at stride 4, forward and backward)."""
        return isinstance(self.head, SATSHead) and not self.use_cosine and self.nb_background_modes == 1

    def _classifier_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All classifiers as one matrix (tot_classes × channels) and bias, in channel order."""
        weight = torch.cat([conv.weight.flatten(1) for conv in self.cls])
        return weight, torch.cat([conv.bias for conv in self.cls])

    def _requested_extras(self, ret_intermediate: bool, wants) -> list[str]:
        if isinstance(wants, str):
            wants = [wants]
        requested = list(self.intermediate_keys) if ret_intermediate else []
        for name in wants or ():
            if name not in self.extra_keys:
                raise ValueError(f"unknown extra {name!r}; the model can return {self.extra_keys}")
            if name not in requested:
                requested.append(name)
        if "attn_maps" in requested and not self.is_segformer:
            raise ValueError("'attn_maps' (encoder self-attention) exists only for SegFormer models, not DeepLab")
        return requested

    def _features(self, x: torch.Tensor, with_attn_maps: bool, project=None, plain: bool = True) -> dict:
        """The intermediate outputs; ``pre_logits`` is the head output (None unless ``plain``),
        ``projected`` the head with ``project`` folded in (SATS head only, None without)."""
        if x.dim() != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        attn_maps = None
        if self.is_segformer:
            if with_attn_maps:
                stages, attn_maps = self.body(x, return_attentions=True)
            else:
                stages = self.body(x)
            pre_logits = self.head(stages) if plain else None
            projected = self.head(stages, project=project) if project is not None else None
            body_out, pyramid, featuremaps = stages[-1], list(stages), list(stages)
        else:
            body_out, pyramid = self.body(x)
            pre_logits, projected = self.head(body_out), None
            pyramid = list(pyramid)
            featuremaps = pyramid + [pre_logits]
        return {
            "body": body_out,
            "pre_logits": pre_logits,
            "attentions": pyramid + [pre_logits],
            "featuremaps": featuremaps,
            "attn_maps": attn_maps,
            "projected": projected,
        }

    def _classify(self, pre_logits: torch.Tensor) -> torch.Tensor:
        outputs = []
        for step, conv in enumerate(self.cls):
            if step == 0 and self.nb_background_modes > 1:
                outputs.append(self._fuse_background_modes(conv(pre_logits)))
            elif self.use_cosine:
                outputs.append(self._cosine_logits(conv, pre_logits))
            else:
                outputs.append(conv(pre_logits))
        return torch.cat(outputs, dim=1)

    def _cosine_logits(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """scalar · ⟨x/‖x‖, w/‖w‖⟩ per pixel and class.

        ``cosine_legacy`` reproduces PLOP/SATS, which normalise only the weights and never apply
        ``scalar``: ⟨x, w/‖w‖⟩.
        """
        weight = F.normalize(conv.weight, p=2, dim=1)
        if self.cosine_legacy:
            return F.conv2d(x, weight)
        return self.scalar * F.conv2d(F.normalize(x, p=2, dim=1), weight)

    def _fuse_background_modes(self, modes: torch.Tensor) -> torch.Tensor:
        """One background logit from the M mode logits z: Σz, mean z, max z, or Σ softmax(z)·z."""
        if self.multimodal_fusion == "sum":
            return modes.sum(dim=1, keepdim=True)
        if self.multimodal_fusion == "mean":
            return modes.mean(dim=1, keepdim=True)
        if self.multimodal_fusion == "max":
            return modes.amax(dim=1, keepdim=True)
        return (modes.softmax(dim=1) * modes).sum(dim=1, keepdim=True)

    # ------------------------------------------------------- classifier updates
    def _new_classifier(self) -> tuple[nn.Conv2d, int]:
        if len(self.cls) < 2:
            raise RuntimeError("the model has a single classifier: there is no new step to initialise")
        return self.cls[-1], self.classes[-1]

    @torch.no_grad()
    def init_new_classifier(self) -> None:
        """MiB's balanced init: the old background probability is split over bg and the n new classes.

        New rows get w_bg and b_bg − log(n + 1); the background bias becomes b_bg − log(n + 1) too,
        so Σ exp over {bg, new} = exp(w_bg·x + b_bg) and each of them gets 1/(n + 1) of the old
        background probability. With M background modes, w_bg and b_bg are the sums over the modes
        and every mode's bias is reset. The cosine classifier copies weights only.
        """
        if self.unknown:
            raise RuntimeError("channel 0 is SSUL's unknown class here: use init_unknown_classifier()")
        new, n_new = self._new_classifier()
        background = self.cls[0]
        if self.nb_background_modes > 1:
            weight, bias = background.weight.sum(dim=0), background.bias.sum(dim=0)
        else:
            weight = background.weight[0]
            bias = None if self.use_cosine else background.bias[0]
        new.weight.copy_(weight.expand_as(new.weight))
        if self.use_cosine:
            return
        new_bias = bias - math.log(n_new + 1)
        new.bias.fill_(new_bias.item())
        if self.nb_background_modes > 1:
            background.bias.fill_(new_bias.item())
        else:
            background.bias[0] = new_bias

    @torch.no_grad()
    def init_unknown_classifier(self) -> None:
        """SSUL's weight transfer: every new row copies the unknown channel's weight and bias."""
        if not self.unknown:
            raise RuntimeError("this model has no SSUL unknown channel (build it with method SSUL or unknown=True)")
        new, _ = self._new_classifier()
        unknown = self.cls[0]
        new.weight.copy_(unknown.weight[0].expand_as(new.weight))
        if new.bias is not None:
            new.bias.fill_(unknown.bias[0].item())

    @torch.no_grad()
    def align_weight(self, on: str = "all") -> None:
        """Rescales the newest classifier: W_new ← W_new · mean‖w_old‖ / mean‖w_new‖ (rows' L2 norms).

        ``on`` picks the old rows: ``old`` (all but background), ``background`` (the background row
        only; PLOP/SATS also include every row of the intermediate classifiers there, a slip not
        reproduced), ``all``. Biases are unchanged.
        """
        if on not in ALIGN_ON:
            raise ValueError(f"align_weight on {on!r}; choose from {ALIGN_ON}")
        new, _ = self._new_classifier()
        rows = [conv.weight[:, :, 0, 0] for conv in self.cls[:-1]]
        if on == "old":
            rows[0] = rows[0][1:]
        elif on == "background":
            rows = [rows[0][:1]]
        old = torch.cat(rows).norm(dim=1)
        if old.numel() == 0:
            raise RuntimeError(f"align_weight({on!r}) found no old classifier rows")
        new.weight.mul_(old.mean() / new.weight[:, :, 0, 0].norm(dim=1).mean())

    # ------------------------------------------------------------ batch norm
    def _norm_layers(self):
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def fix_bn(self) -> None:
        """Freezes every BatchNorm/ABN layer: eval mode (running statistics) and no affine gradients.

        Unlike the originals, this survives later ``model.train()`` calls.
        """
        self._bn_fixed = True
        for layer in self._norm_layers():
            layer.eval()
            for parameter in layer.parameters(recurse=False):
                parameter.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self._bn_fixed:
            for layer in self._norm_layers():
                layer.eval()
        return self


# ---------------------------------------------------------------- construction
def _world_size(opts) -> int:
    return int(getattr(opts, "world_size", None) or 1)


def _load_pretrained(opts, load) -> None:
    if getattr(opts, "no_pretrained", False):
        return
    path = pretrained_path(opts)
    if not os.path.isfile(path):
        raise missing_pretrained_error(path, opts.model)
    load(path)
    logger.info("loaded ImageNet weights for --model %s from %s", opts.model, path)


def _build_segformer(opts) -> tuple[nn.Module, nn.Module, int]:
    variant = mit_variant(opts.model)
    body = SegFormerBody(MixVisionTransformer(**MIT_CONFIGS[variant]))
    _load_pretrained(opts, lambda path: load_mit_weights(body.mit, path))
    head_type = getattr(opts, "segformer_head", None) or "sats"
    if head_type == "sats":
        return body, SATSHead(body.stage_channels, SATS_HEAD_CHANNELS), SATS_HEAD_CHANNELS
    if head_type == "mlp":
        channels = MLP_DECODER_DIMS[variant]
        # synchronised BN with several processes: torch's on CUDA, the gloo-capable one on the CPU
        norm = batch_norm_layer(_world_size(opts), "cuda" if torch.cuda.is_available() else "cpu")
        return body, SegFormerMLPHead(body.stage_channels, channels, norm_layer=norm), channels
    raise ValueError(f"unknown --segformer_head {head_type!r}; choose 'sats' or 'mlp'")


def _build_deeplab(opts) -> tuple[nn.Module, nn.Module, int]:
    backbones = {"resnet50": net_resnet50, "resnet101": net_resnet101}
    backbone = getattr(opts, "backbone", "resnet101")
    if backbone not in backbones:
        raise ValueError(f"unknown --backbone {backbone!r}; choose from {tuple(backbones)}")
    norm_act = getattr(opts, "norm_act", "iabn_sync")
    output_stride = getattr(opts, "output_stride", 16)
    norm_layer = make_norm_act(norm_act, _world_size(opts))
    body = backbones[backbone](norm_act=norm_layer, output_stride=output_stride)
    _load_pretrained(opts, lambda path: load_resnet_imagenet(body, path))
    head = DeeplabV3(
        body.out_channels,
        DEEPLAB_HEAD_CHANNELS,
        256,
        out_stride=output_stride,
        norm_act=norm_layer,
        pooling_size=getattr(opts, "pooling", None),
    )
    return body, head, DEEPLAB_HEAD_CHANNELS


def uses_unknown_channel(opts) -> bool:
    """SSUL's layout (channel 0 unknown, 1 background) for ``--method SSUL`` or ``opts.unknown``."""
    return getattr(opts, "method", None) == "SSUL" or bool(getattr(opts, "unknown", False))


def make_model(opts, classes: Sequence[int]) -> IncrementalSegmentationModule:
    """Builds the network for ``opts.model`` with one classifier per step of ``classes``.

    ``classes`` are the per-step class counts (``tasks.get_per_task_classes``; step 0 includes
    background). ImageNet weights are loaded unless ``opts.no_pretrained`` (see
    ``utils.weights.pretrained_path``); a missing file is an error naming it.
    """
    if classes is None:
        raise ValueError("make_model needs the per-step class counts (tasks.get_per_task_classes)")
    import methods

    for component in methods.components():
        own = component.build_model(opts, classes)
        if own is not None:  # a method with its own network (e.g. sigmoid classifiers)
            return own
    model_name = opts.model
    if model_name in SEGFORMER_MODELS:
        body, head, head_channels = _build_segformer(opts)
    elif model_name == "deeplab":
        body, head, head_channels = _build_deeplab(opts)
    else:
        raise ValueError(f"unknown --model {model_name!r}; choose deeplab or one of {SEGFORMER_MODELS}")
    nb_modes = int(getattr(opts, "nb_background_modes", 1) or 1)
    layout = classifier_layout(
        classes,
        nb_background_modes=nb_modes,
        base_weights=bool(getattr(opts, "base_weights", False)),
        unknown=uses_unknown_channel(opts),
    )
    return IncrementalSegmentationModule(
        body,
        head,
        head_channels,
        layout,
        nb_background_modes=nb_modes,
        multimodal_fusion=getattr(opts, "multimodal_fusion", "sum") or "sum",
        use_cosine=bool(getattr(opts, "cosine", False)),
        cosine_legacy=bool(getattr(opts, "cosine_legacy", False)),
        unknown=uses_unknown_channel(opts),
    )


# ------------------------------------------------------------------- profile
PROFILE_MODELS = [(f"segformer_b{i}", {}) for i in range(6)] + [
    ("deeplab", {"backbone": "resnet50"}),
    ("deeplab", {"backbone": "resnet101"}),
]


def _profile_label(model_name: str, extra: dict) -> str:
    return f"{model_name}/{extra['backbone']}" if extra else model_name


def _profile_one(model_name: str, extra: dict, size: int, repeats: int) -> tuple[int, float]:
    opts = SimpleNamespace(
        model=model_name, no_pretrained=True, norm_act="iabn_sync", output_stride=16, pooling=32, **extra
    )
    model = make_model(opts, [21]).eval()
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 3, size, size)
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return params, statistics.median(times)


def profile(size: int = 512, repeats: int = 3, names: Sequence[str] | None = None) -> None:
    """Prints parameter count and median CPU forward time (batch 1, one warm-up) per model."""
    print(f"{'model':<20} {'params':>12} {'forward (s)':>12}   ({size}x{size}, batch 1, "
          f"median of {repeats}, {torch.get_num_threads()} threads)")
    for model_name, extra in PROFILE_MODELS:
        label = _profile_label(model_name, extra)
        if names and label not in names and model_name not in names:
            continue
        params, seconds = _profile_one(model_name, extra, size, repeats)
        print(f"{label:<20} {params:>12,} {seconds:>12.3f}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="print parameter counts and CPU forward times")
    parser.add_argument("--size", type=int, default=512, help="square input side for --profile")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per model (median reported)")
    parser.add_argument("--models", nargs="*", help="subset, e.g. segformer_b0 deeplab/resnet50")
    args = parser.parse_args(argv)
    if not args.profile:
        parser.error("nothing to do: pass --profile")
    profile(args.size, args.repeats, args.models)


if __name__ == "__main__":
    main()
