"""DKD's network: per-class sigmoid channels, no background channel, an auxiliary classifier.

``build_dkd_model(opts, classes)`` takes the usual per-step class counts (``classes[0]`` counts
background) and builds

- ``cls = [aux (1 channel), step-0 classes (classes[0] − 1), step-1 classes, …]``: channel 0 is
  the auxiliary score, channel k class k, every channel an independent sigmoid;
- ``--model deeplab``: the ``--norm_act`` ResNet (``std`` = BatchNorm + ReLU, DKD's) with
  torchvision's dilation pattern (the first block of a dilated stage keeps the previous stage's
  dilation), backbone BN momentum 0.01, and the torchvision-style ASPP of
  :class:`modules.aspp_tv.TorchvisionASPP` (BN/ReLU, dropout 0.1, extra 3×3 block);
- ``--model segformer_*``: MiT and the ``--segformer_head`` decoder, the classifiers reading the
  decoder's output. With ``--segformer_head mlp`` that output ends in BN + ReLU (+ dropout), so
  it is non-negative as DeepLab's and the positive/negative evidence keeps its meaning; SATS's
  head is linear and its output signed (the same formulas apply).

The auxiliary classifier reads the features *detached*: its loss trains nothing else. At steps
> 0 :meth:`DKDSegmentationModule.freeze_bn_and_dropout` puts every BatchNorm and dropout layer in
eval mode for good (later ``train()`` calls keep them there).
"""
from __future__ import annotations

from functools import partial
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models import net_resnet50, net_resnet101
from models.resnet import MODULE_DILATIONS, load_resnet_imagenet
from modules.aspp_tv import TorchvisionASPP
from modules.norm_act import SyncABN, batch_norm_layer, make_norm_act
from segmentation_module import (INTERMEDIATE_KEYS, SEGFORMER_MODELS, IncrementalSegmentationModule,
                                 _build_segformer, _load_pretrained, _world_size)
from utils.dkd import EVIDENCE_KEYS, EVIDENCE_NEG, EVIDENCE_POS, decomposed_evidence, init_new_classifier_from_aux

__all__ = [
    "DKD_EXTRA_KEYS",
    "BACKBONE_BN_MOMENTUM",
    "dkd_classifier_layout",
    "DKDSegmentationModule",
    "torchvision_dilations",
    "build_dkd_model",
    "memory_labelling_model",
]

DKD_EXTRA_KEYS = INTERMEDIATE_KEYS + ("attn_maps",) + EVIDENCE_KEYS
BACKBONE_BN_MOMENTUM = 0.01
HEAD_CHANNELS = 256


def dkd_classifier_layout(classes: Sequence[int]) -> list[int]:
    """``[n0, n1, …]`` (step 0 counting background) → DKD's ``[1, n0 − 1, n1, …]``: the
    auxiliary channel takes background's place, so channel k is still class k."""
    classes = [int(c) for c in classes]
    if not classes or classes[0] < 2 or any(c < 1 for c in classes[1:]):
        raise ValueError(f"classes must be per-step counts with background plus at least one class at "
                         f"step 0, got {classes}")
    return [1, classes[0] - 1] + classes[1:]


class DKDSegmentationModule(IncrementalSegmentationModule):
    """body → head → ``cls`` (auxiliary on detached features, then one 1×1 conv per step).

    ``forward(x, ret_intermediate=False, wants=None)`` returns ``(logits, extras)``: logits
    (B, 1 + Σ classes, H, W) upsampled bilinearly (align_corners=False) to the input size;
    ``extras`` holds what was asked (``ret_intermediate``: all of ``INTERMEDIATE_KEYS`` and the
    evidence), names from ``DKD_EXTRA_KEYS``:

    - ``body``, ``pre_logits``, ``attentions``, ``featuremaps``, ``sem_logits_small``,
      ``attn_maps``: as :class:`segmentation_module.IncrementalSegmentationModule`;
    - ``evidence_pos`` / ``evidence_neg``: (B, Σ classes, h, w) at the head's resolution, one
      channel per class (the auxiliary one excluded), ``Σ_d max(W_kd, 0)·f_d`` and
      ``Σ_d min(W_kd, 0)·f_d`` on the head output f, without bias (``utils.dkd.decomposed_evidence``).

    ``classes`` is DKD's layout (:func:`dkd_classifier_layout`). New classifiers get
    Kaiming-normal weights (fan_in, gain √2) and PyTorch's default bias.
    """

    extra_keys = DKD_EXTRA_KEYS
    intermediate_keys = INTERMEDIATE_KEYS + EVIDENCE_KEYS

    def __init__(self, body: nn.Module, head: nn.Module, head_channels: int, classes: Sequence[int]):
        classes = [int(c) for c in classes]
        if len(classes) < 2 or classes[0] != 1:
            raise ValueError(f"DKD's classifier layout starts with the 1-channel auxiliary classifier, got {classes}")
        super().__init__(body, head, head_channels, classes)
        self._dropout_fixed = False
        for conv in self.cls:
            nn.init.kaiming_normal_(conv.weight)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ret_intermediate: bool = False, wants: Iterable[str] | None = None):
        requested = self._requested_extras(ret_intermediate, wants)
        features = self._features(x, with_attn_maps="attn_maps" in requested)
        pre_logits = features["pre_logits"]
        small = torch.cat([self.cls[0](pre_logits.detach())] + [conv(pre_logits) for conv in self.cls[1:]], dim=1)
        features["sem_logits_small"] = small
        if set(EVIDENCE_KEYS) & set(requested):
            features[EVIDENCE_POS], features[EVIDENCE_NEG] = decomposed_evidence(pre_logits, self.class_weights())
        logits = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits, {name: features[name] for name in requested}

    def class_weights(self) -> torch.Tensor:
        """The weights of every class channel (auxiliary excluded), (Σ classes, D, 1, 1)."""
        return torch.cat([conv.weight for conv in self.cls[1:]])

    # ------------------------------------------------------- classifier updates
    @torch.no_grad()
    def init_new_classifier(self) -> None:
        """DKD's init: every new row copies the auxiliary classifier's weight and bias."""
        init_new_classifier_from_aux(self)

    # ------------------------------------------------------------ freezing
    def _dropout_layers(self):
        # every _DropoutNd: SegFormer's decoder uses Dropout2d, not a subclass of nn.Dropout
        return [m for m in self.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]

    def fix_dropout(self) -> None:
        """Puts every dropout layer in eval mode; later ``train()`` calls keep it there.
        (MiT's DropPath is not a dropout layer and stays active.)"""
        self._dropout_fixed = True
        for layer in self._dropout_layers():
            layer.eval()

    def freeze_bn_and_dropout(self) -> None:
        """DKD at steps > 0: BatchNorm frozen (running statistics, no affine gradients) and dropout off."""
        self.fix_bn()
        self.fix_dropout()

    def train(self, mode: bool = True):
        super().train(mode)
        if self._dropout_fixed:
            for layer in self._dropout_layers():
                layer.eval()
        return self


