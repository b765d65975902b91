"""FSDP settings for the app and for trying sharded runs on a CPU machine.

- :func:`block_wrap_policy`: the wrap policy for transformers models: one FSDP unit per transformer block
  (``BertLayer``, ``GPT2Block``, ``LlamaDecoderLayer``, ...). A freezing callback with ``layers="auto"``
  manages exactly these blocks, so with this policy every managed block is a unit of its own: FSDP1 with flat
  parameters (``use_orig_params=False``) then works too, and a frozen block's unit has no gradient to reduce.
- :class:`CPUFSDPStrategy`: Lightning's ``FSDPStrategy`` (FSDP1) on the CPU with gloo, for trying a sharded
  setup without a GPU (``trainer=fsdp_cpu``) and for tests. Lightning refuses ``FSDPStrategy`` on the CPU and
  passes ``device_id=None`` there, which torch refuses; this subclass wraps with ``device_id=cpu`` and gathers
  full state dicts without CPU offload (the offload of tensors already on the CPU crashes in torch's clone).
  On GPUs use :class:`KeepWrapperFSDPStrategy` (``trainer=fsdp``).
- :class:`KeepWrapperFSDPStrategy`: Lightning's ``FSDPStrategy`` that validates, tests and predicts after ``fit``
  on the same Trainer through the FSDP wrapper ``fit`` made. Lightning's own wraps the LightningModule a second
  time there: the module it finds holds the first wrapper's sharded views (use_orig_params) and no FSDP module of
  its own, so the second wrapper flattens shards as if they were weights ("weight should have at least three
  dimensions"). ``CPUFSDPStrategy`` keeps the wrapper too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from typing_extensions import override

#: class names of the transformer blocks of common transformers models (one FSDP unit each).
TRANSFORMER_BLOCKS = (
    "BertLayer",
    "RobertaLayer",
    "TransformerBlock",  # DistilBERT
    "GPT2Block",
    "GPTNeoXLayer",
    "LlamaDecoderLayer",
    "MistralDecoderLayer",
    "Qwen2DecoderLayer",
    "T5Block",
    "ViTLayer",
)


def block_wrap_policy(block_names: Sequence[str] = TRANSFORMER_BLOCKS) -> Any:
    """An FSDP1 ``auto_wrap_policy`` that makes every module whose class is named in ``block_names`` its own unit.

    Args:
        block_names: class names (not import paths, so the policy needs no import of the model's package);
            the default covers the blocks of common transformers models.
    """
    from torch.distributed.fsdp.wrap import CustomPolicy

    names = frozenset(block_names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"block_wrap_policy: block_names must be non-empty class names, got {block_names!r}")
    return CustomPolicy(lambda module: type(module).__name__ in names)


class KeepWrapperFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` (FSDP1) that evaluates after ``fit`` through the wrapper ``fit`` made (see the module
    docstring); takes ``FSDPStrategy``'s arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._root_wrapper: nn.Module | None = None

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        wrapper = self._root_wrapper
        if wrapper is not None and getattr(wrapper, "module", None) is model:
            return wrapper  # the module as fit left it: sharded inside this wrapper
        wrapped = self._wrap(model)
        if wrapped is not model:
            self._root_wrapper = wrapped
        return wrapped

    def _wrap(self, model: nn.Module) -> nn.Module:
        return super()._setup_model(model)


class CPUFSDPStrategy(KeepWrapperFSDPStrategy):
    """``FSDPStrategy`` (FSDP1) on CPU processes with gloo (see the module docstring); takes its arguments."""

    strategy_name = "fsdp_cpu"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    @override
    def _wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return model  # wrapped already (as FSDPStrategy does)
        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )

    def full_state_dict_context(self, rank0_only: bool = True) -> Any:
        """FSDP's full state-dict context without CPU offload (``rank0_only``: only rank 0 gets the tensors)."""
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        )

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        with self.full_state_dict_context():
            return self.model.state_dict()

    @override
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        with self.full_state_dict_context():
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state
