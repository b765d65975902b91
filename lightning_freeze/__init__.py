"""lightning-freeze: layer-freezing callbacks and deterministic split runs for PyTorch Lightning."""

from lightning_freeze.callbacks.cache import FrozenPrefixCache
from lightning_freeze.callbacks.freezeout import FreezeOut
from lightning_freeze.callbacks.layer_freeze import LayerFreeze
from lightning_freeze.callbacks.unfreezing import ProgressiveUnfreezing
from lightning_freeze.layers import select_layers
from lightning_freeze.splitrun.datamodule import SplitRunDataModule

__all__ = [
    "FreezeOut",
    "FrozenPrefixCache",
    "LayerFreeze",
    "ProgressiveUnfreezing",
    "SplitRunDataModule",
    "select_layers",
]
__version__ = "0.1.0"
