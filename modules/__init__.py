"""Heads and layers: SegFormer decoders, DeepLabV3's ASPP, activated batch norm."""

from modules.deeplab import DeeplabV3
from modules.norm_act import ABN, SyncABN, make_norm_act
from modules.segformer_head import SATSHead, SegFormerMLPHead

__all__ = ["SATSHead", "SegFormerMLPHead", "DeeplabV3", "ABN", "SyncABN", "make_norm_act"]
