"""Check a config node's values against the type annotations of the callable it configures.

Lightning's ``Trainer`` (and most of its callbacks) annotate every argument. Checking a composed ``trainer``
node against those annotations before anything is built turns ``trainer.max_epochs=abc`` (a bare
``AssertionError`` deep in the fit loop) into ``trainer.max_epochs must be an int or None, got 'abc'``.
Annotations this checker cannot read (callables, type variables, protocols) accept every value.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from lightning_freeze.validation import is_int, is_number

__all__ = ["ConfigError", "check_arguments", "describe_type"]


class ConfigError(ValueError):
    """A config value the job cannot run with; the message names the key to change."""


def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def matches(value: Any, tp: Any) -> bool:
    """Whether a config value can be passed where ``tp`` is annotated.

    Args:
        value: the value, as plain containers (a yaml list stands for a tuple too).
        tp: the annotation (unions, ``Literal``, ``Optional``, generics; unreadable ones accept everything).
    """
    if tp is Any or tp is inspect.Parameter.empty or isinstance(tp, (typing.TypeVar, str)):
        return True
    if _is_union(tp):
        return any(matches(value, arg) for arg in _args(tp))
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in _args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return is_int(value)
    if tp is float:
        return is_number(value)
    if tp is str:
        return isinstance(value, str)
    if isinstance(value, Mapping) and "_target_" in value:
        return True  # Hydra builds it; its own constructor checks it
    if origin is not None:
        if origin in (collections.abc.Callable, typing.Callable):
            return True
        if origin is tuple and isinstance(value, (list, tuple)):
            return True  # yaml has no tuples: a list is what a tuple argument gets from a config
        return isinstance(origin, type) and isinstance(value, origin)
    if tp is tuple:
        return isinstance(value, (list, tuple))
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def describe_type(tp: Any) -> str:
    """An annotation in words: ``Optional[int]`` -> ``an int or None``; ``Literal['a', 'b']`` -> ``'a' or 'b'``.

    Args:
        tp: the annotation.
    """
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(repr(arg) for arg in _args(tp))
    if _is_union(tp):
        return " or ".join(dict.fromkeys(describe_type(arg) for arg in _args(tp)))
    if tp is type(None):
        return "None"
    names = {bool: "true or false", int: "an int", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin is not None:
        return f"a {getattr(origin, '__name__', str(origin))}"
    return f"a {getattr(tp, '__name__', str(tp))}"


def check_arguments(target: Callable[..., Any], values: Mapping[str, Any], where: str) -> None:
    """Check config values against the annotations of the callable they configure.

    Args:
        target: a class (its ``__init__`` is read) or a function.
        values: the node's values by argument name (keys starting with ``_`` and unannotated ones are skipped).
        where: the node's key in the config, the prefix of the key an error names (``trainer``).

    Raises:
        ConfigError: the first value the annotations refuse, e.g. ``trainer.max_epochs must be an int or
            None, got 'abc'``.
    """
    func = target.__init__ if isinstance(target, type) else target  # type: ignore[misc]
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # annotations that do not evaluate here: nothing to check against
        return
    for key, value in values.items():
        if key.startswith("_") or key not in hints:
            continue
        if not matches(value, hints[key]):
            raise ConfigError(f"{where}.{key} must be {describe_type(hints[key])}, got {value!r}")
