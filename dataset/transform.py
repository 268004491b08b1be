"""Joint image/mask pipelines of the originals, on ``torchvision.transforms.v2``.

A pipeline is called as ``transform(image, mask)`` or ``transform(image, mask, saliency)`` with
``image`` a ``tv_tensors.Image`` (uint8, or a PIL image) and masks ``tv_tensors.Mask``; it returns
the same structure: image float32 normalised with ImageNet statistics, masks int64.

- train: ``RandomResizedCrop(crop_size, scale=(0.5, 2.0), ratio=(3/4, 4/3))`` (10 draws of
  area ``U(0.5, 2)·W·H`` and log-ratio, accepted when the box fits, else a centred fallback; the
  originals' logic), ``RandomHorizontalFlip(0.5)``, ``ToDtype``, ``Normalize``.
- val/test with ``crop_val``: ``Resize(crop_size)`` (shorter side), ``CenterCrop(crop_size)``;
  without it: the full image.

Images are resampled bilinearly with antialiasing (what PIL does, as in the originals); masks with
``nearest-exact``, PIL's NEAREST rule (the source pixel containing the output pixel's centre).
torchvision's own mask kernels use ``nearest`` (source pixel ``floor(i·scale)``), which shifts
labels by up to half an output pixel against the bilinear image; the two classes below fix that.
No transform here reads outside the image (the crops stay inside it, the centre crop follows a
resize of the shorter side to the crop size), so no padding value ever enters a mask.
"""

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AlignedRandomResizedCrop",
    "AlignedResize",
    "train_transform",
    "val_transform",
    "to_normalized_tensors",
]


def _resize_mask(mask: tv_tensors.Mask, size) -> tv_tensors.Mask:
    return F.resize(mask, size, interpolation=v2.InterpolationMode.NEAREST_EXACT)


class AlignedRandomResizedCrop(v2.RandomResizedCrop):
    """``v2.RandomResizedCrop`` whose masks are resampled with ``nearest-exact``."""

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            cropped = F.crop(inpt, params["top"], params["left"], params["height"], params["width"])
            return _resize_mask(cropped, list(self.size))
        return super().transform(inpt, params)


class AlignedResize(v2.Resize):
    """``v2.Resize`` (shorter side to ``size`` for an int) with ``nearest-exact`` masks."""

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            return F.resize(
                inpt, self.size, interpolation=v2.InterpolationMode.NEAREST_EXACT,
                max_size=self.max_size,
            )
        return super().transform(inpt, params)


def _finish():
    """uint8 image -> float in [0, 1] -> ImageNet-normalised; masks -> int64."""
    return [
        v2.ToDtype(
            {tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None},
            scale=True,
        ),
        v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ]


def train_transform(crop_size: int) -> v2.Compose:
    """Random resized crop to ``crop_size²`` (scale 0.5–2.0, ratio 3/4–4/3), flip, normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            AlignedRandomResizedCrop(crop_size, scale=(0.5, 2.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
            v2.RandomHorizontalFlip(p=0.5),
            *_finish(),
        ]
    )


def val_transform(crop_size: int, crop_val: bool) -> v2.Compose:
    """``crop_val``: shorter side to ``crop_size`` then the central ``crop_size²``; else full image.

    After the resize the shorter side equals ``crop_size``, so the centre crop never pads.
    """
    spatial = [AlignedResize(crop_size), v2.CenterCrop(crop_size)] if crop_val else []
    return v2.Compose([v2.ToImage(), *spatial, *_finish()])


def to_normalized_tensors() -> v2.Compose:
    """Only the dtype conversion and normalisation (full image, no resampling)."""
    return v2.Compose([v2.ToImage(), *_finish()])
