"""The freezing callbacks."""

from lightning_freeze.callbacks.cache import FrozenPrefixCache
from lightning_freeze.callbacks.freezeout import FreezeOut
from lightning_freeze.callbacks.layer_freeze import LayerFreeze
from lightning_freeze.callbacks.unfreezing import ProgressiveUnfreezing

__all__ = ["FreezeOut", "FrozenPrefixCache", "LayerFreeze", "ProgressiveUnfreezing"]
