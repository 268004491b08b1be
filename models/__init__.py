"""Backbones: MiT encoders (SegFormer) and dilated ResNets (DeepLab)."""

from models.mit import MixVisionTransformer, mit_b0, mit_b1, mit_b2, mit_b3, mit_b4, mit_b5, mit_variant
from models.resnet import ResNet, load_resnet_imagenet, net_resnet50, net_resnet101

__all__ = [
    "MixVisionTransformer",
    "mit_b0",
    "mit_b1",
    "mit_b2",
    "mit_b3",
    "mit_b4",
    "mit_b5",
    "mit_variant",
    "ResNet",
    "net_resnet50",
    "net_resnet101",
    "load_resnet_imagenet",
]
