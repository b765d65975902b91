"""lightning-freeze: layer-freezing callbacks and deterministic split runs for PyTorch Lightning."""

from lightning_freeze.callbacks.layer_freeze import LayerFreeze
from lightning_freeze.layers import select_layers

__all__ = ["LayerFreeze", "select_layers"]
__version__ = "0.1.0"
