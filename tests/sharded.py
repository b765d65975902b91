"""Sharded strategies on CPU for the tests (gloo, real processes): FSDP2 through Lightning's
``ModelParallelStrategy`` and FSDP1 through a test-only ``FSDPStrategy`` subclass.

- FSDP2: the LightningModule applies ``fully_shard`` to every transformer block and then to the root in
  ``configure_model``, as Lightning documents it; ``ModelParallelStrategy`` runs on CPU as it is.
- FSDP1: :class:`lightning_freeze.fsdp.CPUFSDPStrategy` (Lightning refuses ``FSDPStrategy`` itself on the CPU),
  one unit per transformer block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lightning_freeze.engine.sharding import clean_name
from lightning_freeze.fsdp import CPUFSDPStrategy


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The transformer block classes of a transformers model (``BertLayer``, ``GPT2Block``): the classes of
    the children of its repeated ``ModuleList``."""
    return {
        type(child)
        for module in model.modules()
        if isinstance(module, nn.ModuleList) and len(module) > 1
        for child in module
    }


def shard_fsdp2(module: nn.Module, mesh: Any, units: Sequence[str] = ()) -> None:
    """``fully_shard`` every transformer block of ``module`` and the submodules named in ``units``, then ``module``
    itself (FSDP2's recipe)."""
    from torch.distributed.fsdp import fully_shard

    classes = block_classes(module)
    for name, sub in reversed(list(module.named_modules())):  # inner units first
        if type(sub) in classes or name in units:
            fully_shard(sub, mesh=mesh)
    fully_shard(module, mesh=mesh)


class ShardInConfigureModel:
    """Mixin: the user's LightningModule with FSDP2 applied in ``configure_model`` (every transformer block, the
    submodules named in ``fsdp2_units``, then the root); a no-op under other strategies."""

    fsdp2_units: Sequence[str] = ()

    def configure_model(self) -> None:
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None and not getattr(self, "_sharded", False):
            shard_fsdp2(self, mesh["data_parallel"], units=self.fsdp2_units)
            self._sharded = True


def make_strategy(kind: str, module: nn.Module, use_orig_params: bool = True, **kwargs: Any):
    """The strategy ``kind`` (ddp | fsdp1 | fsdp2) for 2 CPU processes; FSDP1 wraps each transformer block."""
    if kind == "ddp":
        return "ddp"
    if kind == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, **kwargs)
    if kind == "fsdp1":
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return CPUFSDPStrategy(
            auto_wrap_policy=ModuleWrapPolicy(block_classes(module)),
            use_orig_params=use_orig_params,
            process_group_backend="gloo",
            **kwargs,
        )
    raise ValueError(kind)


def full_state(trainer) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict, on every rank, under clean names (cloned, on the CPU)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    strategy = trainer.strategy
    model = strategy.model
    kind = type(strategy).__name__
    if kind == "ModelParallelStrategy":
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    elif isinstance(strategy, CPUFSDPStrategy):
        with strategy.full_state_dict_context(rank0_only=False):
            state = model.state_dict()
    else:
        state = trainer.lightning_module.state_dict()
    return {clean_name(k): _full(v).detach().clone() for k, v in state.items()}


def _full(t: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t
