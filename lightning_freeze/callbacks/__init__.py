"""The freezing callbacks: they decide *when* layers freeze or thaw; the engine does the work."""

from lightning_freeze.callbacks.adaptive import AdaptiveFreeze
from lightning_freeze.callbacks.freezeout import FreezeOut
from lightning_freeze.callbacks.layer_freeze import LayerFreeze
from lightning_freeze.callbacks.layer_sampling import LayerSampling
from lightning_freeze.callbacks.unfreezing import ProgressiveUnfreezing

__all__ = ["AdaptiveFreeze", "FreezeOut", "LayerFreeze", "LayerSampling", "ProgressiveUnfreezing"]
