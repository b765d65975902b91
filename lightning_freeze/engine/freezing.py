"""The one place that freezes and thaws layers.

Freezing a layer sets ``requires_grad=False`` and ``.grad=None`` on its parameters, takes them out of
the optimizer's param groups and frees their optimizer state, and keeps its modules in eval mode (norm
statistics fixed, dropout off). Thawing undoes exactly that. A parameter the user had frozen before we
saw the model is never thawed, and :meth:`FreezeEngine.release` hands the model back as it was given.

**Tied parameters.** A parameter held by several modules (GPT-2's ``wte`` and ``lm_head``) is frozen only
when every layer that uses it is frozen; a module outside the managed layers that uses it counts as a
user that always trains. Freezing one user of a tie keeps the shared tensor trainable and says so once.

**Eval mode** is kept by replacing ``train()`` on each frozen layer's top modules: Lightning switches the
whole model back to ``train()`` after every validation run, and the replacement keeps the frozen part in
eval through that. The mode of a module then changes only at a freeze or a thaw, so a ``torch.compile``'d
model recompiles at most once per transition (a per-call hook would flip it on every call). The modes are
applied from :meth:`FreezeEngine.activate_modes` on (the callbacks call it at train start, after
Lightning's check for modules left in eval mode).
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable, Sequence

from torch import nn
from torch.optim import Optimizer

from lightning_freeze.engine.layers import Layer
from lightning_freeze.engine.optim import GroupLayout, split_into_layer_groups
from lightning_freeze.engine.sharding import clean_name
from lightning_freeze.validation import FreezeWarning, check_choice

NORM_MODES = ("eval", "train")
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def untrainable_layers(layers: Iterable[Layer]) -> list[str]:
    """Names of the ``layers`` in which nothing trains now: every parameter was frozen by someone else (peft's
    base weights around an adapter-less block, a user's ``requires_grad=False``)."""
    return [layer.name for layer in layers if not any(p.requires_grad for p in layer.params)]


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter elements of ``model``."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


class FreezeEngine:
    """Frozen/thawed state of an ordered set of layers of one model.

    ``norm="eval"`` (default) freezes norm layers like everything else: statistics and affine weights are
    fixed. ``norm="train"`` is fastai's ``train_bn``: norm layers inside frozen layers keep training, both
    their running statistics and their affine weights. ``owner`` names the callback in messages.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[Layer],
        norm: str = "eval",
        owner: str = "",
        keep_frozen_in_groups: bool = False,
    ) -> None:
        self.norm = check_choice(norm, "norm", NORM_MODES, where=owner or "FreezeEngine")
        self.model = model
        # Under a sharded strategy a frozen layer's group keeps its parameters as inert members (no grad, no
        # state): torch's distributed optimizer state dict maps groups by their parameters' names and cannot map
        # several empty groups (see engine/sharding.py).
        self.keep_frozen_in_groups = keep_frozen_in_groups
        self.layers = list(layers)
        self.by_name = {layer.name: layer for layer in self.layers}
        self.owner = owner or "FreezeEngine"
        self.requires_grad_at_start = {id(p): p.requires_grad for layer in self.layers for p in layer.params}
        self.user_frozen = {pid for pid, trains in self.requires_grad_at_start.items() if not trains}
        # A layer someone else froze whole is frozen from the start (eval mode, so its output is a pure function
        # a cache can serve) and stays frozen: it is never thawed and never counts as a freeze of ours.
        self.untrainable = frozenset(untrainable_layers(self.layers))
        self.frozen: set[str] = set(self.untrainable)
        self.transitions = 0  # freezes and thaws that changed something: a cheap "did anything change?" check
        self.optimizer: Optimizer | None = None
        self.layout: GroupLayout | None = None
        self.modes_active = False
        self._norm_params = self._params_of_norm_modules() if norm == "train" else set()
        self._outside_users: dict[int, list[str]] = {}  # id(param) -> modules outside the layers that use it
        self._users = self._users_of_params()
        self._kept_eval: dict[int, tuple[nn.Module, object]] = {}  # id -> (module, its own train() before)
        self._told: set[tuple[str, str]] = set()

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

    def trainable(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.params if p.requires_grad]

    def eval_modules(self) -> list[nn.Module]:
        """The modules kept in eval mode because their layer is frozen (norm layers too unless norm='train')."""
        return [m for name in self.frozen for m in self._mode_managed(self.by_name[name])]

    def tied_users(self, param: nn.Parameter) -> list[str | None]:
        """The layers that use ``param`` (None: a module outside the managed layers)."""
        return list(self._users.get(id(param), []))

    # ------------------------------------------------------------------ optimizer
    def attach(self, optimizer: Optimizer, schedulers: Sequence[object] = ()) -> GroupLayout:
        """Split ``optimizer`` into per-layer named groups that hold only what trains now."""
        self.optimizer = optimizer
        names = {id(p): clean_name(n) for n, p in self.model.named_parameters()}
        members = self._group_members()
        self.layout = split_into_layer_groups(
            optimizer, self.layers, members, schedulers, names, empty_groups_last=self.keep_frozen_in_groups
        )
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
        self.frozen.update(changed)
        self.transitions += bool(changed)
        for name in changed:
            layer = self.by_name[name]
            for p in self._freezable(layer):
                if self._all_users_frozen(p):
                    p.requires_grad_(False)
                    p.grad = None
                    if self.optimizer is not None:
                        self.optimizer.state.pop(p, None)
                else:
                    self._tell_tie(layer, p)
            if self.modes_active:
                self._keep_eval(layer)
        self._sync_groups(changed + self.reassert())
        return changed

    def thaw(self, names: Iterable[str]) -> list[str]:
        """Thaw the named layers (a layer in :attr:`untrainable` stays frozen); returns the names that changed."""
        changed = [n for n in names if n in self.frozen and n not in self.untrainable]
        self.frozen.difference_update(changed)
        self.transitions += bool(changed)
        for name in changed:
            layer = self.by_name[name]
            for p in self._freezable(layer):
                p.requires_grad_(True)
            self._release_eval(layer)
        self._sync_groups(changed + self.reassert())
        return changed

    def reassert(self) -> list[str]:
        """Put every managed parameter's ``requires_grad`` back to what the frozen set intends; returns the
        layers that had a wrong flag (set by someone else between transitions, e.g. peft's ``set_adapter``).

        A parameter frozen before we saw the model never trains; one of a frozen layer trains only while a
        tie or ``norm="train"`` keeps it training; every other one trains.
        """
        fixed = []
        for layer in self.layers:
            wrong = [p for p in layer.params if p.requires_grad != self._intended(p)]
            for p in wrong:
                p.requires_grad_(not p.requires_grad)
                if not p.requires_grad:
                    p.grad = None
                    if self.optimizer is not None:
                        self.optimizer.state.pop(p, None)
            if wrong:
                fixed.append(layer.name)
        if fixed and ("reassert", ",".join(fixed)) not in self._told:
            self._told.add(("reassert", ",".join(fixed)))
            warnings.warn(
                f"{self.owner}: requires_grad was changed outside the freezing callback in {fixed} (by an adapter "
                "library's set_adapter, or by hand); put back to the callback's frozen set",
                FreezeWarning,
                stacklevel=3,
            )
        return fixed

    def activate_modes(self) -> None:
        """From now on keep frozen layers in eval mode (and put those frozen so far there now)."""
        self.modes_active = True
        for name in self.frozen:
            self._keep_eval(self.by_name[name])

    def release(self) -> None:
        """Hand the model back as it was given: every ``requires_grad`` as before, no mode override left, no
        optimizer attached. Safe to call more than once. :attr:`frozen` keeps saying which layers the run
        ended with frozen (a checkpoint saved after fit resumes with them frozen)."""
        for layer in self.layers:
            for p in layer.params:
                p.requires_grad_(self.requires_grad_at_start.get(id(p), p.requires_grad))
            self._release_eval(layer)
        self.modes_active = False
        self.detach()

    # ------------------------------------------------------------------ internals
    def _group_members(self) -> list[nn.Parameter]:
        """The managed parameters the per-layer groups hold: what trains now, or every one of them when frozen
        parameters stay in their groups as inert members."""
        if self.keep_frozen_in_groups:
            return [p for layer in self.layers for p in layer.params]
        return self.trainable()

    def _freezable(self, layer: Layer) -> list[nn.Parameter]:
        return [p for p in layer.params if id(p) not in self.user_frozen and id(p) not in self._norm_params]

    def _intended(self, p: nn.Parameter) -> bool:
        if id(p) in self.user_frozen:
            return False
        return id(p) in self._norm_params or not self._all_users_frozen(p)

    def _all_users_frozen(self, p: nn.Parameter) -> bool:
        return all(user is not None and user in self.frozen for user in self._users.get(id(p), ()))

    def _tell_tie(self, layer: Layer, p: nn.Parameter) -> None:
        training = [u for u in self._users[id(p)] if u is not None and u not in self.frozen]
        training += self._outside_users.get(id(p), [])
        key = (layer.name, str(id(p)))
        if key in self._told:
            return
        self._told.add(key)
        pname = next((clean_name(n) for n, q in self.model.named_parameters() if q is p), "a parameter")
        warnings.warn(
            f"{self.owner}: {layer.name!r} shares {pname!r} with {training} (tied weights); the shared tensor "
            "keeps training until every layer that uses it is frozen",
            FreezeWarning,
            stacklevel=3,
        )

    def _users_of_params(self) -> dict[int, list[str | None]]:
        """id(param) -> the managed layers that use it, plus None if a module outside them does."""
        managed = {id(p) for layer in self.layers for p in layer.params}
        covering: dict[int, str] = {}  # module id -> the layer whose modules contain it
        holding: dict[int, str] = {}  # module id -> the layer made of that module's own parameters
        for layer in self.layers:
            if layer.holder is not None:
                holding[id(layer.holder)] = layer.name
            for top in layer.modules:
                covering.update((id(m), layer.name) for m in top.modules())
        users: dict[int, list[str | None]] = {}
        for name, module in self.model.named_modules():
            for p in module.parameters(recurse=False):
                if id(p) in managed:
                    user = covering.get(id(module), holding.get(id(module)))
                    if user not in users.setdefault(id(p), []):
                        users[id(p)].append(user)
                    if user is None:
                        self._outside_users.setdefault(id(p), []).append(name)
        return users

    def _sync_groups(self, changed: Sequence[str]) -> None:
        # Rebuild the group lists of every layer that holds a parameter of a changed layer (a tie may live in
        # another layer's group), from the layer's own order, so a resumed run lays out the optimizer
        # exactly like the run that saved it.
        if self.optimizer is None or self.layout is None or not changed:
            return
        touched = {id(p) for name in changed for p in self.by_name[name].params}
        for layer in self.layers:
            if not any(id(p) in touched for p in layer.params):
                continue
            for index in self.layout.layer_groups[layer.name]:
                self.optimizer.param_groups[index]["params"] = [
                    p
                    for p in layer.params
                    if (p.requires_grad or self.keep_frozen_in_groups)
                    and self.layout.param_group[id(p)] == index
                ]

    def _mode_managed(self, layer: Layer) -> list[nn.Module]:
        modules = [m for top in layer.modules for m in top.modules()]
        if self.norm == "train":
            modules = [m for m in modules if not isinstance(m, NORM_TYPES)]
        return modules

    def _keep_eval(self, layer: Layer) -> None:
        norm_trains = self.norm == "train"
        for top in layer.modules:
            if id(top) in self._kept_eval:
                continue
            self._kept_eval[id(top)] = (top, top.__dict__.get("train"))

            def train(module: nn.Module, mode: bool = True) -> nn.Module:
                for m in module.modules():
                    m.training = bool(mode) and norm_trains and isinstance(m, NORM_TYPES)
                return module

            top.train = types.MethodType(train, top)  # type: ignore[method-assign]
            top.train(self.model.training)

    def _release_eval(self, layer: Layer) -> None:
        for top in layer.modules:
            kept = self._kept_eval.pop(id(top), None)
            if kept is None:
                continue
            if kept[1] is None:
                del top.train
            else:
                top.train = kept[1]  # type: ignore[method-assign]
            top.train(self.model.training)

    def _params_of_norm_modules(self) -> set[int]:
        return {
            id(p)
            for layer in self.layers
            for top in layer.modules
            for m in top.modules()
            if isinstance(m, NORM_TYPES)
            for p in m.parameters(recurse=False)
        }
