"""Check the optimizer and LR-scheduler nodes of a task before anything is built.

torch checks an optimizer's settings when the optimizer is made, in ``configure_optimizers``: after the data
is split, the backbone pretrained and the Trainer set up, with a message that names no config key
(``Invalid learning rate: -1``). Every node under ``task`` whose ``_target_`` is a torch optimizer or LR
scheduler is therefore built once, up front, on a one-element probe parameter; when torch refuses it, the
setting it refused is found by putting the target's own default back one key at a time, and the error names
that key (``task.model.optimizer.lr=-1 ...``).
"""

from __future__ import annotations

import inspect
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_freeze.app.arguments import ConfigError, check_arguments

__all__ = ["check_optimizer_nodes"]


def _target_nodes(node: Any, path: str) -> list[tuple[str, DictConfig]]:
    found: list[tuple[str, DictConfig]] = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found.append((path, node))
        for key in node:
            found += _target_nodes(node._get_node(key), f"{path}.{key}")
    return found


def _kind(target: Any) -> str | None:
    """``"optimizer"``, ``"scheduler"`` or None for any other target."""
    import torch

    if not isinstance(target, type):
        return None
    if issubclass(target, torch.optim.Optimizer):
        return "optimizer"
    if issubclass(target, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        return "scheduler"
    return None


def _build(node: DictConfig, kind: str, optimizer: Any) -> Any:
    """Build the node on a probe parameter (an optimizer) or on ``optimizer`` (a scheduler)."""
    import torch
    from hydra.utils import instantiate

    built = instantiate(node)  # a `_partial_` node: the callable the model calls
    return built([torch.nn.Parameter(torch.zeros(1))] if kind == "optimizer" else optimizer)


def _culprit(node: DictConfig, kind: str, optimizer: Any, defaults: dict[str, Any]) -> str | None:
    """The key whose value, put back to the target's default, lets the node build (None: no single key)."""
    for key, default in defaults.items():
        if key not in node:
            continue
        trial = OmegaConf.to_container(node, resolve=True)
        trial[key] = default  # type: ignore[index]
        try:
            _build(OmegaConf.create(trial), kind, optimizer)  # type: ignore[arg-type]
        except Exception:
            continue
        return key
    return None


def check_optimizer_nodes(node: Any, where: str) -> None:
    """Refuse, naming the key, any optimizer or LR-scheduler node under ``node`` that torch would refuse.

    Args:
        node: a composed config node (the app passes ``cfg.task``); nodes of other targets are left alone.
        where: the node's key in the config, the prefix of every key an error names (``task``).

    Raises:
        ConfigError: a node lacks ``_partial_: true`` (the model calls it with its parameters), a value has
            the wrong type for the target's annotation, or torch refuses a setting.
    """
    import torch
    from hydra.utils import get_object

    nodes = []
    for path, sub in _target_nodes(node, where):
        try:
            target = get_object(str(sub._target_))
        except Exception:  # an unknown target: instantiating the task reports it with Hydra's own message
            continue
        if _kind(target) is not None:
            nodes.append((path, sub, target, _kind(target)))
    # schedulers are built on the task's own optimizer (their checks may read its settings), else on SGD
    optimizer: Any = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for path, sub, target, kind in sorted(nodes, key=lambda item: item[3] != "optimizer"):
        if not sub.get("_partial_", False):
            raise ConfigError(
                f"{path}: {'an optimizer' if kind == 'optimizer' else 'a scheduler'} node needs "
                f"`_partial_: true` (the model calls it with its "
                f"{'parameters' if kind == 'optimizer' else 'optimizer'}); add {path}._partial_=true"
            )
        values = OmegaConf.to_container(sub, resolve=True)
        check_arguments(target, values, path)  # type: ignore[arg-type]
        try:
            built = _build(sub, kind, optimizer)
        except Exception as err:
            reason = str(getattr(err, "__cause__", None) or err).splitlines()[0]
            parameters = inspect.signature(target).parameters.values()
            defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
            key = _culprit(sub, kind, optimizer, defaults)
            if key is None:
                raise ConfigError(f"{path}: {target.__name__} refuses these settings: {reason}") from None
            raise ConfigError(
                f"{path}.{key}={values[key]!r} is refused by {target.__name__} ({reason}); fix {path}.{key}"
            ) from None
        if kind == "optimizer":
            optimizer = built
