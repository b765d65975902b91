"""The tiny transformers fixtures of ``hf_models`` with peft adapters, the way users write them
(``self.model = get_peft_model(...)`` in a LightningModule), and a probe that watches peft's frozen weights.

Adapters: ``lora`` (r=4 on the attention projections), ``ia3`` (key, value and the feed-forward input) and
``loha``. ``head=True`` adds the classifier to ``modules_to_save`` (what ``task_type='SEQ_CLS'`` does), and
``top_blocks`` puts adapters on the top blocks only (``layers_to_transform``), so the blocks below carry none.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from hf_models import TextModule

TARGETS = {
    ("bert", "lora"): dict(target_modules=["query", "value"]),
    ("bert", "loha"): dict(target_modules=["query", "value"]),
    ("bert", "ia3"): dict(
        target_modules=["key", "value", "intermediate.dense"], feedforward_modules=["intermediate.dense"]
    ),
    ("gpt2", "lora"): dict(target_modules=["c_attn"], fan_in_fan_out=True),
}
# Where each fixture's repeated blocks live (a regex layer spec), and how many there are.
BLOCKS = {"bert": r"re:.*encoder\.layer\.\d+", "gpt2": r"re:.*transformer\.h\.\d+"}
N_BLOCKS = 3


def peft_config(kind: str, adapter: str, head: bool = False, top_blocks: int | None = None):
    import peft

    kw = dict(TARGETS[(kind, adapter)])
    if head:
        kw["modules_to_save"] = ["classifier"]
    if top_blocks is not None:
        kw["layers_to_transform"] = list(range(N_BLOCKS - top_blocks, N_BLOCKS))
    if adapter == "lora":
        return peft.LoraConfig(r=4, lora_alpha=8, **kw)
    if adapter == "loha":
        return peft.LoHaConfig(r=4, alpha=8, **kw)
    return peft.IA3Config(**kw)


class AdaptedText(TextModule):
    """``TextModule`` whose transformers model is wrapped by ``peft.get_peft_model``."""

    def __init__(
        self,
        kind: str = "bert",
        adapter: str = "lora",
        head: bool = False,
        top_blocks: int | None = None,
        lr: float = 1e-2,
        **model_kw,
    ) -> None:
        import peft

        super().__init__(kind, lr=lr, **model_kw)
        self.model = peft.get_peft_model(self.model, peft_config(kind, adapter, head, top_blocks))


def adapter_blocks(model: torch.nn.Module, layers) -> list[str]:
    """The names of ``layers`` that hold a trainable parameter now."""
    return [layer.name for layer in layers if any(p.requires_grad for p in layer.params)]


class FrozenWeightsProbe(pl.Callback):
    """Snapshots, when built, every parameter that is frozen (peft's base weights); after every optimizer
    step records any of them that requires grad or changed, in ``violations``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        self.flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.violations: list[tuple[int, str]] = []
        self.steps = 0

    def check(self, model: torch.nn.Module, step: int) -> None:
        for name, p in model.named_parameters():
            if name in self.frozen and (p.requires_grad or not torch.equal(p, self.frozen[name])):
                self.violations.append((step, name))

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.steps += 1
        self.check(pl_module, trainer.global_step)
