"""utils/pod.py: the vectorised POD against a window-by-window restatement and against the values
recorded from the window-by-window implementation it replaced (tests/pod_cases.py)."""
import math

import pytest
import torch

import utils.loss
import utils.pod
from pod_cases import (EMBEDDING_CASES, FIXTURE, LOSS_CASES, PLOP,
                       embedding_and_grad, fingerprint, input_tensors, loss_and_grads, make_inputs)
from utils.pod import features_distillation, local_pod

RECORDED = torch.load(FIXTURE, weights_only=True)


def assert_fp32_close(actual, expected):
    """Equal up to float32 rounding: the sums are taken in another order than before."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * max(scale, 1e-3))


# ---------------------------------------------------------------------------------------------
# the plain restatement: one window at a time
# ---------------------------------------------------------------------------------------------

def windows_local_pod(x, scales, normalize_per_scale=False):
    """For each scale s (k = W // s), each window (i, j) in row-major order: rows
    i*k .. min((i+1)*k, H) - 1, columns j*k .. (j+1)*k - 1; its per-row means (C x rows) then
    its per-column means (C x k), divided by the per-scale divisor."""
    batch, _, height, width = x.shape
    pieces = []
    for index, s in enumerate(scales):
        k = width // s
        divisor = {False: 1.0, True: float(s * s),
                   "spm": float(2 ** (len(scales) - 1) if index == 0 else 2 ** (len(scales) - index))}
        for i in range(s):
            for j in range(s):
                top, bottom = i * k, min((i + 1) * k, height)
                window = x[:, :, top:bottom, j * k:(j + 1) * k]  # empty when k = 0
                rows = window.sum(dim=3) / max(window.shape[3], 1)
                cols = window.sum(dim=2) / max(window.shape[2], 1)
                pieces.append(rows.reshape(batch, -1) / divisor[normalize_per_scale])
                pieces.append(cols.reshape(batch, -1) / divisor[normalize_per_scale])
    return torch.cat(pieces, dim=1)


def windows_plop_pod(old_maps, new_maps, factors, index_new_class, schedule):
    """PLOP's POD with its preset: new-class channels of the last map summed into background,
    squares, the local pyramid [1, 2, 4], per-image L2 distance averaged, times the map's factor,
    times the schedule, summed and divided by the number of maps."""
    total = 0.0
    for old, new, factor in zip(old_maps, new_maps, factors):
        if new.shape[1] != old.shape[1]:
            background = new[:, :1] + new[:, index_new_class:].sum(dim=1, keepdim=True)
            new = torch.cat([background, new[:, 1:index_new_class]], dim=1)
        e_old = windows_local_pod(old ** 2, [1, 2, 4])
        e_new = windows_local_pod(new ** 2, [1, 2, 4])
        total = total + factor * (e_old - e_new).norm(dim=1).mean() * schedule
    return total / len(old_maps)


# (C, H, W): square powers of two, widths the scales do not divide, taller than wide (rows below
# the pyramid left out), wider than tall (a short last row band), widths below the finest scale
SHAPES = [(3, 8, 8), (2, 10, 10), (2, 9, 7), (3, 7, 10), (2, 6, 13), (1, 5, 3), (2, 12, 12)]
SCALES = [[1, 2, 4], [1, 3], [2, 3], [4, 1, 2], [5]]




def has_empty_windows(shape, scales):
    """A window with columns but no rows: local_pod raises (PLOP: NaN)."""
    _, height, width = shape
    return any(width // s > 0 and (s - 1) * (width // s) >= height for s in scales)


PYRAMIDS = [(shape, scales) for shape in SHAPES for scales in SCALES
            if not has_empty_windows(shape, scales)]


@pytest.mark.parametrize("shape,scales", PYRAMIDS)
@pytest.mark.parametrize("normalize_per_scale", [False, True, "spm"])
def test_local_pod_and_its_gradient_equal_the_window_by_window_pyramid(shape, scales,
                                                                        normalize_per_scale):
    x = torch.randn(2, *shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    embedding = local_pod(x, scales, normalize_per_scale)
    expected = windows_local_pod(x_ref, scales, normalize_per_scale)
    assert embedding.shape == expected.shape
    assert_fp32_close(embedding, expected.detach())
    weights = torch.randn(expected.shape)
    (embedding * weights).sum().backward()
    (expected * weights).sum().backward()
    assert_fp32_close(x.grad, x_ref.grad)


def test_windows_without_rows_are_refused():
    rejected = [(shape, scales) for shape in SHAPES for scales in SCALES
                if has_empty_windows(shape, scales)]
    assert len(rejected) == 6
    for shape, scales in rejected:
        with pytest.raises(ValueError, match="leaves empty rows"):
            local_pod(torch.randn(1, *shape), scales)


def test_local_pod_of_a_map_narrower_than_the_scales_is_empty():
    x = torch.randn(2, 3, 4, 3, requires_grad=True)
    assert local_pod(x, [4, 8]).shape == (2, 0)
    # scale 4 adds nothing, scale 1 a 3x3 window: 3 row means and 3 column means per channel
    assert local_pod(x, [4, 1]).shape == (2, 18)


def test_squared_windows_are_the_windows_of_the_squared_map():
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    fused = utils.pod._local_pod_unordered(x, [1, 2, 4], "spm", square=True)
    plain = utils.pod._local_pod_unordered(x ** 2, [1, 2, 4], "spm", square=False)
    assert_fp32_close(fused, plain.detach())
    weights = torch.randn(fused.shape)
    grad_fused, = torch.autograd.grad((fused * weights).sum(), x)
    grad_plain, = torch.autograd.grad((plain * weights).sum(), x)
    assert_fp32_close(grad_fused, grad_plain)
    # same values as local_pod, in another order
    ordered = local_pod(x ** 2, [1, 2, 4], "spm")
    assert_fp32_close(fused.sort(dim=1).values, ordered.sort(dim=1).values.detach())


def test_scales_summed_from_the_finest_windows_or_from_the_map():
    # width 12: scale 3 (k = 4) is summed from the map, scale 1 (k = 12) from scale 3's windows,
    # scale 2 (k = 6) from the map again (6 is not a multiple of 4)
    grids = {s: utils.pod._Grid.of(s, 12, 12) for s in (1, 2, 3)}
    assert grids[1].derives_from(grids[3]) and not grids[2].derives_from(grids[3])
    # width 10, scales 1, 2, 4: k = 10, 5, 2; the scale-1 window has columns outside scale 4's 8
    grids = {s: utils.pod._Grid.of(s, 10, 10) for s in (1, 2, 4)}
    assert not grids[1].derives_from(grids[4]) and not grids[2].derives_from(grids[4])
    # a short last band: 7 rows, windows of 3 -> bands of 3, 3, 1 rows
    grid = utils.pod._Grid.of(3, 7, 10)
    assert (grid.size, grid.rows, grid.full_bands, grid.last_rows) == (3, 7, 2, 1)


@pytest.mark.parametrize("with_logits", [True, False])
def test_plop_pod_and_its_gradients_equal_the_window_by_window_loss(with_logits):
    inputs = make_inputs(with_logits, seed=5)
    loss, grads = loss_and_grads(features_distillation, inputs, PLOP)
    new = [m.clone().requires_grad_(True) for m in inputs["new"]]
    n_maps = len(new)
    factors = [0.01] * (n_maps - 1) + [0.0005]
    schedule = math.sqrt(PLOP["nb_current_classes"] / PLOP["nb_new_classes"])
    expected = windows_plop_pod(inputs["old"], new, factors, PLOP["index_new_class"], schedule)
    expected.backward()
    assert_fp32_close(loss, expected.detach())
    for grad, grad_expected in zip(grads, (m.grad for m in new)):
        assert_fp32_close(grad, grad_expected)


# ---------------------------------------------------------------------------------------------
# the values recorded from the replaced implementation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LOSS_CASES))
def test_pod_loss_and_gradients_equal_the_recorded_ones(name):
    with_logits, kwargs = LOSS_CASES[name]
    recorded = RECORDED["loss"][name]
    inputs = make_inputs(with_logits)
    assert torch.equal(fingerprint(input_tensors(inputs)), recorded["inputs"]), \
        "the seeded inputs changed: the random generator no longer gives the recorded maps"
    loss, grads = loss_and_grads(features_distillation, inputs, kwargs)
    assert_fp32_close(loss, recorded["loss"])
    assert len(grads) == len(recorded["grads"])
    for grad, expected in zip(grads, recorded["grads"]):
        assert_fp32_close(grad, expected)


@pytest.mark.parametrize("name", sorted(EMBEDDING_CASES))
def test_local_pod_equals_the_recorded_embedding(name):
    shape, scales, norm = EMBEDDING_CASES[name]
    recorded = RECORDED["embedding"][name]
    x, embedding, _ = embedding_and_grad(local_pod, shape, scales, norm)
    assert torch.equal(fingerprint([x]), recorded["inputs"])
    assert_fp32_close(embedding, recorded["embedding"])


def test_recorded_losses_are_not_trivial():
    # the recorded cases exercise every map (no zero loss, gradients on every map)
    for name, recorded in RECORDED["loss"].items():
        assert recorded["loss"] > 0.1, name
        assert all(g.abs().sum() > 0 for g in recorded["grads"]), name


# ---------------------------------------------------------------------------------------------
# module boundary, option resolution, finiteness
# ---------------------------------------------------------------------------------------------

def test_utils_loss_re_exports_the_pod_names():
    for name in utils.pod.__all__:
        assert getattr(utils.loss, name) is getattr(utils.pod, name)
        assert name in utils.loss.__all__
    assert not hasattr(utils.loss, "entropy")


def test_options_are_resolved_once_per_distinct_setting(monkeypatch):
    calls = []
    real = utils.pod.resolve_pod_options
    monkeypatch.setattr(utils.pod, "resolve_pod_options", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(utils.pod, "_RESOLVED", {})
    old, new = [torch.ones(1, 1, 2, 2)], [torch.zeros(1, 1, 2, 2)]
    options = {"switch": {"after": {"factor": 2.0}}}
    kwargs = dict(collapse_channels="local", spp_scales=[1], use_pod_schedule=False, prepro="none")
    first = features_distillation(old, new, pod_options=options, **kwargs)
    again = features_distillation(old, new, pod_options={"switch": {"after": {"factor": 2.0}}}, **kwargs)
    assert len(calls) == 1 and first.item() == again.item() == 2.0 * 2.0  # |[1, 1, 1, 1]| = 2
    # a dict changed in place is a new setting, not a stale cache entry
    options["switch"]["after"]["factor"] = 3.0
    assert features_distillation(old, new, pod_options=options, **kwargs).item() == 3.0 * 2.0
    assert len(calls) == 2
    # bad options raise every time (nothing is remembered for them)
    for _ in range(2):
        with pytest.raises(ValueError, match="unknown pod_options"):
            features_distillation(old, new, pod_options={"switch": {"after": {"typo": 1}}}, **kwargs)


def test_a_non_finite_distance_names_its_map():
    old = [torch.zeros(1, 1, 4, 4) for _ in range(3)]
    new = [torch.zeros(1, 1, 4, 4) for _ in range(3)]
    new[1][0, 0, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="POD map 1: the distance is not finite"):
        features_distillation(old, new, collapse_channels="local", use_pod_schedule=False)
