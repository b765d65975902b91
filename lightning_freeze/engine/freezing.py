"""The one place that freezes and thaws layers.

Freezing a layer sets ``requires_grad=False`` and ``.grad=None`` on its parameters, takes them out of
the optimizer's param groups and frees their optimizer state, and keeps its norm and dropout modules in
eval mode. Thawing undoes exactly that. A parameter the user had frozen before we saw the model is never
thawed.

Eval mode is kept with a forward pre-hook on each module of a frozen layer rather than by calling
``eval()`` once: Lightning switches the whole model back to ``train()`` after every validation run, and
it warns about modules that are in eval mode when training starts. The hook puts the module back in
eval right before it runs, which survives both and costs one attribute check per module call.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence

from torch import nn
from torch.optim import Optimizer

from lightning_freeze.engine.layers import Layer
from lightning_freeze.engine.optim import GroupLayout, split_into_layer_groups
from lightning_freeze.rules.checks import check_choice

NORM_MODES = ("eval", "train")
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

_ENGINES: weakref.WeakKeyDictionary[nn.Module, FreezeEngine] = weakref.WeakKeyDictionary()


def engine_for(model: nn.Module) -> FreezeEngine | None:
    """The engine that manages ``model``'s layers, if a freezing callback set one up."""
    return _ENGINES.get(model)


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter elements of ``model``."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _keep_eval(module: nn.Module, args: object) -> None:
    if module.training:
        module.training = False


class FreezeEngine:
    """Frozen/thawed state of an ordered set of layers of one model.

    ``norm="eval"`` (default) freezes norm layers like everything else: statistics and affine weights are
    fixed. ``norm="train"`` is fastai's ``train_bn``: norm layers inside frozen layers keep training, both
    their running statistics and their affine weights.
    """

    def __init__(self, model: nn.Module, layers: Sequence[Layer], norm: str = "eval") -> None:
        check_choice(norm, "norm", NORM_MODES, where="FreezeEngine")
        self.model = model
        self.layers = list(layers)
        self.by_name = {layer.name: layer for layer in self.layers}
        self.norm = norm
        self.user_frozen = {id(p) for layer in self.layers for p in layer.params if not p.requires_grad}
        self.frozen: set[str] = set()
        self.optimizer: Optimizer | None = None
        self.layout: GroupLayout | None = None
        self._hooks: dict[str, list] = {}
        self._norm_params = self._params_of_norm_modules() if norm == "train" else set()

    def register(self) -> None:
        other = _ENGINES.get(self.model)
        if other is not None and other is not self:
            raise RuntimeError(
                "two freezing callbacks manage the same model; use one of LayerFreeze, FreezeOut and "
                "ProgressiveUnfreezing per Trainer"
            )
        _ENGINES[self.model] = self

    def unregister(self) -> None:
        if _ENGINES.get(self.model) is self:
            del _ENGINES[self.model]

    # ------------------------------------------------------------------ queries
    def is_frozen(self, name: str) -> bool:
        return name in self.frozen

    def frozen_prefix(self) -> list[Layer]:
        """The longest run of frozen layers from the first managed layer on."""
        prefix = []
        for layer in self.layers:
            if layer.name not in self.frozen:
                break
            prefix.append(layer)
        return prefix

    def freezable(self, layer: Layer) -> list[nn.Parameter]:
        return [p for p in layer.params if id(p) not in self.user_frozen and id(p) not in self._norm_params]

    def trainable(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.params if p.requires_grad]

    # ------------------------------------------------------------------ optimizer
    def attach(self, optimizer: Optimizer, schedulers: Sequence[object] = ()) -> GroupLayout:
        """Split ``optimizer`` into per-layer named groups that hold only what trains now."""
        self.optimizer = optimizer
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.layout = split_into_layer_groups(optimizer, self.layers, self.trainable(), schedulers, names)
        return self.layout

    def detach(self) -> None:
        self.optimizer = None
        self.layout = None

    def group_indices(self, name: str) -> list[int]:
        assert self.layout is not None, "attach an optimizer first"
        return self.layout.layer_groups[name]

    # ------------------------------------------------------------------ transitions
    def freeze(self, names: Iterable[str]) -> list[str]:
        """Freeze the named layers; returns the names that changed."""
        changed = [n for n in names if n not in self.frozen]
        for name in changed:
            layer = self.by_name[name]
            for p in self.freezable(layer):
                p.requires_grad_(False)
                p.grad = None
                if self.optimizer is not None:
                    self.optimizer.state.pop(p, None)
            self._sync_groups(layer)
            self._hooks[name] = [
                m.register_forward_pre_hook(_keep_eval) for m in self._mode_managed_modules(layer)
            ]
            self.frozen.add(name)
        return changed

    def thaw(self, names: Iterable[str]) -> list[str]:
        """Thaw the named layers; returns the names that changed."""
        changed = [n for n in names if n in self.frozen]
        for name in changed:
            layer = self.by_name[name]
            for p in self.freezable(layer):
                p.requires_grad_(True)
            self._sync_groups(layer)
            for handle in self._hooks.pop(name, []):
                handle.remove()
            for module in self._mode_managed_modules(layer):
                module.training = self.model.training
            self.frozen.discard(name)
        return changed

    def _sync_groups(self, layer: Layer) -> None:
        # Rebuild the layer's group lists from the layer's own order, so a resumed run lays out the
        # optimizer exactly like the run that saved it.
        if self.optimizer is None or self.layout is None:
            return
        for index in self.layout.layer_groups[layer.name]:
            self.optimizer.param_groups[index]["params"] = [
                p for p in layer.params if p.requires_grad and self.layout.param_group[id(p)] == index
            ]

    def _mode_managed_modules(self, layer: Layer) -> list[nn.Module]:
        modules = [m for top in layer.modules for m in top.modules()]
        if self.norm == "train":
            modules = [m for m in modules if not isinstance(m, _NORM_TYPES)]
        return modules

    def _params_of_norm_modules(self) -> set[int]:
        return {
            id(p)
            for layer in self.layers
            for top in layer.modules
            for m in top.modules()
            if isinstance(m, _NORM_TYPES)
            for p in m.parameters(recurse=False)
        }
