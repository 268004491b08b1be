"""PLOP's POD (pooled outputs distillation): ``features_distillation`` and its pieces.

PLOP distils, for each feature map of the old and new models, pooled summaries of the squared
activations (the "local" pyramid: per window of each scale, the means over width and over height)
with an L2 distance per image. Reproduced as PLOP computes it,
including its quirks (see ``features_distillation``); ``utils.loss`` re-exports every public name.

All computations run in float32 (inputs are cast with ``.float()``), so AMP runs keep the
distillation exact.
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from utils.reduce import channel_argmax, sum_groups

__all__ = [
    "PodMapOptions",
    "resolve_pod_options",
    "spatial_pod",
    "global_pod",
    "local_pod",
    "features_distillation",
]


_COLLAPSES = ("spatial", "global", "local")
_PREPROS = ("pow", "none", "abs", "relu")
_EXTRA_CHANNELS = ("sum", "trim")
_DIFFERENCES = ("frobenius", "l1")
_APPLY_MASKS = ("background", "old")
_MASK_POSITIONS = ("last", "all")
_NORMALIZE_PER_SCALE = (False, True, "spm")

_BEFORE_KEYS = frozenset({"type", "factor", "norm", "prepro", "use_adaptative_factor"})
_AFTER_KEYS = _BEFORE_KEYS | {"apply_mask", "upscale_mask_topk", "extra_channels", "spp_scales",
                              "use_pod_schedule"}
_SWITCH_KEYS = frozenset({"before", "after", "mask_position", "normalize_per_scale"})
_TOP_KEYS = frozenset({"switch", "pool", "difference_function", "difference_function_all"})


@dataclass(frozen=True)
class PodMapOptions:
    """The POD settings that apply to one feature map (see ``resolve_pod_options``)."""

    collapse: str                 # "spatial" | "global" | "local"
    factor: float                 # weight of this map's distance; maps with factor <= 0 are skipped
    normalize: bool               # L2-normalise the pooled embeddings (``"norm"`` key)
    prepro: str                   # "pow" | "none" | "abs" | "relu", applied element-wise first
    spp_scales: Tuple[int, ...]   # pyramid scales of "local" and "global"
    use_schedule: bool            # multiply by sqrt(nb_current_classes / nb_new_classes)
    use_adaptive_factor: bool     # weight the distance by the background share (or mask share)
    extra_channels: str           # "sum" | "trim": how the new map's extra channels are matched
    normalize_per_scale: Union[bool, str]  # False | True | "spm", inside the local pyramid
    difference: str               # "frobenius" | "l1"
    masked: bool                  # PLOP's ``pod_deeplab_mask`` applies to this map
    apply_mask: str               # "background" | "old" (masked maps only)
    upscale_mask_topk: int        # channels kept by top-k before upscaling (masked maps only)


def _check_keys(where: str, options: dict, allowed: frozenset) -> None:
    if not isinstance(options, dict):
        raise ValueError(f"pod_options{where} must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown pod_options{where} keys {unknown}; accepted: {sorted(allowed)}")


def _validate_pod_options(pod_options: Optional[dict]) -> None:
    if not pod_options:
        return
    _check_keys("", pod_options, _TOP_KEYS)
    # PLOP reads "pool" but nothing uses it; only its default is accepted.
    if pod_options.get("pool", True) is not True:
        raise ValueError("pod_options['pool'] has no effect in PLOP and is not supported")
    switch = pod_options.get("switch")
    if switch:
        _check_keys("['switch']", switch, _SWITCH_KEYS)
        if "before" in switch:
            _check_keys("['switch']['before']", switch["before"], _BEFORE_KEYS)
        if "after" in switch:
            _check_keys("['switch']['after']", switch["after"], _AFTER_KEYS)


def _check_choice(name: str, value, choices, map_index: int) -> None:
    if value not in choices:
        raise ValueError(f"POD map {map_index}: {name}={value!r} is not one of {choices}")


def resolve_pod_options(
    n_maps: int,
    collapse_channels: str = "spatial",
    pod_factor: float = 1.,
    prepro: str = "pow",
    spp_scales: Sequence[int] = (1, 2, 4),
    use_pod_schedule: bool = True,
    pod_options: Optional[dict] = None,
    pod_deeplab_mask: bool = False,
    pod_deeplab_mask_factor: Optional[float] = None,
) -> Tuple[PodMapOptions, ...]:
    """The settings PLOP's ``features_distillation`` uses for each of ``n_maps`` maps, in order.

    Starting from the arguments, ``pod_options["switch"]["before"]`` applies to maps ``0..n-2`` and
    ``["after"]`` to the last map. As in PLOP, the values a sub-dict sets for ``type``, ``factor``,
    ``prepro``, ``apply_mask``, ``upscale_mask_topk``, ``spp_scales``, ``use_pod_schedule`` carry
    over to later maps whose sub-dict omits them (so with ``"before"`` but no ``"after"`` the last
    map keeps the ``"before"`` values); ``norm`` falls back to False in each sub-dict that is
    present; ``use_adaptative_factor``, ``extra_channels`` (default "sum"), the switch-level
    ``normalize_per_scale`` (default False) and the distance (``"difference_function"`` for the
    last map, ``"difference_function_all"`` for the others, default "frobenius") are per map.
    A map is masked when ``pod_deeplab_mask`` is set, its collapse is "local" and the switch-level
    ``mask_position`` is "last" (last map) or "all"; a masked map uses ``pod_deeplab_mask_factor``
    (default: the ``pod_factor`` argument) as its factor, which then also carries over, unless it
    is 0 (the map is skipped).
    """
    _validate_pod_options(pod_options)
    switch = (pod_options or {}).get("switch") or {}
    mask_factor = pod_factor if pod_deeplab_mask_factor is None else pod_deeplab_mask_factor
    carried = dict(collapse=collapse_channels, factor=pod_factor, normalize=False, prepro=prepro,
                   spp_scales=tuple(spp_scales), use_schedule=use_pod_schedule,
                   apply_mask="background", upscale_mask_topk=1, mask_position="last")
    resolved = []
    for index in range(n_maps):
        is_last = index == n_maps - 1
        use_adaptive_factor, extra_channels = False, "sum"
        sub = switch.get("after" if is_last else "before")
        if sub is not None:
            carried["collapse"] = sub.get("type", carried["collapse"])
            carried["factor"] = sub.get("factor", carried["factor"])
            carried["normalize"] = sub.get("norm", False)
            carried["prepro"] = sub.get("prepro", carried["prepro"])
            use_adaptive_factor = sub.get("use_adaptative_factor", False)
            if is_last:
                carried["apply_mask"] = sub.get("apply_mask", carried["apply_mask"])
                carried["upscale_mask_topk"] = sub.get("upscale_mask_topk",
                                                       carried["upscale_mask_topk"])
                extra_channels = sub.get("extra_channels", extra_channels)
                carried["spp_scales"] = tuple(sub.get("spp_scales", carried["spp_scales"]))
                carried["use_schedule"] = sub.get("use_pod_schedule", carried["use_schedule"])
        carried["mask_position"] = switch.get("mask_position", carried["mask_position"])
        normalize_per_scale = switch.get("normalize_per_scale", False)
        difference_key = "difference_function" if is_last else "difference_function_all"
        difference = (pod_options or {}).get(difference_key, "frobenius")

        masked = bool(pod_deeplab_mask) and carried["collapse"] == "local" and (
            (is_last and carried["mask_position"] == "last") or carried["mask_position"] == "all")
        factor = carried["factor"]
        if masked:
            factor = mask_factor
            if mask_factor != 0:
                carried["factor"] = mask_factor

        options = PodMapOptions(
            collapse=carried["collapse"], factor=float(factor),
            normalize=bool(carried["normalize"]), prepro=carried["prepro"],
            spp_scales=carried["spp_scales"], use_schedule=bool(carried["use_schedule"]),
            use_adaptive_factor=bool(use_adaptive_factor),
            extra_channels=extra_channels, normalize_per_scale=normalize_per_scale,
            difference=difference, masked=masked, apply_mask=carried["apply_mask"],
            upscale_mask_topk=int(carried["upscale_mask_topk"]))
        _check_map_options(options, index, carried["mask_position"])
        resolved.append(options)
    return tuple(resolved)


def _check_map_options(options: PodMapOptions, index: int, mask_position: str) -> None:
    _check_choice("type", options.collapse, _COLLAPSES, index)
    _check_choice("prepro", options.prepro, _PREPROS, index)
    _check_choice("extra_channels", options.extra_channels, _EXTRA_CHANNELS, index)
    # PLOP also lists "frobenius_mix", "kl" and "bce": they expect per-group lists or 3-d
    # embeddings that no collapse produces, so they crash there.
    _check_choice("difference function", options.difference, _DIFFERENCES, index)
    _check_choice("normalize_per_scale", options.normalize_per_scale, _NORMALIZE_PER_SCALE, index)
    _check_choice("apply_mask", options.apply_mask, _APPLY_MASKS, index)
    # PLOP names "backbone" as a mask position but no branch handles it (no map is ever masked).
    _check_choice("mask_position", mask_position, _MASK_POSITIONS, index)
    if not options.spp_scales or any(int(s) != s or s < 1 for s in options.spp_scales):
        raise ValueError(f"POD map {index}: spp_scales must be positive ints, got "
                         f"{options.spp_scales}")
    if options.upscale_mask_topk < 1:
        raise ValueError(f"POD map {index}: upscale_mask_topk must be >= 1, got "
                         f"{options.upscale_mask_topk}")


def spatial_pod(x: torch.Tensor) -> torch.Tensor:
    """POD "spatial": per sample, the sums over width (``C*H``) then over height (``C*W``)."""
    batch = x.shape[0]
    return torch.cat([x.sum(dim=3).reshape(batch, -1), x.sum(dim=2).reshape(batch, -1)], dim=-1)


def global_pod(x: torch.Tensor, spp_scales: Sequence[int] = (2, 4, 8)) -> torch.Tensor:
    """POD "global" (PLOP ``_global_pod``): for each scale ``s``, average-pool with kernel and
    stride ``W // s``, then concatenate the sums over height and over width of the pooled map."""
    batch, width = x.shape[0], x.shape[-1]
    embeddings = []
    for scale in spp_scales:
        if width // scale == 0:
            raise ValueError(f"POD scale {scale} is too fine for a map of width {width}")
        pooled = F.avg_pool2d(x, kernel_size=width // scale)
        embeddings.append(pooled.sum(dim=2).reshape(batch, -1))
        embeddings.append(pooled.sum(dim=3).reshape(batch, -1))
    return torch.cat(embeddings, dim=1)


def _check_scale(scale: int, width: int, height: int) -> None:
    # A region with columns but no rows has NaN height-means (PLOP then fails its finiteness
    # assertion). A scale finer than the width (k = 0) only adds empty pieces, as in PLOP.
    size = width // scale
    if size > 0 and (scale - 1) * size >= height:
        raise ValueError(f"POD scale {scale} leaves empty rows in a {height}x{width} map")


def _scale_divisor(normalize_per_scale, scale_index: int, scale: int, n_scales: int) -> float:
    if normalize_per_scale is True:
        return float(scale ** 2)
    if normalize_per_scale == "spm":
        return float(2 ** (n_scales - 1) if scale_index == 0 else 2 ** (n_scales - scale_index))
    return 1.0


@dataclass(frozen=True)
class _Grid:
    """The windows of one pyramid scale ``s`` on an ``H x W`` map.

    Windows are ``size = W // s`` columns wide; window ``(i, j)`` covers columns
    ``[j*size, (j+1)*size)`` and rows ``[i*size, min((i+1)*size, H))``: the width sets the window
    size on both axes, columns right of ``s*size`` and rows below ``s*size`` are left out, and on a
    map wider than tall the last row band is shorter than ``size``."""

    scale: int
    size: int
    rows: int  # rows covered: min(scale * size, H)

    @classmethod
    def of(cls, scale: int, height: int, width: int) -> "_Grid":
        _check_scale(scale, width, height)
        size = width // scale
        return cls(scale, size, min(scale * size, height))

    @property
    def columns(self) -> int:
        return self.scale * self.size

    @property
    def full_bands(self) -> int:
        """Row bands that are ``size`` rows high (all but a short last one)."""
        return self.rows // self.size

    @property
    def last_rows(self) -> int:
        """Height of the short last row band, 0 when every band is full."""
        return self.rows - self.full_bands * self.size

    def derives_from(self, finer: "_Grid") -> bool:
        """Whether this scale's windows are unions of ``finer``'s windows (same pyramid rows)."""
        return (finer.size > 0 and self.size % finer.size == 0 and self.columns <= finer.columns)


def _sum_bands(y: torch.Tensor, full: int, band: int, end: int) -> torch.Tensor:
    """``(..., n_rows, n) -> (..., bands, n)``: ``full`` sums of ``band`` consecutive rows, then,
    if ``end > full * band``, the sum of rows ``full*band .. end-1`` (a short last band)."""
    lead, n = y.shape[:-2], y.shape[-1]
    parts = [y[..., :full * band, :].reshape(*lead, full, band, n).sum(dim=-2)] if full else []
    if end > full * band:
        parts.append(y[..., full * band:end, :].sum(dim=-2, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


class _WindowSums(torch.autograd.Function):
    """Per window of ``grid``, of ``x`` or (``square``) of ``x**2``: the sums over its columns of
    each of its rows (``B x C x rows x s``: row ``r`` of window ``(i, j)`` at ``[..., r, j]``) and
    the sums over its rows of each of its columns (``B x C x bands x s*size``: column ``c`` of
    window ``(i, j)`` at ``[..., i, c]``).

    Two reductions of the map, whatever the number of windows. The backward is written out: each
    element's gradient is its row's plus its column's window gradient, times ``2 x`` when squared,
    in three passes over the map (autograd's copies the expanded gradient of each reduction and
    then runs the square's backward, twice as many, with a map-sized temporary for each)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, grid: "_Grid", square: bool):
        used = x[..., :grid.rows, :grid.columns]
        values = used * used if square else used
        batch, channels = x.shape[:2]
        row_sums = values.reshape(batch, channels, grid.rows, grid.scale, grid.size).sum(dim=-1)
        col_sums = _sum_bands(values, grid.full_bands, grid.size, grid.rows)
        ctx.grid, ctx.square, ctx.shape = grid, square, tuple(x.shape)
        if square:
            ctx.save_for_backward(x)
        return row_sums, col_sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows: torch.Tensor, grad_cols: torch.Tensor):
        grid = ctx.grid
        if ctx.square:
            grad_rows, grad_cols = 2 * grad_rows, 2 * grad_cols
        grad_used = _spread_window_grads(grad_rows, grad_cols, grid)
        if ctx.square:
            (x,) = ctx.saved_tensors
            grad_used.mul_(x[..., :grid.rows, :grid.columns])
        if tuple(grad_used.shape) == ctx.shape:
            return grad_used, None, None
        grad = grad_used.new_zeros(ctx.shape)  # columns and rows outside the pyramid
        grad[..., :grid.rows, :grid.columns] = grad_used
        return grad, None, None


def _spread_window_grads(grad_rows: torch.Tensor, grad_cols: torch.Tensor,
                         grid: "_Grid") -> torch.Tensor:
    """``B x C x rows x s*size``: at each element, the gradient of its row's window row-sum plus
    that of its column's band column-sum. Written as a broadcast copy then a broadcast add
    (a single broadcast sum of both is several times slower on CPU)."""
    batch, channels = grad_rows.shape[:2]
    s, k, full, n = grid.scale, grid.size, grid.full_bands, grid.columns
    out = grad_rows.new_empty(batch, channels, grid.rows, n)
    if full:
        out[:, :, :full * k].view(batch, channels, full, k, n).copy_(
            grad_cols[:, :, :full].reshape(batch, channels, full, 1, n))
    if grid.last_rows:
        out[:, :, full * k:].copy_(grad_cols[:, :, full:full + 1])
    out.view(batch, channels, grid.rows, s, k).add_(grad_rows.reshape(batch, channels, grid.rows, s, 1))
    return out


def _coarser_sums(sums: Tuple[torch.Tensor, torch.Tensor], finer: "_Grid",
                  grid: "_Grid") -> Tuple[torch.Tensor, torch.Tensor]:
    """``_WindowSums`` of ``grid`` from those of ``finer`` (``grid.derives_from(finer)``): each
    coarse window is ``m x m`` fine windows, so its sums add ``m`` fine ones."""
    row_sums, col_sums = sums
    m = grid.size // finer.size
    coarse_rows = sum_groups(row_sums[..., :grid.rows, :], grid.scale, m)
    # the coarse band i is the fine bands i*m .. i*m + m - 1 (the last fine ones may be short)
    coarse_cols = _sum_bands(col_sums[..., :grid.columns], grid.full_bands, m, grid.scale * m)
    return coarse_rows, coarse_cols


def _pyramid_means(x: torch.Tensor, spp_scales: Sequence[int], normalize_per_scale,
                   square: bool = False) -> list:
    """For each scale in order (``None`` for a scale finer than the width, which has no windows):
    ``(grid, width_means, height_means)``, the window sums of ``_WindowSums`` (of ``x**2`` when
    ``square``) divided by the window's width / band's height and by the per-scale divisor. The
    finest scale is summed from the map; every scale whose windows are unions of its windows is
    summed from its sums, any other one from the map."""
    height, width = x.shape[-2], x.shape[-1]
    grids = [_Grid.of(scale, height, width) for scale in spp_scales]
    usable = [g for g in grids if g.size > 0]
    if not usable:
        return [None] * len(grids)
    finest = min(usable, key=lambda g: g.size)
    finest_sums = _WindowSums.apply(x, finest, square)
    out = []
    for scale_index, grid in enumerate(grids):
        if grid.size == 0:
            out.append(None)
            continue
        if grid == finest:
            row_sums, col_sums = finest_sums
        elif grid.derives_from(finest):
            row_sums, col_sums = _coarser_sums(finest_sums, finest, grid)
        else:
            row_sums, col_sums = _WindowSums.apply(x, grid, square)
        divisor = _scale_divisor(normalize_per_scale, scale_index, grid.scale, len(grids))
        width_means = row_sums / (grid.size * divisor)
        height_means = _band_means(col_sums, grid, divisor)
        out.append((grid, width_means, height_means))
    return out


def _band_means(col_sums: torch.Tensor, grid: _Grid, divisor: float) -> torch.Tensor:
    """Column sums per row band divided by the band's height (and ``divisor``); divisions by
    Python numbers, so no tensor of heights is built (or sent to the device) per call."""
    if not grid.last_rows:
        return col_sums / (grid.size * divisor)
    full = grid.full_bands
    return torch.cat([col_sums[..., :full, :] / (grid.size * divisor),
                      col_sums[..., full:, :] / (grid.last_rows * divisor)], dim=-2)


def _windows_in_order(grid: _Grid, width_means: torch.Tensor,
                      height_means: torch.Tensor) -> torch.Tensor:
    """PLOP's layout of one scale: windows in row-major order, each its width-means (``C x rows``,
    channel-major) then its height-means (``C x size``)."""
    batch, channels = width_means.shape[:2]
    s, k, full = grid.scale, grid.size, grid.full_bands
    parts = []
    if full:
        by_row = width_means[..., :full * k, :].reshape(batch, channels, full, k, s)
        by_row = by_row.permute(0, 2, 4, 1, 3)                       # B, i, j, C, r
        by_col = height_means[..., :full, :].reshape(batch, channels, full, s, k)
        by_col = by_col.permute(0, 2, 3, 1, 4)                       # B, i, j, C, c
        parts.append(torch.stack([by_row, by_col], dim=3).reshape(batch, -1))
    if grid.last_rows:
        by_row = width_means[..., full * k:, :].permute(0, 3, 1, 2)  # B, j, C, r
        by_col = height_means[..., full, :].reshape(batch, channels, s, k).permute(0, 2, 1, 3)
        last = torch.cat([by_row.reshape(batch, s, -1), by_col.reshape(batch, s, -1)], dim=-1)
        parts.append(last.reshape(batch, -1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def local_pod(x: torch.Tensor, spp_scales: Sequence[int] = (1, 2, 4),
              normalize_per_scale: Union[bool, str] = False) -> torch.Tensor:
    """PLOP's local POD pyramid (``_local_pod``), one embedding per sample.

    For each scale ``s`` with ``k = W // s`` (the *width* sets the region size for both axes, so
    remainder rows/columns are dropped), for each region ``(i, j)`` in row-major order, the region
    ``x[..., i*k:(i+1)*k, j*k:(j+1)*k]`` gives its mean over width (``C*k`` values, channel-major)
    followed by its mean over height; everything is concatenated. ``normalize_per_scale`` divides
    each region's pools by ``s**2`` (True) or by ``2**(n-1)`` for the first scale and
    ``2**(n-index)`` for the others ("spm").

    Computed without a loop over regions: the window sums of every scale come from two
    reductions of the map (see ``_pyramid_means``), then are laid out in PLOP's order.
    """
    batch = x.shape[0]
    pieces = [_windows_in_order(*scale) for scale in _pyramid_means(x, spp_scales, normalize_per_scale)
              if scale is not None]
    return torch.cat(pieces, dim=1) if pieces else x.reshape(batch, -1)[:, :0]  # empty, still in the graph


def _local_pod_unordered(x: torch.Tensor, spp_scales: Sequence[int],
                         normalize_per_scale: Union[bool, str], square: bool) -> torch.Tensor:
    """The values of ``local_pod(x**2 if square else x)`` in another order (per scale: all
    width-means, then all height-means). The POD distances (norms over the whole embedding, after
    an optional L2-normalisation of it) do not depend on the order, and this skips the reordering
    copies; squaring inside ``_WindowSums`` folds the square's backward into the sums' one."""
    batch = x.shape[0]
    pieces = [means.reshape(batch, -1)
              for scale in _pyramid_means(x, spp_scales, normalize_per_scale, square)
              if scale is not None
              for means in scale[1:]]
    return torch.cat(pieces, dim=1) if pieces else x.reshape(batch, -1)[:, :0]  # empty, still in the graph


def _preprocess(x: torch.Tensor, prepro: str) -> torch.Tensor:
    if prepro == "pow":
        return x.pow(2)
    if prepro == "abs":  # PLOP calls torch.abs(x, 2), which raises; the intent is |x|.
        return x.abs()
    if prepro == "relu":
        return x.clamp(min=0.)
    return x


def _match_old_channels(old: torch.Tensor, new: torch.Tensor, index_new_class: Optional[int],
                        mode: str) -> torch.Tensor:
    """Give the new map the old map's channels: ``sum`` adds the raw new-class channels to channel 0
    (background), ``trim`` drops them."""
    if index_new_class is None or index_new_class != old.shape[1]:
        raise ValueError(f"index_new_class must equal the old map's channel count {old.shape[1]} "
                         f"to match channels, got {index_new_class!r}")
    if old.shape[0] != new.shape[0] or old.shape[2:] != new.shape[2:]:
        raise ValueError(f"old map {tuple(old.shape)} and new map {tuple(new.shape)} differ in "
                         "batch or spatial size")
    if mode == "trim":
        return new[:, :index_new_class]
    background = new[:, :1] + new[:, index_new_class:].sum(dim=1, keepdim=True)
    return torch.cat([background, new[:, 1:index_new_class]], dim=1)


def _pod_mask(labels: torch.Tensor, index_new_class: int, apply_mask: str,
              outputs_old: Optional[torch.Tensor]) -> torch.Tensor:
    """PLOP's deeplab mask: True where the map is zeroed before pooling."""
    if apply_mask == "background":
        return labels < index_new_class
    if outputs_old is None:
        raise ValueError("apply_mask='old' needs outputs_old (the old model's full-size logits)")
    background = labels == 0
    pseudo = torch.where(background, channel_argmax(outputs_old), labels)
    return (labels < index_new_class) & (pseudo > 0)


def _collapse(x: torch.Tensor, options: PodMapOptions, square: bool = False) -> torch.Tensor:
    """The embedding of ``x`` (of ``x**2`` when ``square``, only with the "local" collapse)."""
    if options.collapse == "spatial":
        return spatial_pod(x)
    if options.collapse == "global":
        return global_pod(x, options.spp_scales)
    return _local_pod_unordered(x, options.spp_scales, options.normalize_per_scale, square)


def _pod_schedule(nb_current_classes: int, nb_new_classes: int) -> float:
    if nb_new_classes == 0 or nb_current_classes / nb_new_classes < 0:
        raise ValueError(f"the POD schedule sqrt(nb_current_classes / nb_new_classes) is undefined "
                         f"for nb_current_classes={nb_current_classes}, "
                         f"nb_new_classes={nb_new_classes}")
    return math.sqrt(nb_current_classes / nb_new_classes)


def _freeze(value):
    """A hashable copy of an options value (dicts, lists, scalars), types included so that
    ``1`` and ``1.0`` or ``True`` stay distinct keys; TypeError for anything else."""
    if isinstance(value, dict):
        return ("dict", tuple(sorted(((str(k), type(k).__name__), _freeze(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    hash(value)
    return (type(value).__name__, value)


_RESOLVED: dict = {}
_RESOLVED_MAX = 64


def _resolved_options(n_maps: int, *args) -> Tuple[PodMapOptions, ...]:
    """``resolve_pod_options(n_maps, *args)``, remembered: the trainer asks for the same settings
    at every iteration, and resolving and checking them is pure Python work."""
    try:
        key = _freeze((n_maps,) + args)
    except TypeError:
        return resolve_pod_options(n_maps, *args)
    resolved = _RESOLVED.get(key)
    if resolved is None:
        resolved = resolve_pod_options(n_maps, *args)  # raises on bad options: nothing is stored
        if len(_RESOLVED) < _RESOLVED_MAX:
            _RESOLVED[key] = resolved
    return resolved


@dataclass(frozen=True)
class _PodBatch:
    """What the masks and the adaptive factors of every map read."""

    labels: Optional[torch.Tensor]
    index_new_class: Optional[int]
    deeplab_mask: bool                 # the ``pod_deeplab_mask`` argument
    upscale: bool                      # ``deeplabmask_upscale``
    outputs_old: Optional[torch.Tensor]


def features_distillation(
    list_attentions_a: Sequence[torch.Tensor],
    list_attentions_b: Sequence[torch.Tensor],
    collapse_channels: str = "spatial",
    normalize: bool = True,
    labels: Optional[torch.Tensor] = None,
    index_new_class: Optional[int] = None,
    pod_apply: str = "all",
    pod_deeplab_mask: bool = False,
    pod_deeplab_mask_factor: Optional[float] = None,
    interpolate_last: bool = False,
    pod_factor: float = 1.,
    prepro: str = "pow",
    deeplabmask_upscale: bool = True,
    spp_scales: Sequence[int] = (1, 2, 4),
    pod_options: Optional[dict] = None,
    outputs_old: Optional[torch.Tensor] = None,
    use_pod_schedule: bool = True,
    nb_current_classes: int = -1,
    nb_new_classes: int = -1,
) -> torch.Tensor:
    """PLOP's POD loss between the old model's maps ``a`` and the new model's maps ``b``.

    For each map ``l`` (settings from ``resolve_pod_options``)::

        a, b  <- old and new map (the new map's extra channels summed into background or trimmed)
        e_a, e_b = collapse(prepro(a)), collapse(prepro(b))      # e.g. local_pod(a**2)
        d_l = mean_b( w_b * || e_a[b] - e_b[b] ||_2 )            # "l1": the 1-norm instead
        L_l = factor_l * d_l * (sqrt(nb_current_classes / nb_new_classes) if scheduled)
        POD = sum_l L_l / n_maps                                 # skipped maps count in n_maps

    ``w`` is 1, or with ``use_adaptative_factor`` the share of label-0 pixels of the batch (the
    share of masked pixels of each image on a masked map). On a masked map (``pod_deeplab_mask``)
    the maps are first reduced to their top-``upscale_mask_topk`` channels and upscaled
    (bilinear) to the label size (``deeplabmask_upscale``), or the mask is downscaled (nearest) to
    the map size, then zeroed where the mask holds before the local pooling. ``"norm"`` in
    ``pod_options`` L2-normalises the embeddings.

    Reproduced quirks: the ``normalize`` argument is ignored (always False), as in PLOP; logits'
    extra channels are summed raw, then squared; the schedule is ``sqrt(C / N)`` with ``C`` all
    classes seen and ``N`` the new ones (``nb_current_classes = nb_new_classes = -1`` gives 1);
    option values carry over between maps as in PLOP (see ``resolve_pod_options``).
    Not copied: masking writes into the caller's map in PLOP (a copy here); ``"spm"`` per-scale
    normalisation crashes on masked maps in PLOP (works here); ``pod_apply`` and
    ``interpolate_last`` are read but unused by PLOP, so values other than the defaults raise.
    A non-finite distance raises, as PLOP's assertion does (checked once for all maps, so a GPU
    run waits for the device once per call, not once per map).
    """
    if pod_apply != "all":
        raise ValueError(f"pod_apply={pod_apply!r} is not supported: PLOP ignores it, every map is "
                         "distilled ('all')")
    if interpolate_last:
        raise ValueError("interpolate_last=True is not supported: PLOP reads it but never uses it")
    if len(list_attentions_a) != len(list_attentions_b) or not list_attentions_a:
        raise ValueError(f"POD needs two non-empty lists of equal length, got "
                         f"{len(list_attentions_a)} old and {len(list_attentions_b)} new maps")
    n_maps = len(list_attentions_a)
    per_map = _resolved_options(n_maps, collapse_channels, pod_factor, prepro, tuple(spp_scales),
                                use_pod_schedule, pod_options, pod_deeplab_mask,
                                pod_deeplab_mask_factor)
    batch = _PodBatch(labels, index_new_class, pod_deeplab_mask, deeplabmask_upscale, outputs_old)
    total = torch.zeros((), dtype=torch.float32, device=list_attentions_a[0].device)
    distances = {}
    for index, (old, new, options) in enumerate(zip(list_attentions_a, list_attentions_b, per_map)):
        if options.factor <= 0:
            continue
        if old.shape[1] != new.shape[1] and index != n_maps - 1:
            raise ValueError(f"POD map {index}: only the last map may differ in channels, got old "
                             f"{tuple(old.shape)} and new {tuple(new.shape)}")
        distance, weight = _pod_map_distance(index, old.float(), new.float(), options, batch)
        distances[index] = distance
        layer_loss = options.factor * torch.mean(weight * distance)
        if options.use_schedule:
            layer_loss = layer_loss * _pod_schedule(nb_current_classes, nb_new_classes)
        total = total + layer_loss
    _check_finite(distances)
    return total / n_maps


def _check_finite(distances: dict) -> None:
    if not distances:
        return
    finite = torch.stack([torch.isfinite(d).all() for d in distances.values()])
    if not bool(finite.all()):
        index, distance = next((i, d) for i, d in distances.items() if not bool(torch.isfinite(d).all()))
        raise ValueError(f"POD map {index}: the distance is not finite ({distance.tolist()})")


def _pod_map_distance(index: int, old: torch.Tensor, new: torch.Tensor, options: PodMapOptions,
                      batch: _PodBatch) -> Tuple[torch.Tensor, Union[float, torch.Tensor]]:
    """The per-image distance between the embeddings of one map pair, and its weight ``w``."""
    if old.dim() != 4 or new.dim() != 4:
        raise ValueError(f"POD map {index}: maps must be B x C x H x W, got {tuple(old.shape)} and "
                         f"{tuple(new.shape)}")
    if old.shape[1] != new.shape[1]:
        new = _match_old_channels(old, new, batch.index_new_class, options.extra_channels)
    if old.shape != new.shape:
        raise ValueError(f"POD map {index}: old {tuple(old.shape)} and new {tuple(new.shape)} "
                         "differ")
    needs_labels = options.masked or (options.use_adaptive_factor and not batch.deeplab_mask)
    if needs_labels and batch.labels is None:
        raise ValueError(f"POD map {index}: labels are needed for the mask / adaptive factor")

    weight = 1.0
    if options.use_adaptive_factor and not batch.deeplab_mask:
        weight = (batch.labels == 0).float().mean()
    # The local pyramid squares inside its window sums: no squared copy of the map, and a
    # one-pass backward.
    square = options.prepro == "pow" and options.collapse == "local" and not options.masked
    if not square:
        old, new = _preprocess(old, options.prepro), _preprocess(new, options.prepro)
    if options.masked:
        old, new, mask_weight = _masked(index, old, new, options, batch)
        if options.use_adaptive_factor:
            weight = mask_weight

    emb_old, emb_new = _collapse(old, options, square), _collapse(new, options, square)
    if options.normalize:
        emb_old, emb_new = F.normalize(emb_old, dim=1, p=2), F.normalize(emb_new, dim=1, p=2)
    order = 2 if options.difference == "frobenius" else 1
    return torch.linalg.vector_norm(emb_old - emb_new, ord=order, dim=-1), weight


def _masked(index: int, old: torch.Tensor, new: torch.Tensor, options: PodMapOptions,
            batch: _PodBatch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PLOP's deeplab mask on preprocessed maps: both maps zeroed where the mask holds (after
    the top-k upscaling, or with the mask downscaled to the map), and each image's masked share."""
    if batch.index_new_class is None:
        raise ValueError(f"POD map {index}: the deeplab mask needs index_new_class")
    mask = _pod_mask(batch.labels, batch.index_new_class, options.apply_mask, batch.outputs_old)
    if batch.upscale:
        old = _topk_upscaled(old, options.upscale_mask_topk, batch.labels.shape[-2:])
        new = _topk_upscaled(new, options.upscale_mask_topk, batch.labels.shape[-2:])
    else:
        mask = F.interpolate(mask[:, None].float(), size=old.shape[-2:], mode="nearest")
        mask = mask[:, 0].bool()
    share = mask.float().mean(dim=(1, 2))
    return old.masked_fill(mask[:, None], 0.), new.masked_fill(mask[:, None], 0.), share


def _topk_upscaled(x: torch.Tensor, k: int, size) -> torch.Tensor:
    if k > x.shape[1]:
        raise ValueError(f"upscale_mask_topk={k} exceeds the map's {x.shape[1]} channels")
    top = torch.topk(x, k=k, dim=1).values
    return F.interpolate(top, size=tuple(size), mode="bilinear", align_corners=False)
