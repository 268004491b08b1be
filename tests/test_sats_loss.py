"""Tests of the SATS self-attention transfer loss (utils/sats.py)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from utils.sats import (
    class_pooled_attention,
    downscale_labels,
    infer_spatial_shapes,
    mit_stage_shape,
    pil_nearest_indices,
    sats_loss,
)

SQRT2 = math.sqrt(2.0)


def _pil_resize(label: np.ndarray, size) -> np.ndarray:
    return np.array(Image.fromarray(label.astype(np.uint8)).resize((size[1], size[0]), Image.NEAREST))


def _blocks(pattern, block):
    """Upsample a small label pattern by whole blocks (so PIL NEAREST recovers it exactly)."""
    return torch.as_tensor(pattern).repeat_interleave(block, 0).repeat_interleave(block, 1)


# ----------------------------------------------------------------------------------------------
# Label downscaling
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_size, out_size", [
    ((512, 512), (128, 128)), ((512, 512), (16, 16)), ((500, 375), (125, 94)),
    ((375, 500), (94, 125)), ((97, 61), (25, 16)), ((513, 513), (129, 129)),
    ((333, 257), (13, 29)), ((512, 512), (170, 74)), ((1000, 999), (251, 250)), ((7, 5), (3, 2)),
])
def test_downscale_labels_equals_pil_nearest(in_size, out_size):
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, size=(2, *in_size))
    got = downscale_labels(torch.from_numpy(batch), out_size)
    assert got.dtype == torch.int64 and tuple(got.shape) == (2, *out_size)
    for j in range(2):
        np.testing.assert_array_equal(got[j].numpy(), _pil_resize(batch[j], out_size))


def test_pil_nearest_indices_integer_ratio_and_tie():
    assert pil_nearest_indices(512, 128)[:3] == [2, 6, 10]
    assert pil_nearest_indices(512, 16)[:3] == [16, 48, 80]
    # At the exact tie (127 + 0.5) * 512 / 170 = 384, PIL's accumulator lands below 384;
    # float32 nearest-exact picks 384, which is why the module does not use F.interpolate.
    assert pil_nearest_indices(512, 170)[127] == 383
    row = torch.arange(512, dtype=torch.float32).view(1, 1, 1, 512)
    torch_pick = F.interpolate(row, size=(1, 170), mode="nearest-exact")[0, 0, 0, 127].item()
    assert torch_pick == 384


def test_downscale_labels_rejects_bad_input():
    with pytest.raises(ValueError, match="labels must be"):
        downscale_labels(torch.zeros(4, 4, dtype=torch.long), (2, 2))
    with pytest.raises(TypeError, match="integer"):
        downscale_labels(torch.zeros(1, 4, 4), (2, 2))


# ----------------------------------------------------------------------------------------------
# Stage grids
# ----------------------------------------------------------------------------------------------

def test_mit_stage_shapes_and_inference_non_square():
    assert [mit_stage_shape(512, 512, s) for s in range(4)] == [(128, 128), (64, 64), (32, 32), (16, 16)]
    grids = [mit_stage_shape(37, 50, s) for s in range(4)]
    assert grids == [(10, 13), (5, 7), (3, 4), (2, 2)]
    assert infer_spatial_shapes([130, 35, 12, 4], (37, 50)) == grids
    with pytest.raises(ValueError, match="spatial_shapes"):
        infer_spatial_shapes([131], (37, 50))


def test_inconsistent_spatial_shapes_are_rejected():
    attn = torch.rand(1, 1, 4, 2)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"spatial_shapes\[0\]"):
        sats_loss([attn], [attn], labels, spatial_shapes=[(3, 1)])
    with pytest.raises(ValueError, match="unknown SATS variant"):
        sats_loss([attn], [attn], labels, variant="sats")
    with pytest.raises(ValueError, match="labels must be"):
        sats_loss([attn], [attn], torch.zeros(2, 8, 8, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# Hand-computed values
# ----------------------------------------------------------------------------------------------

def _hand_case():
    """Two images, one head, a 2x2 token grid (8x8 labels, stride 4), two keys.

    Image 0: classes 1 (tokens 0, 1) and 2 (token 2), token 3 ignored. Image 1: background only.
    Class 1: new mean [0.5, 0.5], old mean [0.3, 0.7] -> ||[0.2, -0.2]|| = 0.2 sqrt2.
    Class 2: new [0.5, 0.5], old [0.8, 0.2] -> 0.3 sqrt2.
    Image 0: (0.2 + 0.3) sqrt2 / 2 = 0.25 sqrt2; image 1: 0; loss = 0.25 sqrt2 / 2 = sqrt2 / 8.
    """
    new = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8]],
                        [[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]]]).unsqueeze(1)
    old = torch.tensor([[[0.5, 0.5], [0.1, 0.9], [0.8, 0.2], [1.0, 0.0]],
                        [[0.2, 0.8], [0.7, 0.3], [0.5, 0.5], [0.4, 0.6]]]).unsqueeze(1)
    labels = torch.stack([_blocks([[1, 1], [2, 255]], 4), _blocks([[0, 0], [255, 0]], 4)])
    return new, old, labels


def test_hand_computed_two_images():
    new, old, labels = _hand_case()
    loss = sats_loss([new], [old], labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(SQRT2 / 8, rel=1e-6)
    # Two identical stages: the mean over stages keeps the value.
    assert sats_loss([new, new], [old, old], labels, spatial_shapes=[(2, 2), (2, 2)]).item() == \
        pytest.approx(SQRT2 / 8, rel=1e-6)


def test_class_pooled_attention_hand_case():
    new, _, labels = _hand_case()
    small = downscale_labels(labels, (2, 2))
    pooled, counts, classes = class_pooled_attention(new, small)
    assert classes.tolist() == [1, 2]
    assert counts.tolist() == [[2.0, 1.0], [0.0, 0.0]]
    expected = torch.tensor([[[[0.5, 0.5]], [[0.5, 0.5]]], [[[0.0, 0.0]], [[0.0, 0.0]]]])
    torch.testing.assert_close(pooled, expected)


def _gp_np_case():
    """Image 0: new head 0 rows [1,0],[1,0]; head 1 rows [0,1],[0,1]; old rows all [0.5,0.5].
    Image 1: new == old.

    Per-head layout: GP head means [1,0] / [0,1] vs [0.5,0.5] -> sqrt2/2 each -> image 0 sqrt2/2.
    Published layout: slot k holds (head 0, token k) and (head 1, token k) -> mean [0.5,0.5] -> 0.
    NP: every row of image 0 is sqrt2/2 away -> sqrt2/2 in both layouts. Divided by B = 2.
    """
    new = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]],
                        [[[0.3, 0.7], [0.6, 0.4]], [[0.2, 0.8], [0.9, 0.1]]]])
    old = new.clone()
    old[0] = 0.5
    labels = torch.zeros(2, 4, 8, dtype=torch.long)
    return new, old, labels


def test_global_pooling_variant_hand_values():
    new, old, labels = _gp_np_case()
    assert sats_loss([new], [old], labels, "sats-selfattn-GP").item() == pytest.approx(SQRT2 / 4, rel=1e-6)
    assert sats_loss([new], [old], labels, "sats-selfattn-GP", legacy_layout=True).item() == \
        pytest.approx(0.0, abs=1e-7)


def test_no_pooling_variant_hand_values():
    new, old, labels = _gp_np_case()
    for legacy in (False, True):
        value = sats_loss([new], [old], labels, "sats-selfattn-NP", legacy_layout=legacy).item()
        assert value == pytest.approx(SQRT2 / 4, rel=1e-6)


def test_feature_variant_hand_values():
    """Pixel vectors [1,2], [3,4] (class 3) and [5,6] (class 1) against zeros:
    class 3 mean [2,3] -> sqrt13, class 1 -> sqrt61; one image: (sqrt13 + sqrt61) / 2;
    second map: a single class-3 pixel [0, 2] -> 2; mean over the two maps."""
    new_a = torch.tensor([[1.0, 3.0, 5.0], [2.0, 4.0, 6.0]]).view(1, 2, 1, 3)
    new_b = torch.tensor([0.0, 2.0]).view(1, 2, 1, 1)
    labels = torch.tensor([[[3, 3, 1]]])
    # The second map is 1x1: its label is PIL's pick of the 1x3 row, column floor(1.5) = 1 (class 3).
    loss = sats_loss([new_a, new_b], [torch.zeros_like(new_a), torch.zeros_like(new_b)], labels,
                     "sats-feature-CNN")
    expected = ((math.sqrt(13) + math.sqrt(61)) / 2 + 2.0) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Published layout
# ----------------------------------------------------------------------------------------------

def _published_stage_loss(attn_new, attn_old, label_small, height, width):
    """The published computation for one stage, restated: plain reshape to (B, h, w, heads, S),
    then per image, per pooled class, per head (loops)."""
    batch, heads = attn_new.shape[:2]
    a_new = attn_new.reshape(batch, height, width, heads, -1)
    a_old = attn_old.reshape(batch, height, width, heads, -1)
    total = 0.0
    for j in range(batch):
        classes = [c for c in torch.unique(label_small[j]).tolist() if c not in (0, 255)]
        image = 0.0
        for c in classes:
            area = label_small[j] == c
            mean_new, mean_old = a_new[j, area].mean(0), a_old[j, area].mean(0)
            image += sum(torch.linalg.vector_norm(mean_new[k] - mean_old[k]) for k in range(heads)) / heads
        if classes:
            total += image / len(classes)
    return total / batch


def test_published_reshape_is_the_head_token_gather():
    batch, heads, height, width, keys = 2, 5, 4, 3, 6
    positions = height * width
    attn = torch.rand(batch, heads, positions, keys)
    reshaped = attn.reshape(batch, height, width, heads, keys)
    for y in range(height):
        for x in range(width):
            for k in range(heads):
                flat = (y * width + x) * heads + k
                torch.testing.assert_close(reshaped[:, y, x, k], attn[:, flat // positions, flat % positions])


def test_legacy_equals_intended_for_one_head():
    labels = torch.randint(0, 4, (3, 16, 16))
    new = [torch.rand(3, 1, 16, 5), torch.rand(3, 1, 4, 5)]
    old = [torch.rand(3, 1, 16, 5), torch.rand(3, 1, 4, 5)]
    torch.testing.assert_close(sats_loss(new, old, labels, legacy_layout=True), sats_loss(new, old, labels))


def test_legacy_layout_matches_published_code_and_differs_for_several_heads():
    labels = torch.randint(0, 4, (2, 32, 24))
    labels[:, :4] = 255
    heads = (2, 5)
    grids = [mit_stage_shape(32, 24, s) for s in range(2)]
    new = [torch.rand(2, h, gh * gw, 7).softmax(-1) for h, (gh, gw) in zip(heads, grids)]
    old = [torch.rand(2, h, gh * gw, 7).softmax(-1) for h, (gh, gw) in zip(heads, grids)]
    legacy = sats_loss(new, old, labels, legacy_layout=True)
    published = sum(
        _published_stage_loss(n, o, torch.from_numpy(np.stack([_pil_resize(l.numpy(), g) for l in labels])), *g)
        for n, o, g in zip(new, old, grids)) / len(grids)
    torch.testing.assert_close(legacy, torch.as_tensor(published, dtype=torch.float32), rtol=1e-5, atol=1e-7)
    assert abs(legacy.item() - sats_loss(new, old, labels).item()) > 1e-4


# ----------------------------------------------------------------------------------------------
# Loop reference straight from the definition
# ----------------------------------------------------------------------------------------------

def _reference_loss(new_maps, old_maps, labels, grids):
    """Per stage: PIL-downscaled labels; per image and class (not 0/255): mean of each head's rows
    over the class's tokens (token p <-> row p of every head), L2 over keys, mean over heads,
    mean over classes (0 without classes); sum over images / B; mean over stages."""
    batch = labels.shape[0]
    stage_losses = []
    for new, old, (height, width) in zip(new_maps, old_maps, grids):
        stage = 0.0
        for j in range(batch):
            small = torch.from_numpy(_pil_resize(labels[j].numpy(), (height, width))).reshape(-1)
            classes = [c for c in sorted(set(small.tolist())) if c not in (0, 255)]
            per_class = []
            for c in classes:
                tokens = [p for p in range(height * width) if small[p] == c]
                per_head = []
                for h in range(new.shape[1]):
                    pooled_new = torch.stack([new[j, h, p] for p in tokens]).mean(0)
                    pooled_old = torch.stack([old[j, h, p] for p in tokens]).mean(0)
                    per_head.append(torch.sqrt(((pooled_new - pooled_old) ** 2).sum()))
                per_class.append(sum(per_head) / len(per_head))
            if per_class:
                stage += sum(per_class) / len(per_class)
        stage_losses.append(stage / batch)
    return sum(stage_losses) / len(stage_losses)


def test_vectorised_equals_loop_reference():
    batch, size = 3, (40, 28)
    labels = torch.randint(0, 5, (batch, *size))
    labels[labels == 4] = 255
    labels[1, :, 14:] = 7
    labels[2] = 0  # an image without pooled classes
    heads, keys = (1, 2, 5), (4, 6, 3)
    grids = [mit_stage_shape(*size, s) for s in range(3)]
    new = [torch.rand(batch, h, gh * gw, k).softmax(-1) for h, k, (gh, gw) in zip(heads, keys, grids)]
    old = [torch.rand(batch, h, gh * gw, k).softmax(-1) for h, k, (gh, gw) in zip(heads, keys, grids)]
    expected = _reference_loss(new, old, labels, grids)
    torch.testing.assert_close(sats_loss(new, old, labels), torch.as_tensor(expected, dtype=torch.float32),
                               rtol=1e-5, atol=1e-7)


def test_invariant_to_class_ids_and_image_order():
    labels = torch.randint(0, 4, (3, 16, 16))
    new = [torch.rand(3, 2, 16, 5), torch.rand(3, 2, 4, 5)]
    old = [torch.rand(3, 2, 16, 5), torch.rand(3, 2, 4, 5)]
    base = sats_loss(new, old, labels)
    relabel = torch.tensor([0, 9, 3, 250])  # 1 -> 9, 2 -> 3, 3 -> 250
    torch.testing.assert_close(sats_loss(new, old, relabel[labels]), base)
    order = torch.tensor([2, 0, 1])
    torch.testing.assert_close(sats_loss([m[order] for m in new], [m[order] for m in old], labels[order]), base)


# ----------------------------------------------------------------------------------------------
# Gradients and precision
# ----------------------------------------------------------------------------------------------

def test_gradcheck_float64():
    labels = torch.tensor([[[1, 1, 2, 0], [1, 255, 2, 2], [0, 0, 2, 3], [3, 3, 3, 0]]]).repeat(2, 1, 1)
    labels[1] = labels[1].flip(-1)
    new = (torch.rand(2, 2, 4, 3, dtype=torch.float64, requires_grad=True),
           torch.rand(2, 3, 1, 3, dtype=torch.float64, requires_grad=True))
    old = (torch.rand(2, 2, 4, 3, dtype=torch.float64, requires_grad=True),
           torch.rand(2, 3, 1, 3, dtype=torch.float64, requires_grad=True))
    grids = [(2, 2), (1, 1)]
    for variant in ("sats-selfattn", "sats-selfattn-GP", "sats-selfattn-NP"):
        for legacy in (False, True):
            assert torch.autograd.gradcheck(
                lambda a, b, c, d: sats_loss([a, b], [c, d], labels, variant, legacy, spatial_shapes=grids),
                (*new, *old))


def test_identical_maps_give_zero_loss_and_finite_zero_gradient():
    new, _, labels = _hand_case()
    new = new.clone().requires_grad_(True)
    loss = sats_loss([new], [new.detach().clone()], labels)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(new.grad).all() and new.grad.abs().max().item() == 0.0


def test_low_precision_inputs_are_computed_in_float32():
    new, old, labels = _hand_case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sats_loss([new.bfloat16()], [old.bfloat16()], labels)
    assert loss.dtype == torch.float32
    expected = sats_loss([new.bfloat16().float()], [old.bfloat16().float()], labels)
    assert loss.item() == expected.item()
