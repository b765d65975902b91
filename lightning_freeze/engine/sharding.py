"""What the freezing callbacks need to know about sharded strategies (FSDP2, FSDP1) and the ones they refuse.

The strategy is recognised by its class name (and its bases' names), so no optional package (DeepSpeed) is
imported to check for it. What changes under sharding, and why:

- **FSDP2** (Lightning's ``ModelParallelStrategy``, ``fully_shard`` in ``configure_model``): ``fully_shard``
  replaces every parameter by a new ``DTensor`` parameter, and modules may only exist from ``configure_model``
  on. The layers are therefore resolved at fit start, on the model as the strategy set it up, not in ``setup``.
- **FSDP1** (``FSDPStrategy``): with ``use_orig_params=True`` the parameter objects survive the wrap, so the
  layers are resolved in ``setup`` as under DDP, on clean names. With ``use_orig_params=False`` a flat
  parameter trains or not as a whole: :func:`check_flat_param_units` refuses a layer spec that splits one.
- **Optimizer state dicts.** Both strategies save the optimizer through torch's distributed state-dict
  code, which maps param groups by the names of their parameters and cannot map more than one empty
  group. Under sharding a frozen layer's group therefore keeps its parameters as *inert members*
  (``requires_grad=False``, ``.grad=None``, no optimizer state; torch's optimizers skip a parameter without a
  gradient), so the group layout never changes and every saved group can be matched by name.
- **Resume.** Both strategies load the optimizer state inside ``load_checkpoint``, before any callback has
  its state back. :func:`saved_callback_state` reads the callback's own entry first, so the frozen set of the
  saved run is in place when the optimizer state is loaded.
- **Signals.** A gradient is sharded (a ``DTensor`` under FSDP2, a local slice or ``None`` under FSDP1):
  :func:`layer_norms` sums the squares of the local pieces per layer and all-reduces them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

StrategyKind = Literal["ddp", "fsdp1", "fsdp2", "deepspeed", "other"]

#: module attributes that wrappers put between a module and its children; never part of a layer name.
WRAPPER_NAME_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
SUPPORTED = (
    "ModelParallelStrategy with fully_shard (FSDP2, recommended for sharded models), "
    "FSDPStrategy(use_orig_params=True) (FSDP1), DDPStrategy, or a single device"
)


def strategy_kind(strategy: object) -> StrategyKind:
    """Which kind of strategy ``strategy`` is, by the names of its class and its bases (no import needed)."""
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if any("DeepSpeed" in name for name in names):
        return "deepspeed"
    if "ModelParallelStrategy" in names:
        return "fsdp2"
    if "FSDPStrategy" in names:
        return "fsdp1"
    if "DDPStrategy" in names:
        return "ddp"
    return "other"


def is_sharded(strategy: object) -> bool:
    return strategy_kind(strategy) in ("fsdp1", "fsdp2")


def check_supported_strategy(strategy: object, owner: str) -> None:
    """Refuse, before training, a strategy under which the frozen set cannot be kept exact.

    Args:
        strategy: the Trainer's strategy.
        owner: the callback's name, for the message.
    """
    if strategy_kind(strategy) == "deepspeed":
        raise ValueError(
            f"{owner} does not support {type(strategy).__name__}: DeepSpeed keeps its own copies of the parameters "
            "and optimizer partitions, so a layer frozen here could keep training there. Use "
            f"{SUPPORTED}."
        )


def clean_name(name: str) -> str:
    """A qualified name as the user wrote the model: the parts that wrappers insert left out."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_NAME_PARTS)


def is_wrapper(module: nn.Module) -> bool:
    """A module that only wraps another one (``torch.compile``, FSDP1, activation checkpointing)."""
    return any(isinstance(getattr(module, part, None), nn.Module) for part in WRAPPER_NAME_PARTS)


def reshard_fsdp2(model: nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back in its sharded state (a no-op for any other model)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this process holds: a DTensor's local shard, any other tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def layer_norms(
    grads: Sequence[torch.Tensor], owners: Sequence[int], n_layers: int, device: torch.device, sharded: bool
) -> torch.Tensor:
    """Each layer's gradient norm from ``grads`` (``owners[i]``: the layer of ``grads[i]``).

    Under sharding every rank holds a slice of each gradient: the squares are summed per layer over the local
    slices, then over the ranks (one all-reduce), so the norm is the norm of the whole gradient and every rank
    computes it alike. Every rank must call this at the same step under sharding, with or without gradients.
    """
    per_layer = torch.zeros(n_layers, device=device, dtype=torch.float32)
    if grads:
        local = [local_part(g) for g in grads]
        squares = torch.stack(torch._foreach_norm(local)).float().square().to(device)
        per_layer.index_add_(0, torch.as_tensor(owners, device=device), squares)
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(per_layer)
    return per_layer.sqrt()


