"""2-process DDP on CPU (gloo): the same fit without and with FrozenPrefixCache; report per rank.

Run as ``python cache_ddp.py OUT_DIR``; Lightning's launcher starts rank 1 by re-running this script,
which then runs all fits too. The first two train loaders shuffle within fixed per-rank shards
(``TrainShardSampler(fixed_shards=True)``), so every rank should cache only its own half. The last two use a
plain ``DataLoader(shuffle=True)``, into which Lightning puts a DistributedSampler that deals each rank other
samples every epoch: once as it is (the cache says so, once) and once with ``FrozenPrefixCache(fixed_shards=True)``.
Each rank writes ``rank<r>.json``.
"""

import os
import sys
import warnings

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp import replicas_equal, shutdown, write_rank_report  # noqa: E402
from models import Net, make_data, trainer  # noqa: E402

from lightning_freeze import FreezeOut, FrozenPrefixCache, LayerFreeze  # noqa: E402
from lightning_freeze.splitrun.sampling import ResumableDataLoader, TrainShardSampler  # noqa: E402


def flat(model):
    return torch.cat([v.detach().flatten().double() for v in model.state_dict().values()])


def run(out_dir, cache, make_freezer):
    pl.seed_everything(0, verbose=False)
    model = Net("adam", dropout=0.2)
    callbacks = [make_freezer()] + ([cache] if cache is not None else [])
    t = trainer(
        callbacks=callbacks,
        max_epochs=3,
        strategy="ddp",
        devices=2,
        default_root_dir=out_dir,
        deterministic=False,
    )
    train = make_data(64, 0)
    shard = TrainShardSampler(len(train), shuffle=True, seed=0, fixed_shards=True)
    loader = ResumableDataLoader(train, batch_size=8, sampler=shard)
    t.fit(model, loader, DataLoader(make_data(24, 1), batch_size=4))
    return t, model, flat(model), replicas_equal(model)


if __name__ == "__main__":
    out_dir = sys.argv[1]
    result = {}
    freezers = {
        "layer_freeze": lambda: LayerFreeze("backbone.*"),
        # FreezeOut re-wraps DDP at every freeze: the broadcast from rank 0 must not invalidate the cache
        "freezeout": lambda: FreezeOut(layers="backbone.*", t0=0.3),
    }
    for fixed in (False, True):
        pl.seed_everything(0, verbose=False)
        cache = FrozenPrefixCache(fixed_shards=fixed)
        t = trainer(
            callbacks=[LayerFreeze("backbone.*"), cache],
            max_epochs=3,
            strategy="ddp",
            devices=2,
            default_root_dir=out_dir,
            deterministic=False,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t.fit(Net("adam", dropout=0.2), DataLoader(make_data(64, 0), batch_size=8, shuffle=True))
        result["plain_loader_fixed" if fixed else "plain_loader"] = {
            "history": cache.history,
            "warnings": [str(w.message) for w in caught if "FrozenPrefixCache" in str(w.message)],
        }
    for name, make_freezer in freezers.items():
        _, ref, ref_weights, ref_equal = run(out_dir, None, make_freezer)
        cache = FrozenPrefixCache()
        t, model, weights, equal = run(out_dir, cache, make_freezer)
        result["rank"], result["world_size"] = t.global_rank, t.world_size
        result[name] = {
            "replicas_equal": ref_equal and equal,
            "same_as_uncached": torch.equal(ref_weights, weights) and ref.losses == model.losses,
            "history": cache.history,
            "events": cache.events,
        }
    write_rank_report(out_dir, result)
    shutdown()
