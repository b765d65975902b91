"""Lightning glue for benchmarks: a LightningModule around :class:`SplitNet`, a quiet timing Trainer, and
a step timer, so that a Lightning contender's round is one short ``fit`` of N steps.

Example (one round of our callback on pre-generated batches)::

    from benchmarks.lit import BenchModule, fit_round
    step_s = fit_round(lambda: BenchModule(net_factory()), batches, callbacks=[LayerFreeze("backbone")],
                       skip=2, device=ctx.device)
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from benchmarks.harness import Contender, StepClock, median_step_time
from benchmarks.models import SplitNet


class BenchModule(L.LightningModule):
    """``head(trunk(backbone(x)))`` with plain SGD, written the way a user would write it.

    - ``filter_trainable``: the optimizer gets only ``requires_grad`` parameters (what Lightning's
      ``BackboneFinetuning`` asks its users to do); otherwise it gets ``self.parameters()`` unfiltered
      (what the ``LayerFreeze`` contract lets users do).
    - ``hand_frozen``: the hand-written optimum inside Lightning: the backbone runs under
      ``torch.no_grad()`` in eval mode, its parameters have ``requires_grad=False`` and the optimizer
      holds only the trainable parameters.
    """

    def __init__(
        self,
        net: SplitNet,
        lr: float = 0.05,
        momentum: float = 0.9,
        filter_trainable: bool = False,
        hand_frozen: bool = False,
        example_input: torch.Tensor | None = None,
    ):
        super().__init__()
        net.train()  # Lightning keeps the train/eval mode it finds; start like a fresh model
        self.backbone = net.backbone
        self.trunk = net.trunk
        self.head = net.head
        self.lr, self.momentum = lr, momentum
        self.filter_trainable = filter_trainable or hand_frozen
        self.hand_frozen = hand_frozen
        if hand_frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()  # Lightning keeps submodule modes as it finds them (and restores them)
        if example_input is not None:
            self.example_input_array = example_input

    def train(self, mode: bool = True):  # in case anything calls module.train() on the whole model
        super().train(mode)
        if self.hand_frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hand_frozen:
            with torch.no_grad():
                x = self.backbone(x)
        else:
            x = self.backbone(x)
        return self.head(self.trunk(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        params = self.parameters()
        if self.filter_trainable:
            params = [p for p in params if p.requires_grad]
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)


def frozen_prefix_report(before: dict[str, torch.Tensor], module: torch.nn.Module) -> str:
    """ "yes" when no backbone tensor (parameter or buffer) differs from ``before``; else what changed."""
    after = module.backbone.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k].to(v.device))]
    if not changed:
        return "yes"
    kinds = sorted({k.rsplit(".", 1)[-1] for k in changed})
    return f"no: {len(changed)}/{len(before)} tensors changed ({', '.join(kinds)})"


class BatchList(Dataset):
    """Pre-generated batches served as-is (``DataLoader(batch_size=None)``): no collation, no copies."""

    def __init__(self, batches: Sequence):
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


class StepTimer(Callback):
    """The harness's :class:`~benchmarks.harness.StepClock` driven by a Trainer: a stamp at every
    ``on_train_batch_start``, the last step closed when the fit reaches ``max_steps`` or ends.

    With ``snapshots=True`` it also copies the weights (to CPU) at every epoch end, outside the timed part, next to
    the training time so far: ``points = [(train_s, state_dict), ...]`` for an evaluation after the fit.

    Args:
        device: the device whose work each stamp waits for.
        snapshots: copy the weights at every epoch end.
    """

    def __init__(self, device=None, snapshots: bool = False) -> None:
        self.clock = StepClock(device)
        self.snapshots = snapshots
        self.points: list[tuple[float, dict[str, torch.Tensor]]] = []
        self.cpu_points: list[float] = []  # this process's CPU seconds at the same epoch ends
        self._closed = False

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self.clock.begin()
        self.points, self.cpu_points, self._closed = [], [], False

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.step()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= (trainer.max_steps or 0) > 0:
            self._close()

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.snapshots:
            train_s, cpu_s = self.clock.elapsed(), self.clock.cpu_elapsed()
            with self.clock.excluded():
                state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
            self.points.append((train_s, state))
            self.cpu_points.append(cpu_s)

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self.clock.close()
            self._closed = True

    def step_times(self) -> list[float]:
        return self.clock.step_times()


@contextmanager
def quiet():
    """Silence Lightning's informational logging and the warnings a timing setup provokes."""
    loggers = [
        logging.getLogger(n)
        for n in (
            "lightning",
            "lightning.pytorch",
            "lightning.fabric",
            "lightning.pytorch.utilities.rank_zero",
            "finetuning_scheduler",
        )
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def accelerator_for(device) -> tuple[str, list[int] | int]:
    dev = torch.device(device)
    if dev.type == "cuda":
        return "gpu", [dev.index or 0]
    return "cpu", 1


def make_trainer(
    steps: int, callbacks: Sequence[Callback], device="cpu", root_dir: str | None = None, **overrides
) -> L.Trainer:
    """A Trainer for timing: no progress bar, logger, checkpointing, model summary or validation."""
    accelerator, devices = accelerator_for(device)
    kwargs = dict(
        max_steps=steps,
        max_epochs=1,
        accelerator=accelerator,
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root_dir,
        deterministic=False,
    )
    kwargs.update(overrides)
    return L.Trainer(callbacks=list(callbacks), **kwargs)


def fit_round(
    make_module: Callable[[], L.LightningModule],
    batches: Sequence,
    callbacks: Sequence[Callback] = (),
    *,
    skip: int,
    device="cpu",
    trainer_overrides: dict | None = None,
    after_fit: Callable[[L.Trainer, L.LightningModule], None] | None = None,
) -> float:
    """One round of a Lightning contender: ``fit`` over ``batches`` (one step each) and return the median
    step time (seconds) after skipping the first ``skip`` steps.  ``after_fit`` may check the outcome.
    """
    module = make_module()
    timer = StepTimer(torch.device(device))
    with quiet(), tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp:
        trainer = make_trainer(
            len(batches), [timer, *callbacks], device=device, root_dir=tmp, **(trainer_overrides or {})
        )
        loader = DataLoader(BatchList(batches), batch_size=None, shuffle=False, num_workers=0)
        trainer.fit(module, train_dataloaders=loader)
        if after_fit is not None:
            after_fit(trainer, module)
    times = timer.step_times()
    if len(times) < len(batches) - 1:
        raise RuntimeError(f"only {len(times)} steps were timed out of {len(batches)}: the fit stopped early")
    return median_step_time(times, skip)


def lightning_contender(
    name: str,
    make_net: Callable[[], SplitNet],
    batches,
    skip: int,
    device,
    callbacks: Callable[[BenchModule], list],
    note: str,
    module_factory: Callable[..., L.LightningModule] | None = None,
    **module_kw,
) -> Contender:
    """A contender whose round is one short fit; it also records whether the backbone stayed unchanged.

    ``module_factory(net, **module_kw)`` wraps the net (default: :class:`BenchModule`); the module must
    expose the frozen prefix as ``backbone``.
    """
    info: dict[str, str] = {}

    def run() -> float:
        module = (module_factory or BenchModule)(make_net(), **module_kw)
        before = {k: v.detach().clone() for k, v in module.backbone.state_dict().items()}

        def check(trainer, mod):
            info["frozen_prefix_unchanged"] = frozen_prefix_report(before, mod)

        return fit_round(
            lambda: module, batches, callbacks(module), skip=skip, device=device, after_fit=check
        )

    return Contender(name, run, note=note, info=info)