def before_checkpoint_load(strategy: Any, action: Callable[[str], None]) -> Callable[[], None]:
    """Run ``action(checkpoint_path)`` right before ``strategy`` loads a checkpoint, once; returns the undo.

    Sharded strategies load the optimizer state inside ``load_checkpoint``, after ``on_fit_start`` and before any
    callback gets its state back, and the checkpoint path is known to nothing else at that point.
    """
    original = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        undo()
        action(str(checkpoint_path))
        return original(checkpoint_path, *args, **kwargs)

    def undo() -> None:
        if strategy.__dict__.get("load_checkpoint") is load_checkpoint:
            del strategy.load_checkpoint

    strategy.load_checkpoint = load_checkpoint
    return undo


def saved_callback_state(strategy: Any, path: str, state_key: str) -> dict[str, Any] | None:
    """The callback state saved under ``state_key`` in the checkpoint at ``path`` (None: no state of it).

    A distributed (sharded) checkpoint keeps it in the directory's metadata file, a full checkpoint in the
    file itself (memory-mapped, so only the small callback entry is read).
    """
    path = str(strategy.broadcast(path))
    if os.path.isdir(path):
        from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME

        meta = os.path.join(path, _METADATA_FILENAME)
        if not os.path.isfile(meta):
            return None
        checkpoint = torch.load(meta, map_location="cpu", weights_only=False)
    elif os.path.isfile(path):
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    else:
        return None
    state = checkpoint.get("callbacks", {}).get(state_key)
    return state if isinstance(state, dict) and state else None


def flat_param_units(model: nn.Module) -> list[tuple[str, list[str]]]:
    """FSDP1 units of ``model`` that use flat parameters (``use_orig_params=False``): (unit name, the clean
    qualified names of the original parameters it flattens). Empty for any other model."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover - torch built without distributed
        return []
    units = []
    for name, module in model.named_modules():
        if not isinstance(module, FSDP) or getattr(module, "_use_orig_params", True):
            continue
        handle = getattr(module, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        if flat is None:
            continue
        prefix = clean_name(name)
        fqns = [clean_name(f"{prefix}.{fqn}" if prefix else fqn) for fqn in flat._fqns]
        units.append((prefix or "<root>", fqns))
    return units


def check_flat_param_units(
    units: Sequence[tuple[str, Sequence[str]]], layer_params: dict[str, Sequence[str]], owner: str
) -> list[tuple[str, list[str]]]:
    """Refuse layers that split an FSDP1 flat parameter; return, per unit, the layers it holds whole.

    Args:
        units: (unit name, qualified names of the parameters it flattens), from :func:`flat_param_units`.
        layer_params: layer name -> qualified names of the layer's parameters.
        owner: the callback's name, for the message.

    Raises:
        ValueError: a unit holds part of a layer, or parts of the model outside the managed layers together
            with a managed layer, naming the unit, the layers in it and what to change.
    """
    layer_of = {pname: layer for layer, names in layer_params.items() for pname in names}
    whole = []
    for unit, fqns in units:
        inside = sorted({layer_of[f] for f in fqns if f in layer_of}, key=list(layer_params).index)
        if not inside:
            continue
        outside = [f for f in fqns if f not in layer_of]
        split = [layer for layer in inside if not set(layer_params[layer]) <= set(fqns)]
        if split or outside or len(inside) > 1:
            what = (
                f"only part of {split}"
                if split
                else f"{inside} together with {outside[:3]}{'...' if len(outside) > 3 else ''}"
                if outside
                else f"several layers {inside}, which the callback may freeze at different times"
            )
            raise ValueError(
                f"{owner}: FSDP unit {unit!r} flattens {what} into one flat parameter (use_orig_params=False), which "
                "trains or freezes only as a whole. Use FSDPStrategy(use_orig_params=True) (recommended), or an "
                "auto_wrap_policy that puts each managed layer in its own unit (e.g. ModuleWrapPolicy with the "
                "block class), or choose `layers` that match the units."
            )
        whole.append((unit, inside))
    return whole
