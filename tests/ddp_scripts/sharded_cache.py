"""FrozenPrefixCache under a sharded strategy (fsdp2 | fsdp1), 2 CPU processes (gloo), on a tiny transformers model.

Usage: ``python sharded_cache.py OUT_DIR STRATEGY KIND [UNITS]`` (UNITS: modules made FSDP2 units besides every
block and the root, comma-separated, e.g. ``model.bert.embeddings,model.bert``). Every rank runs the same fit twice, without and with the
cache (``fixed_shards=True``: each rank keeps its samples across epochs), with the embeddings and the bottom blocks
frozen for the whole fit, and writes ``rank<r>.json`` with, per run: the loss of every step, the full state dict's
fingerprint at the end, and per FSDP unit the number of all-gathers (unshards) in every epoch; for the cached run also
the cache's history and which frozen modules ran in the last epoch.
"""

import os
import sys
import warnings
from collections import Counter

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp import shutdown, write_rank_report  # noqa: E402
from hf_models import FIXTURES, TextModule, VisionModule  # noqa: E402
from models import trainer  # noqa: E402
from sharded import ShardInConfigureModel, full_state, make_strategy  # noqa: E402

from lightning_freeze import FrozenPrefixCache, LayerFreeze  # noqa: E402
from lightning_freeze.engine.sharding import clean_name  # noqa: E402
from lightning_freeze.splitrun.sampling import ResumableDataLoader, TrainShardSampler  # noqa: E402

EPOCHS = 3
UNITS: list[str] = []  # FSDP2 units besides the blocks and the root (argument 4, comma-separated)
FROZEN = {  # the frozen prefix per model kind
    "bert": r"re:model\.bert\.(embeddings|encoder\.layer\.[01])",
    "resnet": r"re:model\.resnet\.(embedder|encoder\.stages\.0)",
}


class Sharded(ShardInConfigureModel):
    """The user's module with FSDP2 applied in ``configure_model``: every block, the ``UNITS``, the root."""

    fsdp2_units = UNITS  # filled from argv before the model is built


class ShardedText(Sharded, TextModule):
    pass


class ShardedVision(Sharded, VisionModule):
    pass


class Probe(pl.Callback):
    """Per epoch: the all-gathers of every FSDP unit; per step: the loss; in the last epoch: frozen modules that ran."""

    def __init__(self):
        self.losses: list[float] = []
        self.gathers: list[dict[str, int]] = []
        self.ran: Counter = Counter()
        self.handles: list = []

    def on_train_start(self, trainer, pl_module):
        self.count = Counter()
        install_gather_counter(trainer.strategy.model, self.count)
        frozen = [
            (clean_name(n), m)
            for n, m in pl_module.named_modules()
            if n and any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())
        ]
        for name, module in frozen:
            self.handles.append(module.register_forward_pre_hook(self._ran(name, trainer)))

    def _ran(self, name, trainer):
        def hook(module, args):
            if trainer.current_epoch == EPOCHS - 1 and trainer.training:
                self.ran[name] += 1

        return hook

    def on_train_epoch_start(self, trainer, pl_module):
        self.count.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer, pl_module):
        self.gathers.append(dict(self.count))

    def on_train_end(self, trainer, pl_module):
        for handle in self.handles:
            handle.remove()


def install_gather_counter(model, count):
    """Count the all-gathers of every FSDP unit of ``model`` by the unit's clean name (FSDP2: ``unshard`` of the
    unit's parameter group, which issues the all-gather; FSDP1: ``_unshard`` of the unit's flat-parameter handle)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()  # noqa: N806
    for name, module in model.named_modules():
        unit = clean_name(name) or "<root>"
        group = getattr(getattr(module, "_get_fsdp_state", lambda: None)(), "_fsdp_param_group", None)
        if isinstance(module, FSDPModule) and group is not None:
            original = group.unshard

            def unshard(*args, _original=original, _group=group, _unit=unit, **kwargs):
                if _group._all_gather_result is None and not _group.is_unsharded:
                    count[_unit] += 1
                return _original(*args, **kwargs)

            group.unshard = unshard
        handle = getattr(module, "_handle", None)
        if handle is not None and hasattr(handle, "unshard"):
            original_handle = handle.unshard

            def handle_unshard(*args, _original=original_handle, _unit=unit, **kwargs):
                count[_unit] += 1
                return _original(*args, **kwargs)

            handle.unshard = handle_unshard


def run(strategy, kind, out_dir, cached):
    torch.manual_seed(0)
    model = ShardedText(kind=kind, dropout=0.0) if kind == "bert" else ShardedVision(kind=kind)
    freezer = LayerFreeze(FROZEN[kind])
    cache = FrozenPrefixCache(max_disk_bytes=0) if cached else None
    probe = Probe()
    data = FIXTURES[kind].data(64, 0)
    train = ResumableDataLoader(
        data, batch_size=8, sampler=TrainShardSampler(len(data), shuffle=True, seed=0, fixed_shards=True)
    )
    t = trainer(
        callbacks=[freezer, *([cache] if cache else []), probe],
        max_epochs=EPOCHS,
        strategy=make_strategy(strategy, model.model),
        devices=2,
        default_root_dir=out_dir,
        deterministic=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, train)
    state = full_state(t)
    return {
        "losses": probe.losses,
        "gathers": probe.gathers,
        "ran_last_epoch": dict(probe.ran),
        "frozen": sorted(freezer.engine.frozen),
        "fingerprint": [float(v.double().sum()) for v in state.values() if v.is_floating_point()],
        "history": cache.history if cache else None,
        "events": cache.events if cache else None,
        "warnings": sorted({str(w.message) for w in caught if "FrozenPrefixCache" in str(w.message)}),
    }


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    out_dir, strategy, kind = sys.argv[1:4]
    result = {"rank": int(os.environ.get("LOCAL_RANK", 0))}
    UNITS[:] = sys.argv[4].split(",") if len(sys.argv) > 4 else []
    result["off"] = run(strategy, kind, out_dir, cached=False)
    result["on"] = run(strategy, kind, out_dir, cached=True)
    write_rank_report(out_dir, result)
    shutdown()
