"""SATS self-attention transfer loss (Qiu et al., "SATS: Self-Attention Transfer for Continual
Semantic Segmentation", Pattern Recognition 138, 2023).

For every encoder stage s the new model's and the frozen old model's softmax attention maps
A_s of shape (B, heads, L_s, S_s) are compared (L_s = h_s * w_s query tokens in row-major order,
S_s keys after spatial reduction). The training labels (after pseudo-labelling: 0 background,
255 ignore) are downscaled to the stage grid exactly as PIL NEAREST does (``downscale_labels``), and for every image
j and every class c present at that stage (c not in {0, 255}) the attention rows of the class's
tokens are averaged ("class-specific region pooling"):

    P_s[j, c, h, :] = mean_{p : label_s[j, p] = c} A_s[j, h, p, :]

and the loss is

    L = mean_s  (1/B) sum_j  [V_js != {}] (1/|V_js|) sum_{c in V_js} (1/heads) sum_h
            || P^new_s[j, c, h, :] - P^old_s[j, c, h, :] ||_2

with V_js the pooled classes of image j at stage s; images without a pooled class contribute 0
but still count in B. The distance is the plain (unsquared) L2 norm over the keys, as the
published code (``torch.frobenius_norm(a - b, dim=-1)``). The mean over the 4 stages equals the
published ``/ 4``. The loss is returned unweighted (the SATS preset multiplies it by 20).

Variants (``--distill_object`` in the published code):

* ``sats-selfattn``     class-specific region pooling (above), the SATS method.
* ``sats-selfattn-GP``  global pooling: rows averaged over all positions per head,
  L = mean_s (1/B) sum_j (1/heads) sum_h || mean_p A^new - mean_p A^old ||_2.
* ``sats-selfattn-NP``  no pooling: per-token distance,
  L = mean_s (1/B) sum_j (1/heads) sum_h mean_p || A^new[j,h,p] - A^old[j,h,p] ||_2.
* ``sats-feature-CNN``  the class-region pooling applied to feature maps (B, C, h, w) (the
  "SATS on DeepLab" ablation): channel vectors averaged over a class's pixels, L2 over channels.
  The published code divides the sum over DeepLab's 5 maps by 4; here it is the mean over maps.

Layout: the published code views (B, heads, L, S) directly as (B, h, w, heads, S) without moving
the head axis, so for heads > 1 the row stored at slot (position p, head k) is the row of head
f // L and token f % L with f = p * heads + k (heads and positions mixed; each row is still a real
attention distribution, scrambled identically for both models). ``legacy_layout=True``
reproduces that; the default pairs each token with its own heads, as the paper intends. GP is
affected by the layout, NP is not (it averages over every (head, token) row), and feature maps
have no head axis (the switch has no effect on them).

Numerics: computed in float32 (float64 inputs stay float64) with autocast disabled. The L2 norm
is ``torch.linalg.vector_norm``, whose backward is x / ||x|| with the zero-norm case masked to a
zero gradient (a valid subgradient), so identical new/old maps give a finite (zero) gradient and
no epsilon biases the value.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from typing import Sequence

import torch

__all__ = [
    "VARIANTS",
    "sats_loss",
    "class_pooled_attention",
    "downscale_labels",
    "pil_nearest_indices",
    "mit_stage_shape",
    "infer_spatial_shapes",
]

VARIANTS = ("sats-selfattn", "sats-selfattn-GP", "sats-selfattn-NP", "sats-feature-CNN")
BACKGROUND = 0
IGNORE_INDEX = 255


# ----------------------------------------------------------------------------------------------
# Labels and stage grids
# ----------------------------------------------------------------------------------------------

def pil_nearest_indices(in_size: int, out_size: int) -> list[int]:
    """Source index of each output pixel in PIL's NEAREST resize along one axis.

    PIL (``ImagingScaleAffine``) walks the output with a double-precision accumulator
    ``x = s/2; x += s`` (s = in_size / out_size) and takes ``int(x)``: nominally
    floor((i + 0.5) * s). Python floats are the same IEEE doubles, so repeating the walk gives
    PIL's indices exactly, including the exact ties (e.g. 512 -> 170 at i = 127: PIL 383, nearest-exact 384) where
    ``F.interpolate(mode="nearest-exact")``, which evaluates floor((i + 0.5) * s) in float32,
    can pick the neighbour.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive; got {in_size} -> {out_size}")
    step = in_size / out_size
    position = step * 0.5
    indices = []
    for _ in range(out_size):
        indices.append(min(int(position), in_size - 1))
        position += step
    return indices


@functools.lru_cache(maxsize=64)
def _cached_indices(in_size: int, out_size: int) -> tuple[int, ...]:
    return tuple(pil_nearest_indices(in_size, out_size))


