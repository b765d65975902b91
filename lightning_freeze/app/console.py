"""What the app prints: every message once, warnings that say they are warnings.

Lightning's package ``__init__`` attaches a console handler of its own (``INFO: GPU available ...`` on
stderr) to the ``lightning`` logger, and, when it is imported before logging is configured, to
``lightning.pytorch`` and ``lightning.fabric`` too. Hydra's job logging then configures the root logger
(``[date][name][INFO] - ...`` on stdout and in ``<run dir>/<job name>.log``), and every Lightning message
propagates there as well: each line printed twice, in two formats. Inside a Hydra job whose logging has a
root handler, Lightning's own console handlers are detached, so each message is printed once, in Hydra's
format, and lands in the job's log file. Without a root handler (``hydra/job_logging=none``/``disabled``),
Lightning's handlers stay: they are then the only output.

Lightning also formats every warning raised from a file whose path contains "lightning" (its own, and
ours) as ``path:line: message``, dropping the category. The app formats warnings as Python does, without
the source line: ``path:line: UserWarning: message``. And it shows each warning once per job: Python's
``default`` action shows a warning once per place, but Lightning changes the warning filters during a fit,
which makes Python forget what it has shown (the same line then appears again after validation).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

__all__ = ["format_warning", "print_each_message_once"]

_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


def format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """``path:line: Category: message``, the layout of :func:`warnings.formatwarning` without the source line.

    Args:
        message: the warning (or its text).
        category: its class, e.g. ``UserWarning``: every category's name ends in "Warning".
        filename: the file the warning is attributed to.
        lineno: its line there.
        line: the source line (not printed).
    """
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"


class _ShowOnce:
    """``warnings.showwarning`` that passes each (category, text) on once and drops repeats."""

    def __init__(self, show: Any) -> None:
        self.show = show.show if isinstance(show, _ShowOnce) else show  # a new job: a fresh memory
        self.shown: set[tuple[type[Warning], str]] = set()

    def __call__(self, message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        key = (category, str(message))
        if key not in self.shown:
            self.shown.add(key)
            self.show(message, category, *args, **kwargs)


def _is_lightning_console(handler: Any) -> bool:
    """A handler Lightning attached: a plain stream handler (a user's file or custom handler stays)."""
    return type(handler) is logging.StreamHandler


def print_each_message_once() -> None:
    """Route Lightning's messages through the root logger only (when it has a handler); show each warning
    once, with its category.

    Called by the app at the start of each job, after Hydra configured logging. Imports Lightning (the job
    needs it anyway), so that its import-time handlers exist to be detached.
    """
    import lightning.pytorch  # noqa: F401  # its import attaches the handlers and Lightning's warning format

    warnings.formatwarning = format_warning
    warnings.showwarning = _ShowOnce(warnings.showwarning)
    if not logging.getLogger().handlers:
        return
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if _is_lightning_console(h)]:
            logger.removeHandler(handler)
        logger.propagate = True
