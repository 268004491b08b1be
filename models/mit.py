"""Mix Transformer (MiT) encoders B0-B5 of SegFormer (Xie et al., NeurIPS 2021).

Layer layout, hyper-parameters and parameter names follow the official release
(NVlabs/SegFormer ``mix_transformer.py``), so its ImageNet checkpoints ``mit_bX.pth``
load key for key (see ``utils.weights.load_mit_weights``).

Per stage s (C channels, h heads, reduction ratio R):

    tokens = LN_1e-5(flatten(PatchConv_s(x)))                       overlapping patch embedding
    for each block:  t = t + DropPath(Attn(LN_1e-6(t)))
                     t = t + DropPath(MixFFN(LN_1e-6(t)))
    stage output = reshape(LN_1e-6(t)) -> (B, C, H_s, W_s)          also the next stage's input

    Attn(t)   = proj(softmax(q kᵀ / √d) v),   q = W_q t,  [k, v] = W_kv LN_1e-5(SR_R(t)),  d = C / h
    MixFFN(t) = fc2(GELU(DWConv3x3(fc1(t))))

``SR_R`` is an R×R, stride-R convolution (identity when R = 1), so the key/value sequence has
(H_s/R)·(W_s/R) tokens. Attention probabilities are materialised only for the blocks whose maps
are requested; every other block runs ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

__all__ = [
    "MixVisionTransformer",
    "MIT_CONFIGS",
    "mit_b0",
    "mit_b1",
    "mit_b2",
    "mit_b3",
    "mit_b4",
    "mit_b5",
    "mit_variant",
]

# Official per-variant settings. The heads, reduction ratios and the MLP
# ratio of 4 are common to every variant (the paper's 8/8/4/4 ratios do not match the checkpoints).
MIT_CONFIGS = {
    "mit_b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "mit_b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "mit_b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "mit_b3": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "mit_b4": dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "mit_b5": dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
}
NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
DROP_PATH_RATE = 0.1
# Block and stage norms use eps 1e-6; the patch-embedding and spatial-reduction norms keep
# LayerNorm's default 1e-5. The released weights were trained with exactly this mix.
BLOCK_NORM_EPS = 1e-6


class OverlapPatchEmbed(nn.Module):
    """Strided convolution with padding k//2 (patches overlap), then LayerNorm over channels.

    Output grid: floor((H + 2·(k//2) − k) / stride) + 1 per axis.
    """

    def __init__(self, in_channels: int, embed_dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size, stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        grid = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from an R×R-strided reduction of the tokens.

    softmax(q kᵀ · d^-½) v with q: (B, h, N, d) and k, v: (B, h, N', d), N' = (H/R)(W/R).
    The ``kv`` projection holds all key channels first, then all value channels.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def _reduced_tokens(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.sr_ratio == 1:
            return x
        batch, _, channels = x.shape
        spatial = x.transpose(1, 2).reshape(batch, channels, *grid)
        return self.norm(self.sr(spatial).flatten(2).transpose(1, 2))

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int], need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (output (B, N, C), attention probabilities (B, h, N, N') or None)."""
        batch, tokens, channels = x.shape
        q = self.q(x).reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(self._reduced_tokens(x, grid))
        k, v = kv.reshape(batch, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if need_weights:
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            out = attn @ v
        else:
            # Fused kernel: never materialises the (B, h, N, N') probabilities.
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, tokens, channels)
        return self.proj(out), attn


class DWConv(nn.Module):
    """Depth-wise 3×3 convolution applied to a token sequence laid out on its (H, W) grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, _, channels = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(batch, channels, *grid))
        return x.flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """fc2(GELU(DWConv(fc1(x)))): the 3×3 depth-wise conv stands in for positional encoding."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), grid)))


class MiTBlock(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MixFFN(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int], need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, attn = self.attn(self.norm1(x), grid, need_weights)
        x = x + self.drop_path(attn_out)
        x = x + self.drop_path(self.mlp(self.norm2(x), grid))
        return x, attn


def _linspace(start: float, stop: float, count: int) -> list[float]:
    """``torch.linspace(start, stop, count).tolist()`` in plain Python (works under a meta device)."""
    if count == 1:
        return [start]
    return [start + (stop - start) * i / (count - 1) for i in range(count)]


def _init_official(module: nn.Module) -> None:
    """SegFormer's init: Linear trunc_normal(0.02)/0, LayerNorm 1/0, Conv normal(0, √(2/fan_out))/0."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MixVisionTransformer(nn.Module):
    """Hierarchical MiT encoder with four stages at strides 4, 8, 16 and 32.

    Submodules are registered in the official order (``patch_embed1..4``, then ``block1``,
    ``norm1``, ``block2``, ``norm2``, ...), so ``state_dict()`` names and order equal those of
    the released checkpoints. Stochastic-depth rates grow linearly from 0 to
    ``drop_path_rate`` over all blocks of all stages.

    ``forward(x)`` returns the list of the four stage outputs (B, C_s, H_s, W_s); with
    ``return_attentions=True`` it returns ``(features, attentions)``. ``attention_blocks``
    chooses which maps (post-softmax, shape (B, h_s, H_s·W_s, (H_s/R_s)·(W_s/R_s)), query
    tokens in row-major order) are kept:

    - ``"last"`` (default): ``attentions[s]`` is the map of the last block of stage s (SATS);
    - ``"all"``: ``attentions[s]`` is the list of the maps of every block of stage s;
    - an iterable of (stage, block) pairs (0-based; negative block indices count from the end):
      a dict mapping each normalised (stage, block) pair to its map.

    Only the requested blocks hold a (B, h, N, N') tensor; the others use the fused kernel.
    Any input size works; sizes divisible by 32 give exact strides (H/4, H/8, H/16, H/32).
    """

    def __init__(
        self,
        embed_dims: Iterable[int],
        depths: Iterable[int],
        num_heads: Iterable[int] = NUM_HEADS,
        sr_ratios: Iterable[int] = SR_RATIOS,
        mlp_ratio: int = MLP_RATIO,
        drop_path_rate: float = DROP_PATH_RATE,
        in_channels: int = 3,
    ):
        super().__init__()
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.sr_ratios = tuple(sr_ratios)
        for name, value in (("depths", self.depths), ("num_heads", self.num_heads), ("sr_ratios", self.sr_ratios)):
            if len(value) != len(self.embed_dims):
                raise ValueError(f"{name} has {len(value)} entries; embed_dims has {len(self.embed_dims)}")
        self.num_stages = len(self.embed_dims)
        self.out_channels = self.embed_dims[-1]

        stage_inputs = (in_channels,) + self.embed_dims[:-1]
        for s in range(self.num_stages):
            kernel, stride = (7, 4) if s == 0 else (3, 2)
            self.add_module(f"patch_embed{s + 1}", OverlapPatchEmbed(stage_inputs[s], self.embed_dims[s], kernel, stride))

        rates = _linspace(0.0, drop_path_rate, sum(self.depths))
        for s in range(self.num_stages):
            first = sum(self.depths[:s])
            blocks = nn.ModuleList(
                MiTBlock(self.embed_dims[s], self.num_heads[s], self.sr_ratios[s], mlp_ratio, rates[first + i])
                for i in range(self.depths[s])
            )
            self.add_module(f"block{s + 1}", blocks)
            self.add_module(f"norm{s + 1}", nn.LayerNorm(self.embed_dims[s], eps=BLOCK_NORM_EPS))

        self.apply(_init_official)

    def stage(self, s: int) -> tuple[OverlapPatchEmbed, nn.ModuleList, nn.LayerNorm]:
        """(patch embedding, blocks, output norm) of stage s (0-based)."""
        return getattr(self, f"patch_embed{s + 1}"), getattr(self, f"block{s + 1}"), getattr(self, f"norm{s + 1}")

    def requested_blocks(self, attention_blocks) -> set[tuple[int, int]]:
        """Normalises an ``attention_blocks`` request to a set of 0-based (stage, block) pairs."""
        if attention_blocks == "last":
            return {(s, self.depths[s] - 1) for s in range(self.num_stages)}
        if attention_blocks == "all":
            return {(s, b) for s in range(self.num_stages) for b in range(self.depths[s])}
        if isinstance(attention_blocks, str):
            raise ValueError(f"attention_blocks must be 'last', 'all' or (stage, block) pairs, not {attention_blocks!r}")
        pairs = set()
        for pair in attention_blocks:
            stage, block = pair
            if not 0 <= stage < self.num_stages:
                raise ValueError(f"stage {stage} out of range 0..{self.num_stages - 1} in attention_blocks")
            depth = self.depths[stage]
            if not -depth <= block < depth:
                raise ValueError(f"block {block} out of range for stage {stage} with {depth} blocks")
            pairs.add((stage, block % depth))
        return pairs

    def forward(self, x: torch.Tensor, return_attentions: bool = False, attention_blocks="last"):
        keep = self.requested_blocks(attention_blocks) if return_attentions else set()
        features, maps = [], {}
        for s in range(self.num_stages):
            patch_embed, blocks, norm = self.stage(s)
            tokens, grid = patch_embed(x)
            for b, block in enumerate(blocks):
                tokens, attn = block(tokens, grid, need_weights=(s, b) in keep)
                if attn is not None:
                    maps[(s, b)] = attn
            x = norm(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, *grid).contiguous()
            features.append(x)
        if not return_attentions:
            return features
        return features, self._arrange_maps(maps, attention_blocks)

    def _arrange_maps(self, maps: dict, attention_blocks):
        if attention_blocks == "last":
            return [maps[(s, self.depths[s] - 1)] for s in range(self.num_stages)]
        if attention_blocks == "all":
            return [[maps[(s, b)] for b in range(self.depths[s])] for s in range(self.num_stages)]
        return maps


def mit_variant(model: str) -> str:
    """The MiT behind a ``--model`` name: ``segformer_bX`` → ``mit_bX``; ``segformer`` → ``mit_b2`` (SATS)."""
    if model == "segformer":
        return "mit_b2"
    if model.startswith("segformer_") and f"mit_{model[len('segformer_'):]}" in MIT_CONFIGS:
        return f"mit_{model[len('segformer_'):]}"
    raise ValueError(f"unknown SegFormer model {model!r}; choose segformer or segformer_b0 ... segformer_b5")


def _build(name: str, **kwargs) -> MixVisionTransformer:
    return MixVisionTransformer(**MIT_CONFIGS[name], **kwargs)


def mit_b0(**kwargs) -> MixVisionTransformer:
    """MiT-B0: dims 32/64/160/256, depths 2/2/2/2 (3.3 M parameters)."""
    return _build("mit_b0", **kwargs)


def mit_b1(**kwargs) -> MixVisionTransformer:
    """MiT-B1: dims 64/128/320/512, depths 2/2/2/2 (13.2 M parameters)."""
    return _build("mit_b1", **kwargs)


def mit_b2(**kwargs) -> MixVisionTransformer:
    """MiT-B2: dims 64/128/320/512, depths 3/4/6/3 (24.2 M parameters); SATS's encoder."""
    return _build("mit_b2", **kwargs)


def mit_b3(**kwargs) -> MixVisionTransformer:
    """MiT-B3: dims 64/128/320/512, depths 3/4/18/3 (44.1 M parameters)."""
    return _build("mit_b3", **kwargs)


def mit_b4(**kwargs) -> MixVisionTransformer:
    """MiT-B4: dims 64/128/320/512, depths 3/8/27/3 (60.8 M parameters)."""
    return _build("mit_b4", **kwargs)


def mit_b5(**kwargs) -> MixVisionTransformer:
    """MiT-B5: dims 64/128/320/512, depths 3/6/40/3 (81.4 M parameters)."""
    return _build("mit_b5", **kwargs)
