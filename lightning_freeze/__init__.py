"""lightning-freeze: layer-freezing callbacks and deterministic split runs for PyTorch Lightning.

The public names are imported on first use, so ``lightning-freeze --help`` and a misspelt Hydra
override answer without importing torch and Lightning first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_freeze._lazy import lazy_exports

_EXPORTS = {
    "AdaptiveFreeze": "lightning_freeze.callbacks.adaptive",
    "ExactResume": "lightning_freeze.callbacks.resume",
    "FreezeOut": "lightning_freeze.callbacks.freezeout",
    "FrozenPrefixCache": "lightning_freeze.cache",
    "LayerFreeze": "lightning_freeze.callbacks.layer_freeze",
    "ProgressiveUnfreezing": "lightning_freeze.callbacks.unfreezing",
    "SplitRunDataModule": "lightning_freeze.splitrun.datamodule",
    "select_layers": "lightning_freeze.engine.layers",
}

__all__ = [
    "AdaptiveFreeze",
    "ExactResume",
    "FreezeOut",
    "FrozenPrefixCache",
    "LayerFreeze",
    "ProgressiveUnfreezing",
    "SplitRunDataModule",
    "select_layers",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from lightning_freeze.cache import FrozenPrefixCache
    from lightning_freeze.callbacks.adaptive import AdaptiveFreeze
    from lightning_freeze.callbacks.freezeout import FreezeOut
    from lightning_freeze.callbacks.layer_freeze import LayerFreeze
    from lightning_freeze.callbacks.resume import ExactResume
    from lightning_freeze.callbacks.unfreezing import ProgressiveUnfreezing
    from lightning_freeze.engine.layers import select_layers
    from lightning_freeze.splitrun.datamodule import SplitRunDataModule


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
