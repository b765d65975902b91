"""The example batch: finding one in the training data and running the model on it once, leaving no trace.

``layers="auto"`` and the freezing callbacks' layer-order check need one forward pass. :func:`example_input`
picks what to run (the module's ``example_input_array``, else :func:`example_batch`, the first samples of the
training data read by index) and :func:`call_with_example` runs it the ways models are called, with the
random generators and module modes restored afterwards. Nothing here imports Lightning: the trainer and the
module are read through the attributes Lightning gives them.
"""

from __future__ import annotations

import contextlib
import inspect
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_freeze.engine.sharding import reshard_fsdp2

_EXAMPLE_SAMPLES = 2


class ExampleCallError(ValueError):
    """The model could not be run on the example batch in any of the ways models are called."""


def example_input(trainer: Any, module: nn.Module) -> Any:
    """What to run ``module`` on once: its ``example_input_array``, else :func:`example_batch` (None if neither)."""
    if getattr(module, "example_input_array", None) is not None:
        return module.example_input_array
    return example_batch(trainer)


def example_batch(trainer: Any) -> Any:
    """A batch of the first samples of the training data, or None.

    Built from the train loader's dataset and ``collate_fn`` by index, never by iterating the loader: no
    sampler, generator or worker is touched, and the random generators are restored afterwards (a
    dataset that augments draws from them), so the data order and an exact resume are as without it.
    An ``IterableDataset`` has no first samples to read this way: None.

    Args:
        trainer: the Lightning ``Trainer`` whose ``fit`` was given the training data (read at setup, before
            the fit loop has set its data up).
    """
    loader = _first_loader(_train_loaders(trainer))
    dataset = getattr(loader, "dataset", None)
    if loader is None or dataset is None or isinstance(dataset, IterableDataset):
        return None
    try:
        size = min(len(dataset), _EXAMPLE_SAMPLES)
    except TypeError:
        return None
    if size == 0:
        return None
    with preserved_rng():
        if getattr(loader, "batch_size", None) is None and getattr(loader, "batch_sampler", None) is None:
            return loader.collate_fn(dataset[0])  # automatic batching off: items are batches
        return loader.collate_fn([dataset[i] for i in range(size)])


def _train_loaders(trainer: Any) -> Any:
    # Where Lightning keeps what fit() was given: a loader, or the datamodule / model with a train_dataloader
    # hook. Before the fit loop sets up its data (it has not at setup) this is the only handle on it.
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    instance = getattr(source, "instance", None)
    if instance is None:
        instance = getattr(trainer, "datamodule", None)
    if callable(getattr(instance, "train_dataloader", None)):  # a LightningModule or LightningDataModule
        try:
            return instance.train_dataloader()
        except Exception:  # noqa: BLE001 - no loader yet (or not implemented): no example
            return None
    return instance


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, DataLoader):
        return loaders
    for attr in ("iterables", "flattened"):  # CombinedLoader
        if hasattr(loaders, attr):
            return _first_loader(getattr(loaders, attr))
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        for item in loaders:
            found = _first_loader(item)
            if found is not None:
                return found
    return None


def call_with_example(model: nn.Module, example: Any) -> None:
    """Run ``model`` once on ``example`` in eval mode, without gradients, leaving no trace.

    The random generators (torch, numpy, Python) and every module's train/eval mode are restored
    afterwards, and a ``torch.compile``'d submodule runs eagerly, so the training run that follows is
    the run it would have been. ``example`` is tried the ways models are called: a dict as keyword
    arguments (keys the forward does not take dropped), a tuple or list as ``(x, ...)`` with ``forward(x)``
    or as positional arguments, anything else as the one argument. A model whose own ``forward`` is not
    implemented (a LightningModule that calls ``self.model`` in ``training_step``) is tried through its one
    parameter-owning child.
    """
    device = next(model.parameters()).device
    example = _to_device(example, device)
    targets = [model]
    children = [c for c in model.children() if next(c.parameters(), None) is not None]
    if len(children) == 1:
        targets.append(children[0])
    errors: list[str] = []
    with _no_trace(model):
        for target in targets:
            for args, kwargs in _call_forms(target, example):
                try:
                    target(*args, **kwargs)
                    return
                except NotImplementedError as err:
                    errors.append(f"{type(target).__name__}.forward: not implemented ({err})")
                    break
                except Exception as err:  # noqa: BLE001 - any failure means: try the next form
                    errors.append(
                        f"{type(target).__name__}({_describe(args, kwargs)}): {type(err).__name__}: {err}"
                    )
    raise ExampleCallError(
        "could not run the model once on an example batch:\n  "
        + "\n  ".join(errors[:6])
        + "\nSet `example_input_array` on your LightningModule (what forward() takes)"
    )


def _call_forms(target: nn.Module, example: Any) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    if isinstance(example, Mapping):
        accepted = _keyword_names(target)
        if accepted is None:  # forward(**kwargs): everything, then only the names it spells out
            yield (), dict(example)
            accepted = _keyword_names(target, named_only=True) or set()
        kwargs = {k: v for k, v in example.items() if k in accepted}
        if kwargs:
            yield (), kwargs
        yield (example,), {}
    elif isinstance(example, (tuple, list)):
        if example:
            yield (example[0],), {}
            if isinstance(example[0], Mapping):
                yield from _call_forms(target, example[0])
        yield tuple(example), {}
        yield (example,), {}
    else:
        yield (example,), {}


def _keyword_names(target: nn.Module, named_only: bool = False) -> set[str] | None:
    """The keyword arguments ``target.forward`` takes, or None when it takes any (``**kwargs``), unless
    ``named_only``."""
    try:
        params = inspect.signature(target.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if not named_only and any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _describe(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"tensor{tuple(v.shape)}"
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{k}: {one(x)}" for k, x in v.items()) + "}"
        if isinstance(v, (tuple, list)):
            return "(" + ", ".join(one(x) for x in v) + ")"
        return type(v).__name__

    return ", ".join([one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()])


@contextlib.contextmanager
def preserved_rng(devices: Sequence[int] = ()) -> Iterator[None]:
    """Torch's (CPU and the given CUDA devices), numpy's and Python's global random states, as they were."""
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=list(devices)):
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


@contextlib.contextmanager
def _no_trace(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    eager = stance("force_eager") if stance is not None else contextlib.nullcontext()
    try:
        model.eval()
        with torch.no_grad(), preserved_rng(_cuda_devices(model)), eager:
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode
        # FSDP2 keeps the root's parameters gathered after a forward without backward: shard them again, so the
        # model holds its sharded parameters (the ones the optimizer has) when the layers are read from it.
        reshard_fsdp2(model)


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_to_device(o, device) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    return obj
