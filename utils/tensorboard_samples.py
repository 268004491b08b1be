"""Images for TensorBoard: prediction triplets (``--sample_num``) and, for SATS, the old and new
models' class-pooled self-attention maps (``--visualize``).

Both take a handful of fixed dataset indices, so the same images are shown after every validation.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from utils.logger import color_map, label_to_color

SR_RATIOS = (8, 4, 2, 1)  # MiT spatial-reduction ratio per stage (every size B0-B5)
MIN_PANEL_SIDE = 128  # px: attention maps are enlarged to at least this height to be readable
SEPARATOR_PX = 4  # white columns between the old and the new model's map


def sample_indices(n_images: int, sample_num: int, seed: int) -> list[int]:
    """``sample_num`` distinct indices drawn once with ``seed`` (the same on every rank)."""
    if sample_num <= 0 or n_images == 0:
        return []
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_images, generator=g)[: min(sample_num, n_images)].sort().values.tolist()


def _denormalize(image: torch.Tensor) -> np.ndarray:
    from dataset.transform import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image.cpu().float() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


@torch.no_grad()
def prediction_triplets(model, dataset, indices, device, predict, palette="voc") -> list[np.ndarray]:
    """One ``(H, 3W, 3)`` uint8 image per index: input | ground truth | prediction (palette colours)."""
    cmap = color_map(palette)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for idx in indices:
            image, label = dataset[idx][:2]
            logits, _ = model(image[None].to(device))
            prediction = predict(logits.float())[0].cpu()
            rows.append(np.concatenate(
                [_denormalize(image), label_to_color(label.long(), cmap), label_to_color(prediction, cmap)],
                axis=1))
    finally:
        model.train(was_training)
    return rows


def upscale_factor(height: int, width: int, min_side: int = MIN_PANEL_SIDE) -> int:
    """Smallest integer ``s >= 1`` with ``s * min(height, width) >= min_side``."""
    return max(1, -(-min_side // max(1, min(height, width))))


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = x - x.min()
    return x / x.max().clamp_min(1e-12)


@torch.no_grad()
def pooled_attention_panels(model, model_old, dataset, indices, device, legacy_layout=False):
    """For each image and each class in its label: per stage, the class-pooled attention row of the
    old and the new model (mean over heads), reshaped to the key grid and put side by side.

    Each map is min-max normalised and enlarged by nearest neighbour from its key grid to the
    stage's query grid ``(h, w)`` times ``upscale_factor(h, w)``, so one key cell stays a sharp
    block and the short side is at least ``MIN_PANEL_SIDE`` px; ``SEPARATOR_PX`` white columns
    separate old (left) and new (right). Returns ``[(tag, (H, W) float image in [0, 1]), ...]``
    with tags ``img{i}/class{c}/stage{s}``.
    """
    from utils.sats import class_pooled_attention, downscale_labels, infer_spatial_shapes

    panels = []
    for idx in indices:
        image, label = dataset[idx][:2]
        x = image[None].to(device)
        _, new = model(x, wants={"attn_maps"})
        _, old = model_old(x, wants={"attn_maps"})
        shapes = infer_spatial_shapes([a.shape[2] for a in new["attn_maps"]], tuple(label.shape))
        for stage, (a_new, a_old, (h, w)) in enumerate(zip(new["attn_maps"], old["attn_maps"], shapes)):
            small = downscale_labels(label[None].to(device), (h, w))
            p_new, _, classes = class_pooled_attention(a_new.float(), small, legacy_layout=legacy_layout)
            p_old, _, _ = class_pooled_attention(a_old.float(), small, classes=classes,
                                                 legacy_layout=legacy_layout)
            reduction = SR_RATIOS[stage]  # MiT's spatial reduction: keys on an (h/R, w/R) grid
            kh, kw = max(h // reduction, 1), max(w // reduction, 1)
            if kh * kw != a_new.shape[-1]:
                raise ValueError(f"stage {stage + 1}: {a_new.shape[-1]} keys do not form a {kh}x{kw} grid")
            scale = upscale_factor(h, w)
            for k, c in enumerate(classes.tolist()):
                maps = [p[0, k].mean(0).reshape(kh, kw) for p in (p_old, p_new)]
                maps = [F.interpolate(m[None, None], size=(h * scale, w * scale), mode="nearest")[0, 0]
                        for m in maps]
                separator = torch.ones(h * scale, SEPARATOR_PX, device=maps[0].device)
                panel = torch.cat([_normalise(maps[0]), separator, _normalise(maps[1])], dim=1)
                panels.append((f"img{idx}/class{c}/stage{stage + 1}", panel.cpu().numpy()))
    return panels
