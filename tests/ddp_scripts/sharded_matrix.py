"""Every freezing callback under one strategy (ddp | fsdp1 | fsdp2), 2 CPU processes (gloo), on a tiny transformers
model (bert | gpt2).

Usage: ``python sharded_matrix.py OUT_DIR STRATEGY KIND [CALLBACK ...]``. For each callback, every rank runs:

1. an uninterrupted fit of ``STEPS`` optimizer steps, gathering the full state dict after every step;
2. the same fit stopped after step ``STOP`` with a checkpoint (the strategy's own format: a distributed
   checkpoint directory under FSDP2, a full state dict under FSDP1 and DDP);
3. a differently initialised model resumed from that checkpoint to ``STEPS``;

and writes ``rank<r>.json`` with, per callback: the events, frozen-exactness violations (a parameter frozen
during a step that changed in it, a layer reported frozen with a parameter that still trains), frozen
parameters with optimizer state, layers that trained during a step in which they were trainable, the tensors
that differ between the uninterrupted and the resumed run, and parameters whose ``requires_grad`` was not handed
back.
"""

import os
import sys
import warnings

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp import shutdown, write_rank_report  # noqa: E402
from hf_models import FIXTURES, TextModule  # noqa: E402
from models import trainer  # noqa: E402
from sharded import ShardInConfigureModel, full_state, make_strategy  # noqa: E402

from lightning_freeze import (  # noqa: E402
    AdaptiveFreeze,
    FreezeOut,
    LayerFreeze,
    LayerSampling,
    ProgressiveUnfreezing,
)
from lightning_freeze.engine.sharding import clean_name  # noqa: E402
from lightning_freeze.splitrun import ResumableDataLoader  # noqa: E402

STEPS, STOP = 12, 5

CALLBACKS = {
    "LayerFreeze": lambda: LayerFreeze(layers="auto[:-1]", until_step=4),
    "FreezeOut": lambda: FreezeOut(t0=0.5),
    "ProgressiveUnfreezing": lambda: ProgressiveUnfreezing(every_n_epochs=None, every_n_steps=3),
    "AdaptiveFreeze": lambda: AdaptiveFreeze(check_every_n_steps=2, min_steps=2, percentile=50),
    "LayerSampling": lambda: LayerSampling(n_layers=1, interval=3, seed=0),
    # The transformer blocks only: with FSDP1 flat parameters and one unit per block, each layer is a whole unit.
    "LayerFreezeBlocks": lambda: LayerFreeze(layers=BLOCKS, until_step=4),
    "FreezeOutBlocks": lambda: FreezeOut(layers=BLOCKS, t0=0.5),
}
# Flat parameters: Lightning's full checkpoint re-keys the optimizer state by parameter, which a flat parameter
# holding several tensors cannot be: the sharded (distributed) checkpoint is the one that works.
FLAT = {"use_orig_params": False, "state_dict_type": "sharded"}
BLOCKS = r"re:model\.(bert\.encoder\.layer|transformer\.h)\.\d+"


class ShardedText(ShardInConfigureModel, TextModule):
    """The user's module with FSDP2 applied in ``configure_model`` (a no-op under other strategies)."""


class Probe(pl.Callback):
    """Gathers the full state after every step and checks the frozen set against it."""

    def __init__(self, freezer):
        self.freezer = freezer
        self.previous = None
        self.frozen_params: list[str] = []
        self.violations: list[str] = []
        self.state_of_frozen: list[str] = []
        self.trained: dict[str, list[int]] = {}
        self.trainable_steps: dict[str, list[int]] = {}
        self.names: dict[int, str] = {}
        self.opt_trace: dict[int, list] = {}
        self.trace: dict[int, float] = {}  # step -> a fingerprint of the full state after it

    def on_train_start(self, trainer, pl_module):
        self.names = {id(p): clean_name(n) for n, p in pl_module.named_parameters()}
        self.previous = full_state(trainer)
        self.trace[trainer.global_step] = _fingerprint(self.previous)
        self.opt_trace[trainer.global_step] = _opt_fingerprint(trainer)

    def param_names(self, layer, p):
        """The full-state names of ``p``: its own, or for an FSDP1 flat parameter every name in its layer."""
        name = self.names.get(id(p), "")
        if name in self.previous:
            return [name]
        return [k for k in self.previous if k.startswith(layer.name + ".")]

    def on_train_batch_start(self, trainer, pl_module, *args):
        engine = self.freezer.engine
        self.frozen_params, self.frozen_ids = [], []
        for layer in self.freezer.layers:
            trains = [p for p in layer.params if p.requires_grad]
            if engine.is_frozen(layer.name):
                untied = [
                    n for p in trains if len(engine.tied_users(p)) == 1 for n in self.param_names(layer, p)
                ]
                if untied:
                    self.violations.append(
                        f"step {trainer.global_step}: {layer.name} reported frozen, trains {untied}"
                    )
            else:
                self.trainable_steps.setdefault(layer.name, []).append(trainer.global_step)
            frozen = [p for p in layer.params if not p.requires_grad]
            self.frozen_ids += [(p, layer.name) for p in frozen]
            self.frozen_params += [n for p in frozen for n in self.param_names(layer, p)]

    def on_train_batch_end(self, trainer, pl_module, *args):
        now = full_state(trainer)
        step = trainer.global_step
        for name in self.frozen_params:
            if not torch.equal(now[name], self.previous[name]):
                self.violations.append(f"step {step}: frozen {name} changed")
        state = trainer.optimizers[0].state
        self.state_of_frozen += [f"step {step}: {layer}" for p, layer in self.frozen_ids if state.get(p)]
        for layer in self.freezer.layers:
            names = [n for p in layer.params for n in self.param_names(layer, p)]
            if any(not torch.equal(now[n], self.previous[n]) for n in names):
                self.trained.setdefault(layer.name, []).append(step - 1)
        self.previous = now
        self.trace[step] = _fingerprint(now)
        self.opt_trace[step] = _opt_fingerprint(trainer)


