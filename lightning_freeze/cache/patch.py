"""Install and restore the cache's entry points on module instances; the model's classes are never touched.

Two kinds of entry point:

- :meth:`Patch.around_forward` (the cut's root): the instance's ``forward`` is replaced, so the module's
  hooks run as usual around it. ``enter`` sees every call with its arguments before the original
  ``forward`` runs (and may answer it itself), ``leave`` sees what it returned.
- :meth:`Patch.instead_of_call` (a skipped block): the whole call is replaced, hooks included, so a block
  answered from the cache does not run at all, not even its hooks. The handler gets a ``run`` function
  that makes the call as usual (hooks and ``forward``) when the block must be computed.

Inside a ``torch.compile``'d model the cache's own code never gets traced (no recompilation per batch):
``enter``, ``leave`` and the block handlers are wrapped in ``torch._dynamo.disable``, so they are graph
breaks that run eagerly, while the root's original ``forward`` is called between them at the top level of a
non-recursively disabled wrapper and so is still compiled. A skipped block, when it must be computed,
runs eagerly. A deep copy of the model (weight averaging) carries the overrides but notices
that it is not the patched module and computes as usual.

:meth:`Patch.restore` puts back exactly what was there, also a ``forward`` or compiled call the user had
set on the instance.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

Handler = Callable[[nn.Module, tuple, dict, Callable[..., Any]], Any]
_MISSING = object()


class Entry(Protocol):
    """The two halves of a root's entry point (see :class:`lightning_freeze.cache.serving.Server`)."""

    def enter(self, args: tuple, kwargs: dict, run: Callable[..., Any]) -> Any: ...
    def leave(self, step: Any, out: Any) -> None: ...


def _disable(fn: Callable[..., Any], recursive: bool) -> Callable[..., Any]:
    try:
        return torch._dynamo.disable(fn, recursive=recursive)
    except Exception:  # noqa: BLE001 - dynamo unavailable (e.g. an unsupported Python): eager only
        return fn


class Patch:
    """The overrides installed for one cut; :meth:`restore` removes them all."""

    def __init__(self) -> None:
        self.saved: list[tuple[nn.Module, str, Any]] = []
        self.passing: set[int] = set()  # blocks being computed as usual right now (hooks ran already)

    def _set(self, module: nn.Module, attr: str, value: Any) -> None:
        self.saved.append((module, attr, module.__dict__.get(attr, _MISSING)))
        setattr(module, attr, value)

    def around_forward(self, module: nn.Module, entry: Entry) -> None:
        original = _original_forward(module)
        enter, leave = _disable(entry.enter, recursive=True), _disable(entry.leave, recursive=True)

        def forward(self_: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if self_ is not module:  # a deep copy of the model: no cache
                return type(self_).forward(self_, *args, **kwargs)
            step = enter(args, kwargs, original)
            if step.done:
                return step.result
            try:
                out = original(*args, **kwargs)
            except BaseException:
                leave(step, None)
                raise
            leave(step, out)
            return out

        self._set(module, "forward", types.MethodType(_disable(forward, recursive=False), module))

    def instead_of_call(self, module: nn.Module, handler: Handler) -> None:
        original = _original_forward(module)
        passing = self.passing

        def run(*args: Any, **kwargs: Any) -> Any:
            passing.add(id(module))
            try:
                return type(module)._call_impl(module, *args, **kwargs)
            finally:
                passing.discard(id(module))

        def call(*args: Any, **kwargs: Any) -> Any:
            return handler(module, args, kwargs, run)

        def forward(self_: nn.Module, *args: Any, **kwargs: Any) -> Any:
            # Reached from our own ``run`` (hooks done), from a deep copy, or from torch.compile, which
            # inlines ``forward`` directly when a module has no hooks.
            if self_ is not module:
                return type(self_).forward(self_, *args, **kwargs)
            if id(module) in passing:
                return original(*args, **kwargs)
            return handler(module, args, kwargs, original)

        self._set(module, "forward", types.MethodType(_disable(forward, recursive=True), module))
        self._set(module, "_compiled_call_impl", _disable(call, recursive=True))

    def restore(self) -> None:
        for module, attr, previous in reversed(self.saved):
            if previous is _MISSING:
                module.__dict__.pop(attr, None)
            else:
                setattr(module, attr, previous)
        self.saved = []
        self.passing.clear()


def _original_forward(module: nn.Module) -> Callable[..., Any]:
    own = module.__dict__.get("forward")
    return own if own is not None else types.MethodType(type(module).forward, module)
