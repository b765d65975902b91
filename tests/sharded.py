"""Sharded strategies on CPU for the tests (gloo, real processes): FSDP2 through Lightning's
``ModelParallelStrategy`` and FSDP1 through a test-only ``FSDPStrategy`` subclass.

- FSDP2: the LightningModule applies ``fully_shard`` to every transformer block and then to the root in
  ``configure_model``, as Lightning documents it; ``ModelParallelStrategy`` runs on CPU as it is.
- FSDP1: Lightning refuses ``FSDPStrategy`` on the CPU accelerator (a check on the exact class) and passes
  ``device_id=None`` there, which torch refuses for CPU modules; :class:`CpuFSDPStrategy` wraps with
  ``device_id=torch.device("cpu")`` and gathers full state dicts without CPU offload (Lightning's offload
  of an already-CPU tensor crashes in torch's clone on CPU).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_freeze.engine.sharding import clean_name


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The transformer block classes of a transformers model (``BertLayer``, ``GPT2Block``): the classes of
    the children of its repeated ``ModuleList``."""
    return {
        type(child)
        for module in model.modules()
        if isinstance(module, nn.ModuleList) and len(module) > 1
        for child in module
    }


def shard_fsdp2(module: nn.Module, mesh: Any) -> None:
    """``fully_shard`` every transformer block of ``module``, then ``module`` itself (FSDP2's recipe)."""
    from torch.distributed.fsdp import fully_shard

    classes = block_classes(module)
    for sub in list(module.modules()):
        if type(sub) in classes:
            fully_shard(sub, mesh=mesh)
    fully_shard(module, mesh=mesh)


class CpuFSDPStrategy(FSDPStrategy):
    """FSDP1 on the CPU, for tests only (see the module docstring)."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )

    def _full_context(self, rank0_only: bool = True):
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        with self._full_context():
            return self.model.state_dict()

    def optimizer_state(self, optimizer):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        with self._full_context():
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state


def make_strategy(kind: str, module: nn.Module, use_orig_params: bool = True, **kwargs: Any):
    """The strategy ``kind`` (ddp | fsdp1 | fsdp2) for 2 CPU processes; FSDP1 wraps each transformer block."""
    if kind == "ddp":
        return "ddp"
    if kind == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, **kwargs)
    if kind == "fsdp1":
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return CpuFSDPStrategy(
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
    elif isinstance(strategy, CpuFSDPStrategy):
        with strategy._full_context(rank0_only=False):
            state = model.state_dict()
    else:
        state = trainer.lightning_module.state_dict()
    return {clean_name(k): _full(v).detach().clone() for k, v in state.items()}


def _full(t: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t
