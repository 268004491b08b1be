"""The joint transforms keep image and mask aligned (masks resampled by PIL's pixel-centre rule)."""

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from dataset.transform import IMAGENET_MEAN, IMAGENET_STD, train_transform, val_transform

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], dtype=np.uint8)


def blocky_scene(height=48, width=72, block=12, seed=0):
    """Random 12-px blocks of four colours; the mask is the colour index of each block."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 4, size=(height // block + 1, width // block + 1))
    mask = np.kron(cells, np.ones((block, block), dtype=np.int64))[:height, :width].astype(np.uint8)
    image = COLOURS[mask]
    return (
        tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous()),
        tv_tensors.Mask(torch.from_numpy(mask)),
    )


def to_uint8_rgb(normalised):
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return ((normalised * std + mean) * 255).permute(1, 2, 0).numpy()


def assert_image_matches_mask(image, mask, min_pure=0.5):
    """Pixels whose colour is (nearly) one of the block colours carry that colour's label."""
    rgb = to_uint8_rgb(image)
    distance = np.abs(rgb[:, :, None, :] - COLOURS[None, None].astype(np.float32)).max(axis=-1)
    nearest = distance.argmin(axis=-1)
    pure = distance.min(axis=-1) < 40  # a 85:15 blend at most: its centre lies in the block
    assert pure.mean() > min_pure  # most pixels lie inside a block, away from edges
    np.testing.assert_array_equal(mask.numpy()[pure], nearest[pure])


@pytest.mark.parametrize("seed", range(12))
def test_train_transform_keeps_alignment(seed):
    image, mask = blocky_scene(seed=seed)
    torch.manual_seed(seed)
    out_image, out_mask, out_saliency = train_transform(32)(image, mask, tv_tensors.Mask(mask > 0))
    assert out_image.shape == (3, 32, 32) and out_image.dtype == torch.float32
    assert out_mask.shape == (32, 32) and out_mask.dtype == torch.int64
    assert_image_matches_mask(out_image, out_mask)
    # the saliency map travels with the mask: same crop, flip and sampling
    torch.testing.assert_close(out_saliency, (out_mask > 0).long())


@pytest.mark.parametrize("crop_val", [True, False])
def test_val_transform_keeps_alignment(crop_val):
    image, mask = blocky_scene(seed=5)
    out_image, out_mask = val_transform(24, crop_val)(image, mask)
    expected = (24, 24) if crop_val else (48, 72)
    assert out_mask.shape == expected and out_image.shape == (3, *expected)
    assert_image_matches_mask(out_image, out_mask, min_pure=0.3 if crop_val else 0.99)
    if not crop_val:
        np.testing.assert_array_equal(out_mask.numpy(), mask.numpy())


def test_val_mask_follows_the_pixel_centre_rule():
    """Resize 30x45 -> 20x30 then centre-crop 20x20 (columns 5..24), checked index by index."""
    mask = torch.arange(30 * 45, dtype=torch.int64).reshape(30, 45) % 251
    image = tv_tensors.Image(torch.zeros(3, 30, 45, dtype=torch.uint8))
    _, out = val_transform(20, True)(image, tv_tensors.Mask(mask.to(torch.uint8)))
    rows = np.floor((np.arange(20) + 0.5) * 30 / 20).astype(int)
    cols = np.floor((np.arange(5, 25) + 0.5) * 45 / 30).astype(int)
    centre_rule = mask.numpy()[rows[:, None], cols[None, :]]
    np.testing.assert_array_equal(out.numpy(), centre_rule)
    # torchvision's default mask rule (floor(i * scale)) picks other pixels on this geometry
    floor_cols = np.floor(np.arange(5, 25) * 45 / 30).astype(int)
    assert not np.array_equal(mask.numpy()[rows[:, None], floor_cols[None, :]], centre_rule)


def test_centre_crop_of_a_thin_image_pads_nothing():
    mask = tv_tensors.Mask(torch.ones(6, 100, dtype=torch.uint8))
    image = tv_tensors.Image(torch.zeros(3, 6, 100, dtype=torch.uint8))
    _, out = val_transform(16, True)(image, mask)
    assert out.shape == (16, 16) and out.unique().tolist() == [1]


def test_normalisation_uses_imagenet_statistics():
    mean_colour = torch.tensor([round(255 * m) for m in IMAGENET_MEAN], dtype=torch.uint8)
    image = tv_tensors.Image(mean_colour[:, None, None].expand(3, 8, 8).contiguous())
    mask = tv_tensors.Mask(torch.zeros(8, 8, dtype=torch.uint8))
    out, _ = val_transform(8, False)(image, mask)
    assert out.abs().max() < 0.01
    white = tv_tensors.Image(torch.full((3, 8, 8), 255, dtype=torch.uint8))
    out, _ = val_transform(8, False)(white, mask)
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(expected))
