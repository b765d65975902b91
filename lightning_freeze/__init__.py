"""lightning-freeze: layer-freezing callbacks and deterministic split runs for PyTorch Lightning.

The public names are imported on first use, so ``lightning-freeze --help`` and a misspelt Hydra
override answer without importing torch and Lightning first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_freeze._lazy import lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lightning_freeze.cache import (
        FrozenPrefixCache as FrozenPrefixCache,
    )
    from lightning_freeze.callbacks.adaptive import (
        AdaptiveFreeze as AdaptiveFreeze,
    )
    from lightning_freeze.callbacks.freezeout import (
        FreezeOut as FreezeOut,
    )
    from lightning_freeze.callbacks.layer_freeze import (
        LayerFreeze as LayerFreeze,
    )
    from lightning_freeze.callbacks.layer_sampling import (
        LayerSampling as LayerSampling,
    )
    from lightning_freeze.callbacks.resume import (
        ExactResume as ExactResume,
    )
    from lightning_freeze.callbacks.unfreezing import (
        ProgressiveUnfreezing as ProgressiveUnfreezing,
    )
    from lightning_freeze.engine.layers import (
        select_layers as select_layers,
    )
    from lightning_freeze.splitrun.datamodule import (
        SplitRunDataModule as SplitRunDataModule,
    )
    from lightning_freeze.validation import (
        FreezeWarning as FreezeWarning,
    )


__all__, __getattr__, __dir__ = lazy_exports(globals())
