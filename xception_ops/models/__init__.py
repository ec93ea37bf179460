"""Models built on the fused ops."""

from .xception import BN_CONVENTIONS, MaxPool2dSame, Xception, XceptionBlock, from_timm, timm_key_map, xception

__all__ = ["BN_CONVENTIONS", "MaxPool2dSame", "Xception", "XceptionBlock", "from_timm", "timm_key_map",
           "xception"]
