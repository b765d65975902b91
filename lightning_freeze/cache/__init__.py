"""FrozenPrefixCache: serve the frozen prefix's output from a per-sample cache instead of recomputing it."""

from lightning_freeze.cache.callback import FrozenPrefixCache

__all__ = ["FrozenPrefixCache"]
