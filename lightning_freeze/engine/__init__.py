"""The freezing engine: naming layers (``layers``), freezing and thawing them (``freezing``) and the
optimizer's per-layer param groups and learning rates (``optim``). Torch only, no Lightning."""