# ---------------------------------------------------------------- construction
def _head_norm_layer(world_size: int):
    return batch_norm_layer(world_size, "cuda" if torch.cuda.is_available() else "cpu")


def _backbone_norm_act(name: str, world_size: int):
    """``--norm_act`` layers; ``std`` (BatchNorm + ReLU) is synchronised across processes under
    DDP as DKD's SyncBatchNorm is."""
    if name == "std" and world_size > 1:
        return partial(SyncABN, activation="relu", abs_weight=False)
    return make_norm_act(name, world_size)


def torchvision_dilations(body: nn.Module) -> None:
    """Gives the project's ResNet torchvision's ``replace_stride_with_dilation`` pattern.

    Both bodies dilate the stages that no longer stride (mod5 at OS16; mod4 and mod5 at OS8);
    torchvision's first block of such a stage keeps the previous stage's dilation in its 3×3
    conv, where the MiB-style body uses the new one. Padding follows the dilation, so shapes and
    parameters are unchanged.
    """
    dilations = MODULE_DILATIONS[body.output_stride]
    previous = 1
    for module, dilation in zip(body.residual_modules(), dilations):
        if dilation > 1:
            conv = module.block1.convs.conv2
            conv.dilation = (previous, previous)
            conv.padding = (previous, previous)
        previous = dilation


def _build_deeplab(opts):
    backbones = {"resnet50": net_resnet50, "resnet101": net_resnet101}
    backbone = getattr(opts, "backbone", "resnet101")
    if backbone not in backbones:
        raise ValueError(f"unknown --backbone {backbone!r}; choose from {tuple(backbones)}")
    output_stride = getattr(opts, "output_stride", 16)
    world = _world_size(opts)
    body = backbones[backbone](norm_act=_backbone_norm_act(getattr(opts, "norm_act", "std"), world),
                               output_stride=output_stride)
    torchvision_dilations(body)
    _load_pretrained(opts, lambda path: load_resnet_imagenet(body, path))
    for module in body.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = BACKBONE_BN_MOMENTUM
    head = TorchvisionASPP(body.out_channels, HEAD_CHANNELS, HEAD_CHANNELS, output_stride,
                           norm_layer=_head_norm_layer(world))
    return body, head, HEAD_CHANNELS


def build_dkd_model(opts, classes: Sequence[int]) -> DKDSegmentationModule:
    """DKD's network for ``opts.model`` (see the module docstring) with one classifier per step of
    ``classes`` (``tasks.get_per_task_classes``: step 0 counts background) plus the auxiliary one.

    Reads ``model``, ``backbone``, ``norm_act``, ``output_stride``, ``segformer_head``,
    ``no_pretrained``, ``pretrained``, ``code_directory`` and ``world_size`` from ``opts``. A missing
    ImageNet file is an error naming it (``--pretrained PATH`` or ``--no_pretrained``); DKD's
    DeepLab numbers use torchvision's ``resnet101-63fe2227.pth`` with ``--norm_act std``.
    """
    layout = dkd_classifier_layout(classes)
    if opts.model in SEGFORMER_MODELS:
        body, head, channels = _build_segformer(opts)
    elif opts.model == "deeplab":
        body, head, channels = _build_deeplab(opts)
    else:
        raise ValueError(f"unknown --model {opts.model!r}; choose deeplab or one of {SEGFORMER_MODELS}")
    return DKDSegmentationModule(body, head, channels, layout)


def memory_labelling_model(model_old, opts, old_classes: Sequence[int], legacy: bool = False):
    """The model that pseudo-labels DKD-M's memory candidates.

    Default: ``model_old``, the previous step's model with its trained weights. ``legacy``
    reproduces the published order of operations, where the candidates were labelled before those
    weights were loaded: a freshly built model (ImageNet backbone, random head and classifiers) of
    the previous step's classes ``old_classes``, in eval mode.
    """
    if not legacy:
        if model_old is None:
            raise ValueError("memory_labelling_model needs the previous step's model (its weights loaded)")
        return model_old
    device = next(model_old.parameters()).device if model_old is not None else torch.device("cpu")
    return build_dkd_model(opts, old_classes).to(device).eval()