def _opt_fingerprint(trainer):
    from sharded import _full

    opt = trainer.optimizers[0]
    out = []
    for g in opt.param_groups:
        row = [g.get("name"), g["lr"], len(g["params"])]
        for p in g["params"]:
            st = opt.state.get(p, {})
            row.append([float(_full(v).double().sum()) for k, v in sorted(st.items())])
        out.append(row)
    return out


def _fingerprint(state):
    return float(
        sum(v.double().sum() * (i + 1) for i, v in enumerate(state.values()) if v.is_floating_point())
    )


class StopAt(pl.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == STOP:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def fit(strategy, kind, callback, out_dir, seed, extra=(), ckpt_path=None, probe=True):
    torch.manual_seed(seed)
    model = ShardedText(kind=kind, dropout=0.1)
    freezer = CALLBACKS[callback]()
    probe_cb = Probe(freezer) if probe else None
    train = ResumableDataLoader(FIXTURES[kind].data(64, 0), batch_size=4, shuffle=True, seed=1)
    t = trainer(
        callbacks=[freezer, *([probe_cb] if probe_cb else []), *extra],
        max_steps=STEPS,
        max_epochs=-1,
        strategy=make_strategy(
            strategy.removesuffix("_flat"), model.model, **(FLAT if strategy == "fsdp1_flat" else {})
        ),
        devices=2,
        default_root_dir=out_dir,
        deterministic=False,
    )
    t.fit(model, train, ckpt_path=ckpt_path)
    return t, model, freezer, probe_cb


def run(strategy, kind, callback, out_dir):
    t, model, freezer, probe = fit(strategy, kind, callback, out_dir, seed=0)
    final = probe.previous
    not_handed_back = [n for n, p in model.named_parameters() if not p.requires_grad]
    ckpt = os.path.join(out_dir, f"{callback}-stop.ckpt")
    fit(strategy, kind, callback, out_dir, seed=0, extra=[StopAt(ckpt)], probe=False)
    t2, _, resumed_freezer, resumed_probe = fit(strategy, kind, callback, out_dir, seed=7, ckpt_path=ckpt)
    resumed = resumed_probe.previous
    return {
        "layers": [layer.name for layer in freezer.layers],
        "events": freezer.events,
        "resumed_events": resumed_freezer.events,
        "frozen_at_end": sorted(freezer.engine.frozen),
        "violations": probe.violations + resumed_probe.violations,
        "state_of_frozen": probe.state_of_frozen + resumed_probe.state_of_frozen,
        "trained": probe.trained,
        "trainable_steps": probe.trainable_steps,
        "resume_differs": [k for k in final if not torch.equal(final[k], resumed[k])],
        "not_handed_back": [clean_name(n) for n in not_handed_back],
        "tensors": len(final),
        "trace": probe.trace,
        "resumed_trace": resumed_probe.trace,
        "opt_trace": probe.opt_trace,
        "resumed_opt_trace": resumed_probe.opt_trace,
    }


def refusal(strategy, kind, out_dir):
    """The error a callback whose layers split an FSDP1 flat parameter raises at fit start (None: no error)."""
    try:
        fit(strategy, kind, "FreezeOut", out_dir, seed=0, probe=False)
    except ValueError as err:
        return str(err)
    return None


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    out_dir, strategy, kind = sys.argv[1:4]
    callbacks = sys.argv[4:] or list(CALLBACKS)[:4]
    results = {
        name: refusal(strategy, kind, out_dir) if name == "refusal" else run(strategy, kind, name, out_dir)
        for name in callbacks
    }
    write_rank_report(out_dir, {"rank": int(os.environ.get("LOCAL_RANK", 0)), "results": results})
    shutdown()
