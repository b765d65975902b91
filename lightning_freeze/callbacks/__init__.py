"""The freezing callbacks."""

from lightning_freeze.callbacks.layer_freeze import LayerFreeze

__all__ = ["LayerFreeze"]
