"""LayerSampling under DDP (2 CPU processes, gloo), with ``seed=None`` and a different global RNG per rank.

The seed must be agreed once (rank 0 draws it) so every rank samples the same layers at the same steps; the
waiting layers leave the all-reduce (a fresh DDP wrapper per change) and the replicas end bit-identical. With
``adapters`` as the second argument the model is the tiny BERT with peft LoRA: the sampled layers are its
adapted blocks, and peft's base weights stay frozen and bit-identical on every rank.

Usage: python layer_sampling_ddp.py OUT_DIR [full|adapters]  -> writes OUT_DIR/rank0.json and rank1.json
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from ddp import WrapperProbe, shutdown, write_rank_report  # noqa: E402
from models import Net, loaders, trainer  # noqa: E402

from lightning_freeze import LayerSampling  # noqa: E402

if __name__ == "__main__":
    out_dir, what = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "full")
    torch.manual_seed(0)
    if what == "adapters":
        from hf_models import FIXTURES
        from peft_models import AdaptedText, FrozenWeightsProbe

        model = AdaptedText("bert", "lora", head=True, dropout=0.1)
        data = (FIXTURES["bert"].loader(n=64), FIXTURES["bert"].loader(n=16, seed=1))
        frozen = FrozenWeightsProbe(model)
        extra = [frozen]
    else:
        model = Net("adam", "step", dropout=0.2, n_blocks=5)
        # A validation run at the end syncs the batch-norm statistics (DDP broadcasts buffers in every forward).
        data = loaders(n_train=64, n_val=16)
        extra = []
    # Each rank's global generators differ from here on: a seed drawn from them would differ too.
    rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.manual_seed(100 + rank)
    sampling, probe = LayerSampling(n_layers=1, interval=3, keep_state=True), WrapperProbe()
    t = trainer(
        callbacks=[sampling, probe, *extra],
        max_epochs=3,
        strategy="ddp",
        devices=2,
        default_root_dir=out_dir,
        deterministic=False,
    )
    t.fit(model, *data)
    write_rank_report(
        out_dir,
        {
            "rank": t.global_rank,
            "world_size": t.world_size,
            "seed": sampling._run_seed,
            "middle": sampling.middle,
            "choices": sampling.choices,
            "events": sampling.events,
            "replicas_equal": probe.replicas_equal,
            "ddp_params": probe.steps,
            "base_violations": len(extra[0].violations) if extra else 0,
            "steps": t.global_step,
        },
    )
    shutdown()
