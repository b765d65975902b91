"""Argument checks shared by every constructor and pure function: one wording for one kind of mistake.

Each check returns the value (normalised: ``check_number`` gives a float) or raises ``error`` with a
message that names the option, what it must be and what it got, prefixed by ``where`` (the class or
function the option belongs to)::

    check_int(every_n_epochs, "every_n_epochs", minimum=1, where="ProgressiveUnfreezing")
    # ValueError: ProgressiveUnfreezing: every_n_epochs must be a positive integer, got 0

No torch, no Lightning: pure functions import this in microseconds.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Collection, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

# ``auto``, optionally sliced like a Python list: ``auto[:-1]``, ``auto[2:]``, ``auto[0]``.
AUTO_SPEC = re.compile(r"^auto(?:\[(-?\d*)(?::(-?\d*))?(?::(-?\d*))?\])?$")


class FreezeWarning(UserWarning):
    """A setting that runs but probably not as meant (a thaw after the fit ends, a tied tensor that keeps a
    frozen layer's weights training). Silence it with ``warnings.filterwarnings("ignore", category=FreezeWarning)``.
    """


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def is_int(value: Any) -> bool:
    """An integer (numpy's too) that is not a bool: ``True`` is an ``int`` in Python, never a count here."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number (numpy's too) that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_kind(minimum: int | None) -> str:
    return {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}"
    )


def check_int(
    value: Any,
    option: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
    where: str = "",
    error: type[Exception] = ValueError,
    hint: str = "",
) -> Any:
    """``value`` as an ``int`` (or None when ``allow_none``); ``minimum``/``maximum`` are inclusive."""
    if value is None and allow_none:
        return None
    ok = is_int(value)
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        kind = _int_kind(minimum)
        if maximum is not None:
            kind += f" <= {maximum}"
        raise error(
            f"{_prefix(where)}{option} must be {kind}{' or None' if allow_none else ''}, got {value!r}"
            + (f"; {hint}" if hint else "")
        )
    return int(value)


def check_number(
    value: Any,
    option: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    where: str = "",
    error: type[Exception] = ValueError,
    hint: str = "",
) -> Any:
    """``value`` as a finite ``float`` in the given range (or None when ``allow_none``).

    ``low=0, low_open=True`` reads "positive"; ``low=0`` reads "non-negative"; other ranges are
    written in interval notation, e.g. ``(0, 1]``.
    """
    if value is None and allow_none:
        return None
    ok = is_number(value) and math.isfinite(float(value))
    if ok and low is not None and (value <= low if low_open else value < low):
        ok = False
    if ok and high is not None and (value >= high if high_open else value > high):
        ok = False
    if not ok:
        raise error(
            f"{_prefix(where)}{option} must be {_range_text(low, high, low_open, high_open)}"
            f"{' or None' if allow_none else ''}, got {value!r}" + (f"; {hint}" if hint else "")
        )
    return float(value)


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None and low == 0:
        return "a positive number" if low_open else "a non-negative number"
    if low is None and high is None:
        return "a finite number"
    left = "-inf" if low is None else f"{low:g}"
    right = "inf" if high is None else f"{high:g}"
    return f"a number in {'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"


def check_bool(value: Any, option: str, *, where: str = "", error: type[Exception] = ValueError) -> bool:
    """A real ``bool``: ``"false"`` or ``0`` from a hand-written config is a mistake, not a value."""
    if not isinstance(value, bool):
        raise error(f"{_prefix(where)}{option} must be true or false, got {value!r}")
    return value


def check_choice(
    value: Any,
    option: str,
    choices: Collection[T],
    *,
    where: str = "",
    error: type[Exception] = ValueError,
    hint: str = "",
) -> T:
    """One of ``choices``; the message lists them."""
    try:
        ok = value in choices
    except TypeError:  # unhashable value against a set or dict
        ok = False
    if not ok:
        raise error(
            f"{_prefix(where)}{option}={value!r} is not supported; use one of {list(choices)}"
            + (f" ({hint})" if hint else "")
        )
    return value


def check_str(
    value: Any, option: str, *, allow_none: bool = False, where: str = "", error: type[Exception] = ValueError
) -> Any:
    """A non-empty string (or None when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value:
        raise error(
            f"{_prefix(where)}{option} must be a non-empty string{' or None' if allow_none else ''}, got {value!r}"
        )
    return value


def check_layer_spec(
    value: Any, option: str = "layers", *, where: str = "", error: type[Exception] = ValueError
) -> Any:
    """A layer spec's syntax: a string or a non-empty list of strings, each a glob, ``re:<regex>`` or
    ``auto`` (optionally sliced). Whether it matches anything is known only with the model.

    Returns the spec as given (a string) or as a list of strings.
    """
    specs = [value] if isinstance(value, str) else value
    if isinstance(specs, (str, bytes)) or not isinstance(specs, Sequence) or not specs:
        raise error(
            f"{_prefix(where)}{option} must be a layer spec: a glob such as 'backbone.*', a regex written "
            f"'re:...', 'auto', or a non-empty list of them; got {value!r}"
        )
    for one in specs:
        if not isinstance(one, str) or not one.strip():
            raise error(f"{_prefix(where)}{option}: each spec must be a non-empty string, got {one!r}")
        if one.startswith("re:"):
            try:
                re.compile(one[3:])
            except re.error as err:
                raise error(f"{_prefix(where)}{option}: bad regex {one!r}: {err}") from None
        elif one.strip().startswith("auto[") and not AUTO_SPEC.match(one.strip()):
            raise error(
                f"{_prefix(where)}{option}: cannot read {one!r}; slice auto like a list: 'auto[:-1]', 'auto[2:]', "
                "'auto[0]'"
            )
    return value if isinstance(value, str) else list(specs)
