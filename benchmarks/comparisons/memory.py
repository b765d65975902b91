"""Memory of full vs frozen training: peak RSS (and peak CUDA memory on a GPU) in a fresh process per
contender and round, plus the exact bytes of gradients + optimizer state read from the live objects.

Peak RSS is process-wide and only grows, so each measurement runs in its own subprocess
(``python -m benchmarks.memory_worker CONFIG NAME``); quick mode, a smoke run, measures every contender in one
worker, resetting the peak before each.  The table reports the growth of the peak during
training (peak after the steps minus resident memory just before them), which removes the cost of
importing torch/Lightning and building the model and data.

Other benchmark modules may add contenders with :func:`register_memory_contender`; the function runs
inside the worker and returns the numbers it measured (see :func:`measure`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import peers
from benchmarks.harness import (
    REPO_ROOT,
    BenchContext,
    Contender,
    Result,
    Table,
    alternate,
    comparison,
    fmt_num,
)
from benchmarks.models import NetSpec, SplitNet, make_batches, make_blocks, pick_prefix

MemoryFn = Callable[[dict[str, Any]], dict[str, float]]
MEMORY_CONTENDERS: dict[str, tuple[MemoryFn, str]] = {}


def register_memory_contender(name: str, note: str = ""):
    """Register ``fn(config) -> {"grad_state_bytes": ..., ...}`` to run (in a fresh worker) in this comparison."""

    def deco(fn: MemoryFn) -> MemoryFn:
        MEMORY_CONTENDERS[name] = (fn, note)
        return fn

    return deco


# --------------------------------------------------------------------------------------------------
# In the worker process
# --------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    Linux: ``VmHWM`` from ``/proc/self/status``; it belongs to the address space, so it starts afresh at
    ``exec``.  ``getrusage``'s ``ru_maxrss`` does not: a worker forked from a big benchmark process
    inherits the parent's size as its "peak" (which made every contender read the same 641 MiB).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def grad_and_state_bytes(params, optimizer) -> int:
    """Bytes held by ``.grad`` of ``params`` plus every tensor in ``optimizer.state``."""
    total = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def setup_from_config(cfg: dict[str, Any]):
    spec = NetSpec(**cfg["net"])
    device = torch.device(cfg["device"])
    blocks = make_blocks(spec, seed=0)
    net = SplitNet.from_blocks(blocks, cfg["k"], spec.num_classes)
    batches = make_batches(spec, cfg["steps"], device=device, seed=1)
    return net, batches, device


def measure(cfg: dict[str, Any], train: Callable[[], tuple[list, torch.optim.Optimizer]]) -> dict[str, float]:
    """Run ``train()`` (which returns the model's parameters and its optimizer) and take the measurements."""
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    reset = reset_peak_rss()  # the peak then covers training only, not imports and setup
    rss_before = rss_bytes()
    peak_before = peak_rss_bytes()
    params, optimizer = train()
    peak = peak_rss_bytes()
    out = {
        "rss_before": float(rss_before),
        "peak_rss": float(peak),
        "peak_rss_growth": float(max(0, peak - rss_before)),
        "peak_before": float(peak_before),
        "peak_was_reset": float(reset),
        "grad_state_bytes": float(grad_and_state_bytes(params, optimizer)),
    }
    if device.type == "cuda":
        out["cuda_peak_growth"] = float(torch.cuda.max_memory_allocated(device) - cuda_before)
    return out


def _plain(frozen: bool) -> MemoryFn:
    def fn(cfg):
        from benchmarks.loops import make_optimizer, prepare, train_step

        net, batches, device = setup_from_config(cfg)
        net.to(device)

        def train():
            prepare(net, frozen)
            opt = make_optimizer(net, frozen)
            for x, y in batches:
                train_step(net, opt, x, y, frozen)
            return list(net.parameters()), opt

        return measure(cfg, train)

    return fn


def _lightning(make_callbacks: Callable[[Any], list], **module_kw) -> MemoryFn:
    def fn(cfg):
        from benchmarks.lit import BenchModule, fit_round

        net, batches, device = setup_from_config(cfg)
        module = BenchModule(net, **module_kw).to(
            device
        )  # weights on the device before measuring, as in _plain
        got = {}

        def train():
            fit_round(
                lambda: module,
                batches,
                make_callbacks(module),
                skip=0,
                device=device,
                after_fit=lambda trainer, mod: got.setdefault("opt", trainer.optimizers[0]),
            )
            return list(module.parameters()), got["opt"]

        return measure(cfg, train)

    return fn


register_memory_contender("PyTorch, nothing frozen", "all parameters trained")(_plain(False))
register_memory_contender("PyTorch, hand-frozen (optimum)", "prefix under no_grad + eval")(_plain(True))
register_memory_contender("Lightning, nothing frozen")(_lightning(lambda m: []))
register_memory_contender("Lightning + LayerFreeze (ours)", peers.NOTES["layer_freeze"])(
    _lightning(peers.layer_freeze)
)
register_memory_contender("Lightning + BackboneFinetuning", peers.NOTES["backbone_finetuning"])(
    _lightning(peers.backbone_finetuning, filter_trainable=True)
)
register_memory_contender("Lightning + finetuning-scheduler (phase 0)", peers.NOTES["finetuning_scheduler"])(
    _lightning(peers.finetuning_scheduler)
)


# --------------------------------------------------------------------------------------------------
# In the benchmark process
# --------------------------------------------------------------------------------------------------


def run_worker(name: str, cfg: dict[str, Any], timeout: float = 600) -> dict[str, float]:
    """Run one memory contender in a fresh interpreter and return what it measured."""
    out = run_workers([name], cfg, timeout)[name]
    if "error" in out:
        raise RuntimeError(out["error"])
    return out


def run_workers(names: list[str], cfg: dict[str, Any], timeout: float = 600) -> dict[str, dict[str, Any]]:
    """Run the memory contenders ``names`` one after the other in one fresh interpreter: ``{name: what it
    measured}``, or ``{name: {"error": ...}}`` for one that failed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # glibc's dynamic mmap threshold lets freed activations stay on the heap, so the peak RSS would depend
    # on allocation history (we saw 150 vs 63 MiB for the same run); a fixed threshold hands big
    # buffers back to the OS on free, and the peak then follows live memory (repeatable to 0.1 MiB).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_worker", json.dumps(cfg), *names],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            out = json.loads(line)
            found[out.pop("name")] = out
    tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    why = f"worker exited with {proc.returncode} before measuring it: {tail}"
    return {name: found.get(name, {"error": why}) for name in names}


def _mb(x: float) -> str:
    return fmt_num(x / 2**20)


@comparison("memory", "Memory: full vs frozen training", order=30)
def run(ctx: BenchContext) -> Result:
    spec = ctx.pick(
        NetSpec(width=16, blocks_per_stage=3, batch=16), NetSpec(width=16, blocks_per_stage=6, batch=128)
    )
    rounds = ctx.n_rounds(1, 3)
    steps = ctx.pick(2, 5)
    device = torch.device(ctx.device)
    k, flop_share = pick_prefix(make_blocks(spec, seed=0), spec, 0.7)
    cfg = {"net": spec.to_json(), "k": k, "steps": steps, "device": str(device)}
    shared: dict[str, dict[str, Any]] = {}

    def one_worker_for_all(name: str) -> dict[str, float]:
        # quick mode: one process measures every contender (each round), saving a start-up per contender
        if name not in shared:
            shared.update(run_workers(list(MEMORY_CONTENDERS), cfg))
        out = shared.pop(name)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def measure_one(name: str) -> dict[str, float]:
        return one_worker_for_all(name) if ctx.quick else run_worker(name, cfg)

    contenders = [
        Contender(name, (lambda name=name: measure_one(name)), note=note)
        for name, (_, note) in MEMORY_CONTENDERS.items()
    ]
    ctx.log(
        f"  {len(contenders)} contenders x {rounds} rounds, "
        + ("all in one process per round (quick mode)" if ctx.quick else "one fresh process each")
    )
    ms = alternate(contenders, rounds=rounds, warmup_rounds=0, log=ctx.log)
    by_name = {m.name: m for m in ms}

    def exact(m):
        vals = m.values("grad_state_bytes")
        return _mb(vals[-1]) if vals else "—"

    def peak(m):
        vals = m.values("peak_rss")
        return _mb(sorted(vals)[len(vals) // 2]) if vals else "—"

    def cuda(m):
        vals = m.values("cuda_peak_growth")
        return _mb(sorted(vals)[len(vals) // 2]) if vals else "n/a (CPU run)"

    result = Result(
        description=(
            f"{steps} training steps of the benchmark ResNet (batch {spec.batch}) with the first {k} blocks "
            f"({flop_share:.0%} of forward FLOPs) frozen, "
            + (
                "all contenders in one process (quick mode), the peak reset before each. "
                if ctx.quick
                else "each contender in a fresh process per round. "
            )
            + "'Peak RSS growth' is the process's peak resident memory after the steps minus its resident "
            "memory just before them (activations, gradients, optimizer state, allocator slack). "
            "'Grads + optimizer state' is counted exactly from the live `.grad` tensors and `optimizer.state` "
            "after the last step. Workers run with `MALLOC_MMAP_THRESHOLD_=65536` so that freed buffers go "
            "back to the OS and the peak follows live memory."
        ),
        config={
            **cfg,
            "rounds": rounds,
            "worker_env": {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")},
        },
    )
    extra = {
        "grads + optimizer state (MiB, exact)": exact,
        "peak RSS, whole process (MiB)": peak,
        "peak CUDA memory growth (MiB)": cuda,
    }
    plain = [by_name[n] for n in MEMORY_CONTENDERS if n.startswith("PyTorch")]
    lit = [by_name[n] for n in MEMORY_CONTENDERS if not n.startswith("PyTorch")]
    for title, rows in (("Plain PyTorch", plain), ("Lightning", lit)):
        if rows:
            result.tables.append(
                Table.build(
                    title,
                    rows,
                    baseline=rows[0].name,
                    metric="peak_rss_growth",
                    unit="MiB",
                    scale=1 / 2**20,
                    label="peak RSS growth",
                    extra_columns=extra,
                )
            )
    return result
