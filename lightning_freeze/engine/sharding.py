"""What the freezing callbacks need to know about sharded strategies (FSDP2, FSDP1) and the ones they refuse.

The strategy is recognised by its class name (and its bases' names), so no optional package (DeepSpeed) is
imported to check for it. What changes under sharding, and why:

- **FSDP2** (Lightning's ``ModelParallelStrategy``, ``fully_shard`` in ``configure_model``): ``fully_shard``
  replaces every parameter by a new ``DTensor`` parameter, and modules may only exist from ``configure_model``
  on. The layers are therefore resolved at fit start, on the model as the strategy set it up, not in ``setup``.
- **FSDP1** (``FSDPStrategy``): with ``use_orig_params=True`` the parameter objects survive the wrap, so the
  layers are resolved in ``setup`` as under DDP, on clean names. With ``use_orig_params=False`` a flat
  parameter trains or not as a whole: :func:`layers_on_flat_params` refuses a layer spec that splits one, and
  binds a layer that is a whole unit to the unit's flat parameter.
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from lightning_freeze.engine.layers import Layer

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


def check_supported_strategy(strategy: object, owner: str, fsdp1_refused: str | None = None) -> None:
    """Refuse, before training, a strategy under which ``owner`` cannot keep its promise.

    Args:
        strategy: the Trainer's strategy.
        owner: the callback's name, for the message.
        fsdp1_refused: why ``owner`` refuses FSDP1 (``FSDPStrategy``); None: it works there.
    """
    kind = strategy_kind(strategy)
    if fsdp1_refused is not None and kind == "fsdp1":
        raise ValueError(
            f"{owner} does not support {type(strategy).__name__} (FSDP1): {fsdp1_refused}. Use "
            "ModelParallelStrategy with fully_shard (FSDP2, recommended; see docs/sharded.md), or leave "
            f"{owner} out under FSDP1 (the freezing callbacks work there)."
        )
    if kind == "deepspeed":
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


def lasting_params(model: nn.Module, tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` with every FSDP2 unsharded parameter replaced by the sharded parameter it stands for.

    Between a unit's all-gather and its reshard, FSDP2 puts unsharded parameters on the modules: views of an
    all-gather buffer whose storage it frees after use (``resize_(0)``) and refills every step. Whatever must
    watch a parameter across steps (the cache's guard) holds the sharded parameter instead: the one the optimizer
    holds, whose local shard lasts. Reading the buffer through numpy would also pin its storage (numpy makes a
    storage non-resizable) and make FSDP2's next reshard fail. A no-op for any other model.

    Args:
        model: the model the tensors belong to (its FSDP2 units are found in it).
        tensors: parameters and buffers as the modules hold them now.
    """
    pairs: dict[int, torch.Tensor] = {}
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if not callable(get_state):
            continue
        for group in getattr(get_state(), "_fsdp_param_groups", ()) or ():
            for fsdp_param in group.fsdp_params:
                unsharded = fsdp_param.__dict__.get("_unsharded_param")
                if unsharded is not None:
                    pairs[id(unsharded)] = fsdp_param.sharded_param
    return [pairs.get(id(t), t) for t in tensors]


def parameter_counts(model: nn.Module, strategy: object) -> tuple[int, int]:
    """(trainable, total) parameter elements of ``model``, whole also under FSDP1, whose original parameters are
    views of this rank's shard outside a forward (their counts are summed over the ranks; every rank must call
    this then). A DTensor (FSDP2) counts its global elements already.

    Args:
        model: the LightningModule (or any module) whose parameters are counted.
        strategy: the Trainer's strategy (FSDP1: the counts are all-reduced).
    """
    params = list(model.parameters())
    trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    if strategy_kind(strategy) != "fsdp1" or not torch.distributed.is_initialized():
        return trainable, total
    counts = torch.tensor(
        [trainable, total], dtype=torch.int64, device=getattr(strategy, "root_device", None)
    )
    torch.distributed.all_reduce(counts)
    return int(counts[0]), int(counts[1])


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


def layers_on_flat_params(model: nn.Module, layers: Sequence[Layer], owner: str) -> list[Layer]:
    """The managed layers as FSDP1 with flat parameters (``use_orig_params=False``) holds them: each layer whose
    unit flattens it alone is rebound to that unit's flat parameter, which then freezes and thaws as the layer.

    Args:
        model: the wrapped model (``trainer.strategy.model``).
        layers: the layers resolved before the wrap (their modules survive it, their parameters do not).
        owner: the callback's name, for the message.

    Raises:
        ValueError: a unit flattens part of a layer, several layers, or a layer together with parameters outside
            the managed layers: naming the unit, the layers in it and what to change.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover - torch built without distributed
        return list(layers)
    rebound = {}
    for unit_name, unit in model.named_modules():
        flat = getattr(getattr(unit, "_handle", None), "flat_param", None)
        if not isinstance(unit, FSDP) or flat is None or getattr(unit, "_use_orig_params", True):
            continue
        owners = [[layer for layer in layers if layer.covers(info.module)] for info in flat._param_infos]
        inside = [layer for layer in layers if any(layer in found for found in owners)]
        if not inside:
            continue
        name = clean_name(unit_name) or "<root>"
        outside = [fqn for fqn, found in zip(flat._fqns, owners, strict=True) if not found]
        whole = len(inside) == 1 and len(owners) >= len(inside[0].params)
        if len(inside) > 1 or outside or not whole:
            what = (
                f"several managed layers {[layer.name for layer in inside]}"
                if len(inside) > 1
                else f"{inside[0].name!r} together with parameters outside the managed layers ({outside[:3]})"
                if outside
                else f"only part of {inside[0].name!r}"
            )
            raise ValueError(
                f"{owner}: FSDP unit {name!r} flattens {what} into one flat parameter (use_orig_params=False), "
                "which trains or freezes only as a whole, so the callback could not keep its frozen set exact. Use "
                "FSDPStrategy(use_orig_params=True) (recommended), or an auto_wrap_policy that puts each managed "
                "layer in its own unit (e.g. ModuleWrapPolicy with the block class), or `layers` that match the "
                "units."
            )
        rebound[inside[0].name] = replace(inside[0], params=(flat,), holder=unit)
    return [rebound.get(layer.name, layer) for layer in layers]
