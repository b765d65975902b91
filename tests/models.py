"""Small real models and data for the tests: an MLP with BatchNorm and dropout, split into backbone and head."""

from __future__ import annotations

import tempfile

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_FEATURES, N_CLASSES = 8, 3


def make_data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g)
    w = torch.randn(N_FEATURES, N_CLASSES, generator=g)
    y = (x @ w).argmax(dim=1)
    return TensorDataset(x, y)


def block(n_in: int, n_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU(), nn.Dropout(dropout))


class Net(pl.LightningModule):
    """backbone.0-2 (Linear+BN+ReLU+Dropout) then head; optimizer and scheduler picked by name."""

    def __init__(
        self,
        optimizer: str = "sgd",
        scheduler: str | None = None,
        lr: float = 0.05,
        dropout: float = 0.1,
        n_blocks: int = 3,
        total_steps: int = 32,
    ) -> None:
        super().__init__()
        widths = [N_FEATURES] + [16] * n_blocks
        self.backbone = nn.Sequential(*[block(a, b, dropout) for a, b in zip(widths, widths[1:])])
        self.head = nn.Linear(16, N_CLASSES)
        self.optimizer_name, self.scheduler_name, self.lr = optimizer, scheduler, lr
        self.total_steps = total_steps
        self.example_input_array = torch.zeros(2, N_FEATURES)
        self.losses: list[float] = []

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        params = self.parameters()
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=1e-3)
        elif self.optimizer_name == "adam":
            opt = torch.optim.Adam(params, lr=self.lr)
        elif self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.1)
        else:
            raise ValueError(self.optimizer_name)
        sched = make_scheduler(self.scheduler_name, opt, self.lr, self.total_steps)
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": sched}


def make_scheduler(name: str | None, opt, lr: float, total_steps: int):
    S = torch.optim.lr_scheduler
    step = {"interval": "step"}
    if name is None:
        return None
    if name == "step":
        return {"scheduler": S.StepLR(opt, step_size=5, gamma=0.5), **step}
    if name == "multistep":
        return {"scheduler": S.MultiStepLR(opt, milestones=[4, 9], gamma=0.5), **step}
    if name == "exponential":
        return {"scheduler": S.ExponentialLR(opt, gamma=0.95), **step}
    if name == "cosine":
        return {"scheduler": S.CosineAnnealingLR(opt, T_max=total_steps), **step}
    if name == "warm_restarts":
        return {"scheduler": S.CosineAnnealingWarmRestarts(opt, T_0=6), **step}
    if name == "lambda":
        return {"scheduler": S.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s)), **step}
    if name == "linear":
        return {"scheduler": S.LinearLR(opt, start_factor=0.5, total_iters=10), **step}
    if name == "onecycle":
        return {"scheduler": S.OneCycleLR(opt, max_lr=lr, total_steps=total_steps), **step}
    if name == "sequential":
        warm = S.LinearLR(opt, start_factor=0.2, total_iters=4)
        cos = S.CosineAnnealingLR(opt, T_max=max(1, total_steps - 4))
        return {"scheduler": S.SequentialLR(opt, [warm, cos], milestones=[4]), **step}
    if name == "plateau":
        return {
            "scheduler": S.ReduceLROnPlateau(opt, patience=0, factor=0.5),
            "monitor": "val_loss",
            "interval": "epoch",
        }
    raise ValueError(name)


def loaders(n_train: int = 64, n_val: int = 24, batch_size: int = 8):
    return (
        DataLoader(make_data(n_train, 0), batch_size=batch_size),
        DataLoader(make_data(n_val, 1), batch_size=batch_size),
    )


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    defaults.update(kwargs)
    # Never the working directory: the timeline plot and checkpoints would land in the checkout.
    defaults.setdefault("default_root_dir", tempfile.mkdtemp(prefix="lf-test-"))
    return pl.Trainer(**defaults)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers, cloned."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class AtTrainEnd(pl.Callback):
    """Records, when training ends (before the freezing callback hands the model back in teardown), each
    parameter's ``requires_grad``, whether its ``.grad`` is None and whether the optimizer holds state for it."""

    def __init__(self) -> None:
        self.requires_grad: dict[str, bool] = {}
        self.grad_is_none: dict[str, bool] = {}
        self.in_optimizer_state: dict[str, bool] = {}

    def on_train_end(self, trainer, pl_module):
        state = trainer.optimizers[0].state
        for name, p in pl_module.named_parameters():
            self.requires_grad[name] = p.requires_grad
            self.grad_is_none[name] = p.grad is None
            self.in_optimizer_state[name] = p in state

    def frozen(self, prefix: str) -> bool:
        """Every parameter under ``prefix`` was frozen: no grad, no gradient, no optimizer state."""
        names = [n for n in self.requires_grad if n.startswith(prefix)]
        return bool(names) and all(
            not self.requires_grad[n] and self.grad_is_none[n] and not self.in_optimizer_state[n]
            for n in names
        )