def downscale_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize integer label maps (B, H, W) to ``size`` = (h, w) exactly as PIL NEAREST does.

    Output pixel (i, j) takes source pixel (floor((i + 0.5) * H / h), floor((j + 0.5) * W / w))
    (the published code resized each label with PIL on the CPU). Here the index tables follow
    PIL's own arithmetic (``pil_nearest_indices``) and the whole batch is gathered on the labels'
    device. For integer ratios this equals ``F.interpolate(..., mode="nearest-exact")``.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W); got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor; got {labels.dtype}")
    height, width = labels.shape[-2:]
    out_h, out_w = int(size[0]), int(size[1])
    if (height, width) == (out_h, out_w):
        return labels.long()
    rows = torch.tensor(_cached_indices(height, out_h), device=labels.device)
    cols = torch.tensor(_cached_indices(width, out_w), device=labels.device)
    return labels.long().index_select(1, rows).index_select(2, cols)


def mit_stage_shape(height: int, width: int, stage: int) -> tuple[int, int]:
    """Token grid of MiT stage ``stage`` (0-based, stride 4 * 2**stage) for a (height, width) input.

    Stage 0's patch embedding is a 7x7 conv, stride 4, padding 3: h = floor((H - 1) / 4) + 1 =
    ceil(H / 4); each later stage is a 3x3 conv, stride 2, padding 1: h' = ceil(h / 2).
    """
    if stage < 0:
        raise ValueError(f"stage must be >= 0; got {stage}")
    h, w = -(-height // 4), -(-width // 4)
    for _ in range(stage):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


def infer_spatial_shapes(num_positions: Sequence[int], label_size: Sequence[int],
                         max_stage: int = 8) -> list[tuple[int, int]]:
    """Token grid (h_i, w_i) of each map from its number of query positions L_i.

    Map i is assumed to come from MiT stage i (grid ``mit_stage_shape(H, W, i)`` of the label size
    (H, W)); if that grid does not have L_i tokens, the other strides 4 * 2**k are tried. Raises
    ValueError when no stride fits (then pass ``spatial_shapes`` explicitly).
    """
    height, width = int(label_size[0]), int(label_size[1])
    shapes = []
    for i, positions in enumerate(num_positions):
        candidates = [i] + [k for k in range(max_stage) if k != i]
        for stage in candidates:
            h, w = mit_stage_shape(height, width, stage)
            if h * w == positions:
                shapes.append((h, w))
                break
        else:
            raise ValueError(
                f"cannot infer the token grid of map {i}: it has L={positions} query positions, "
                f"which matches no MiT stage (stride 4*2^k) of the {height}x{width} labels; "
                f"pass spatial_shapes=[(h, w), ...] explicitly")
    return shapes


def _present_classes(label_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sorted class ids (excluding background and ignore) present in any of the label maps."""
    counts = torch.bincount(torch.cat([m.reshape(-1) for m in label_maps]), minlength=IGNORE_INDEX + 1)
    counts[[BACKGROUND, IGNORE_INDEX]] = 0
    return counts.nonzero().flatten()


def _class_weights(labels_small: torch.Tensor, classes: torch.Tensor, dtype):
    """Averaging weights (B, K, L), 1/n_bk on the tokens of class k in image b, and n (B, K)."""
    masks = (labels_small.reshape(labels_small.shape[0], 1, -1) == classes.view(1, -1, 1)).to(dtype)
    counts = masks.sum(dim=-1)
    return masks / counts.clamp_min(1).unsqueeze(-1), counts


# ----------------------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------------------

def _head_major(attn: torch.Tensor, legacy_layout: bool) -> torch.Tensor:
    """Rows as (B, heads, L, S): slot [b, k, p] holds the row of token p, head k.

    With ``legacy_layout`` the memory is re-read as (B, L, heads, S) without moving the head axis
    (the published reshape), so slot [b, k, p] holds head f // L, token f % L with f = p * heads + k.
    """
    if legacy_layout:
        batch, heads, positions, keys = attn.shape
        return attn.reshape(batch, positions, heads, keys).transpose(1, 2)
    return attn


def _pool(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sums of rows (B, heads, L, S) by weights (B, K, L): (B, K, heads, S).

    One batched product per head, broadcasting the weights: the rows are never transposed or copied."""
    return torch.matmul(weights.unsqueeze(1), rows).transpose(1, 2)


def class_pooled_attention(attn: torch.Tensor, labels_small: torch.Tensor,
                           classes: torch.Tensor | None = None, legacy_layout: bool = False):
    """Class-specific region pooling of one stage's attention maps.

    Args:
        attn: (B, heads, L, S) softmax attention of one stage.
        labels_small: (B, h, w) or (B, L) labels already at the stage grid (h * w = L).
        classes: class ids to pool (1-D); default: those present, excluding 0 and 255.
        legacy_layout: pool the published (head/position-mixed) layout.

    Returns:
        ``(pooled, counts, classes)``: ``pooled[b, k, h, :]`` = mean of the rows of head h over
        the tokens of class ``classes[k]`` in image b (zeros where the class is absent),
        ``counts[b, k]`` = number of those tokens, ``classes`` the pooled ids (K,).
    """
    if attn.dim() != 4:
        raise ValueError(f"attn must be (B, heads, L, S); got shape {tuple(attn.shape)}")
    labels_flat = labels_small.reshape(labels_small.shape[0], -1).to(attn.device)
    if labels_flat.shape != (attn.shape[0], attn.shape[2]):
        raise ValueError(f"labels_small {tuple(labels_small.shape)} does not match the batch and "
                         f"the L={attn.shape[2]} positions of attn {tuple(attn.shape)}")
    if classes is None:
        classes = _present_classes([labels_flat])
    classes = classes.to(labels_flat.device)
    weights, counts = _class_weights(labels_flat, classes, attn.dtype)
    return _pool(_head_major(attn, legacy_layout), weights), counts, classes


def _l2(x: torch.Tensor) -> torch.Tensor:
    """L2 norm over the last axis (finite zero gradient at 0, see the module docstring)."""
    return torch.linalg.vector_norm(x, ord=2, dim=-1)


def _class_region_distance(diff_rows: torch.Tensor, labels_small: torch.Tensor,
                           classes: torch.Tensor) -> torch.Tensor:
    """Per-image loss (B,) from rows of new - old, (B, heads, L, S).

    Pooling is linear, so pooling the difference equals the difference of the pooled rows.
    """
    weights, counts = _class_weights(labels_small, classes, diff_rows.dtype)
    per_class = _l2(_pool(diff_rows, weights)).mean(dim=-1)  # (B, K): mean over heads
    present = (counts > 0).to(per_class.dtype)
    return (per_class * present).sum(dim=1) / present.sum(dim=1).clamp_min(1)


def _global_pooled_distance(diff_rows: torch.Tensor) -> torch.Tensor:
    """Per-image GP loss (B,): L2 of the position-averaged rows per head, mean over heads."""
    return _l2(diff_rows.mean(dim=2)).mean(dim=-1)


def _unpooled_distance(diff_rows: torch.Tensor) -> torch.Tensor:
    """Per-image NP loss (B,): per-token L2, mean over tokens and heads."""
    return _l2(diff_rows).mean(dim=(1, 2))


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_pairs(new_maps, old_maps, labels, variant):
    if variant not in VARIANTS:
        raise ValueError(f"unknown SATS variant {variant!r}; choose one of {VARIANTS}")
    if len(new_maps) != len(old_maps):
        raise ValueError(f"got {len(new_maps)} new maps but {len(old_maps)} old maps")
    if len(new_maps) == 0:
        raise ValueError("sats_loss needs at least one map per model")
    for i, (new, old) in enumerate(zip(new_maps, old_maps)):
        if new.dim() != 4:
            kind = "(B, C, h, w)" if variant == "sats-feature-CNN" else "(B, heads, L, S)"
            raise ValueError(f"map {i} must be {kind}; got shape {tuple(new.shape)}")
        if new.shape != old.shape:
            raise ValueError(f"map {i}: new shape {tuple(new.shape)} != old {tuple(old.shape)}")
    batch = new_maps[0].shape[0]
    if labels.dim() != 3 or labels.shape[0] != batch:
        raise ValueError(f"labels must be (B={batch}, H, W); got shape {tuple(labels.shape)}")


def _grids(new_maps, labels, variant, spatial_shapes):
    if variant == "sats-feature-CNN":
        grids = [tuple(m.shape[-2:]) for m in new_maps]
        if spatial_shapes is not None and [tuple(s) for s in spatial_shapes] != grids:
            raise ValueError(f"spatial_shapes {spatial_shapes} differ from the feature maps' {grids}")
        return grids
    positions = [m.shape[2] for m in new_maps]
    if spatial_shapes is None:
        return infer_spatial_shapes(positions, labels.shape[-2:])
    grids = [(int(h), int(w)) for h, w in spatial_shapes]
    if len(grids) != len(new_maps):
        raise ValueError(f"spatial_shapes has {len(grids)} entries for {len(new_maps)} maps")
    for i, ((h, w), n) in enumerate(zip(grids, positions)):
        if h * w != n:
            raise ValueError(f"spatial_shapes[{i}] = ({h}, {w}) but map {i} has L={n} positions")
    return grids


def _rows(new, old, variant, legacy_layout):
    """Rows (B, heads, L, S) of new - old; feature maps (B, C, h, w) become (B, 1, L, C)."""
    diff = new - old
    if variant == "sats-feature-CNN":
        return diff.flatten(2).transpose(1, 2).unsqueeze(1)
    return _head_major(diff, legacy_layout)


def sats_loss(attentions_new: Sequence[torch.Tensor], attentions_old: Sequence[torch.Tensor],
              labels: torch.Tensor, variant: str = "sats-selfattn", legacy_layout: bool = False,
              spatial_shapes: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Unweighted SATS loss (see the module docstring for the formulas).

    Args:
        attentions_new: per stage, the new model's attention (B, heads, L, S) (with gradients),
            or feature maps (B, C, h, w) for ``variant="sats-feature-CNN"``.
        attentions_old: the same from the frozen old model (computed under ``no_grad``).
        labels: (B, H, W) integer training labels after pseudo-labelling (0 bg, 255 ignore) at the
            input size; only the class variants read them.
        variant: one of ``VARIANTS``.
        legacy_layout: reproduce the published head/position-mixed reshape (``--sats_legacy_reshape``).
        spatial_shapes: optional token grid (h_i, w_i) per map; by default inferred from L_i and
            the labels' size with MiT's strides 4, 8, 16, 32.

    Returns:
        A 0-dim float32 (float64 for float64 inputs) tensor.
    """
    _check_pairs(attentions_new, attentions_old, labels, variant)
    device = attentions_new[0].device
    dtype = _compute_dtype(attentions_new[0].dtype)
    batch = attentions_new[0].shape[0]
    class_pooling = variant in ("sats-selfattn", "sats-feature-CNN")

    with torch.autocast(device_type=device.type, enabled=False):
        if class_pooling:
            grids = _grids(attentions_new, labels, variant, spatial_shapes)
            label_maps = [downscale_labels(labels.to(device), g).flatten(1) for g in grids]
            classes = _present_classes(label_maps)
        per_stage = []
        for i, (new, old) in enumerate(zip(attentions_new, attentions_old)):
            rows = _rows(new.to(dtype), old.to(dtype), variant, legacy_layout)
            if class_pooling:
                per_image = _class_region_distance(rows, label_maps[i], classes)
            elif variant == "sats-selfattn-GP":
                per_image = _global_pooled_distance(rows)
            else:
                per_image = _unpooled_distance(rows)
            per_stage.append(per_image.sum() / batch)
        return torch.stack(per_stage).mean()


# ----------------------------------------------------------------------------------------------
# Benchmark: python -m utils.sats --bench
# ----------------------------------------------------------------------------------------------

def _random_attention(batch, heads, positions, keys, device, requires_grad):
    logits = torch.randn(batch, heads, positions, keys, device=device)
    attn = logits.softmax(dim=-1)
    return attn.requires_grad_(requires_grad)


def _blob_labels(batch, size, num_classes, device):
    """Labels with ``num_classes`` foreground classes in vertical bands, some ignore, some bg."""
    height, width = size
    columns = torch.arange(width, device=device)
    band = (columns * (num_classes + 1)) // width  # 0 = background band
    labels = band.view(1, 1, width).expand(batch, height, width).clone()
    labels[:, : height // 16] = IGNORE_INDEX
    return labels


def benchmark(size=256, batch=4, class_counts=(1, 5, 20), repeats=10, device="cpu"):
    """Forward+backward time of sats_loss on SegFormer-B0-like maps (heads 1/2/5/8, sr 8/4/2/1)."""
    device = torch.device(device)
    heads, reductions = (1, 2, 5, 8), (8, 4, 2, 1)
    results = {}
    for num_classes in class_counts:
        new_maps, old_maps = [], []
        for stage, (h, r) in enumerate(zip(heads, reductions)):
            gh, gw = mit_stage_shape(size, size, stage)
            keys = math.ceil(gh / r) * math.ceil(gw / r)
            new_maps.append(_random_attention(batch, h, gh * gw, keys, device, True))
            old_maps.append(_random_attention(batch, h, gh * gw, keys, device, False))
        labels = _blob_labels(batch, (size, size), num_classes, device)
        timings = []
        for _ in range(repeats + 2):
            for m in new_maps:
                m.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            sats_loss(new_maps, old_maps, labels).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - start)
        timings = sorted(timings[2:])
        results[num_classes] = timings[len(timings) // 2]
    return results


def _main():
    parser = argparse.ArgumentParser(description="SATS loss utilities")
    parser.add_argument("--bench", action="store_true", help="time forward+backward of sats_loss")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not args.bench:
        parser.print_help()
        return
    results = benchmark(args.size, args.batch, repeats=args.repeats, device=args.device)
    print(f"sats_loss forward+backward, segformer_b0-like maps, {args.size}px, batch {args.batch}, "
          f"device {args.device}, threads {torch.get_num_threads()} (median of {args.repeats})")
    for num_classes, seconds in results.items():
        print(f"  {num_classes:3d} classes present: {seconds * 1e3:8.2f} ms")


if __name__ == "__main__":
    _main()
