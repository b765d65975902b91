"""What adapters (peft's LoRA, IA3, LoHa, ...) left trainable, in words, for the callbacks' setup errors.

The engine needs no knowledge of peft to be correct on an adapted model: a layer's trainable set is what
requires grad in it at fit start (the adapter weights and ``modules_to_save`` copies), a parameter frozen
before fit (peft's base weights) is never thawed, and a layer with nothing trainable stays frozen (see
:mod:`lightning_freeze.engine.freezing`). What it adds here is the explanation a user needs when that leaves
nothing to train: which layers peft left trainable, and which peft option gives the model a trainable head.
Peft is recognised by its classes' names, so nothing here imports it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_freeze.engine.layers import Layer

_TUNER_BASE = "BaseTunerLayer"
_SAVED_COPY = "AuxiliaryTrainingWrapper"  # peft's ModulesToSaveWrapper and its relatives


def _bases(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def adapted_modules(model: nn.Module) -> list[str]:
    """Qualified names of the modules an adapter library injected into ``model`` (peft's tuner layers)."""
    return [name for name, module in model.named_modules() if _TUNER_BASE in _bases(module)]


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` carries peft adapters (a ``PeftModel``, or a model with adapters injected)."""
    return any(_TUNER_BASE in _bases(m) or _SAVED_COPY in _bases(m) for m in model.modules())


def trainable_report(model: nn.Module, layers: Sequence[Layer]) -> str:
    """One sentence: which of ``layers`` hold something trainable now, and which hold nothing.

    On a model with adapters it also says which peft option makes a head trainable, since a peft config
    without ``task_type`` freezes the task head along with the base model.
    """
    trains = [layer.name for layer in layers if any(p.requires_grad for p in layer.params)]
    idle = [layer.name for layer in layers if layer.name not in trains]
    managed = {id(p) for layer in layers for p in layer.params}
    outside = sorted(
        {
            name.rsplit(".", 1)[0]
            for name, p in model.named_parameters()
            if p.requires_grad and id(p) not in managed
        }
    )
    who = "peft" if has_adapters(model) else "the model as given (requires_grad)"
    text = f"{who} left trainable: {trains or 'nothing'} of the layers"
    if outside:
        text += f" and {outside} outside them"
    if idle:
        text += f"; nothing is trainable in {idle}"
    if has_adapters(model) and layers and layers[-1].name in idle:
        head = layers[-1].name.rsplit(".", 1)[-1]
        text += (
            f". To train the head, give the peft config a task_type (e.g. LoraConfig(task_type='SEQ_CLS')) or "
            f"modules_to_save=[{head!r}]"
        )
    return text
