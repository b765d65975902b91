"""lightning-freeze: layer-freezing callbacks and deterministic split runs for PyTorch Lightning.

The public names are imported on first use, so ``lightning-freeze --help`` and a misspelt Hydra
override answer without importing torch and Lightning first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_freeze' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
