"""The freeze-timeline plot: when each layer was frozen, its learning rate, and (AdaptiveFreeze) its signal.

With ``plot=True`` the callbacks write ``freeze_timeline.json`` and its rendering, ``freeze_timeline.png``, to
every logger's folder, and log the image to every logger that takes images (:func:`log_timeline_image`):

- **frozen spans**: one row per managed layer, a bar wherever the layer is frozen (``x`` marks a
  freeze, ``^`` a thaw);
- **learning rate** per param group over the optimizer steps (a line stops while its layer is frozen; left
  out when no group trained at all);
- **signal** per layer and the freezing threshold, when the data holds ``signals`` (AdaptiveFreeze).

Rendered with matplotlib's object API (``Figure`` + the Agg canvas), never ``pyplot``: the plot neither
changes the user's backend nor keeps figures alive.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

TIMELINE_NAME = "freeze_timeline"
_DPI = 90


def frozen_spans(
    layers: Sequence[str], initially_frozen: Sequence[str], events: Sequence[Mapping[str, Any]], end_step: int
) -> dict[str, list[tuple[int, int]]]:
    """``[start, end)`` optimizer-step spans during which each layer was frozen.

    >>> events = [{"step": 4, "layer": "a", "action": "thaw"}, {"step": 6, "layer": "b", "action": "freeze"}]
    >>> frozen_spans(["a", "b"], ["a"], events, end_step=10)
    {'a': [(0, 4)], 'b': [(6, 10)]}
    """
    since: dict[str, int] = {name: 0 for name in initially_frozen}
    spans: dict[str, list[tuple[int, int]]] = {name: [] for name in layers}
    for event in sorted(events, key=lambda e: e["step"]):
        name, step = event["layer"], int(event["step"])
        if event["action"] == "freeze":
            since.setdefault(name, step)
        elif name in since:
            start = since.pop(name)
            if step > start:
                spans.setdefault(name, []).append((start, step))
    for name, start in since.items():
        spans.setdefault(name, []).append((start, max(end_step, start)))
    return spans


def timeline_figure(data: Mapping[str, Any]) -> Any:
    """A matplotlib ``Figure`` (with an Agg canvas) of ``data``, a freezing callback's timeline; ``None``
    without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    steps: list[int] = list(data["history"]["step"])
    lrs: Mapping[str, list[float | None]] = data["history"]["lr"]
    layers: list[str] = list(data.get("layers") or lrs)
    end = int(data.get("end_step", steps[-1] if steps else 0))
    spans = frozen_spans(layers, data.get("initially_frozen", []), data.get("events", []), end)
    signals: Mapping[str, list[float | None]] = data.get("signals") or {}
    has_lr = any(v is not None for series in lrs.values() for v in series)
    panels = 1 + int(has_lr) + int(bool(signals))
    height = 2.2 + 0.22 * len(layers) + 2.6 * (panels - 1)
    fig = Figure(figsize=(10, min(height, 24)))
    FigureCanvasAgg(fig)
    ratios = [max(1.0, 0.3 * len(layers))] + [2.2] * (panels - 1)
    axes = list(
        fig.subplots(panels, 1, sharex=True, gridspec_kw={"height_ratios": ratios}, squeeze=False)[:, 0]
    )
    colors = {name: f"C{i % 10}" for i, name in enumerate([*layers, *[n for n in lrs if n not in layers]])}

    gantt = axes[0]
    for row, name in enumerate(layers):
        bars = [(start, max(stop - start, 0.5)) for start, stop in spans.get(name, [])]
        gantt.broken_barh(bars, (row - 0.35, 0.7), color=colors[name], alpha=0.75)
        gantt.plot([0, end], [row, row], color=colors[name], linewidth=0.6, alpha=0.4)
    for event in data.get("events", []):
        row = layers.index(event["layer"]) if event["layer"] in layers else None
        if row is not None:
            gantt.plot(
                [event["step"]], [row], marker="x" if event["action"] == "freeze" else "^", color="black"
            )
    gantt.set_yticks(range(len(layers)), [_short(n) for n in layers], fontsize=7 if len(layers) > 12 else 9)
    gantt.set_ylim(len(layers) - 0.5, -0.5)  # the first layer on top
    gantt.set_title(f"{data.get('callback', 'freezing')}: frozen spans (bars; x = freeze, ^ = thaw)")

    if has_lr:
        lr_ax = axes[1]
        for name, series in lrs.items():
            values = [math.nan if v is None else v for v in series]
            lr_ax.plot(
                steps[: len(values)], values, label=_short(name), color=colors.get(name), linewidth=1.4
            )
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_ylim(bottom=0)
        if len(lrs) <= 16:
            lr_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))

    if signals:
        sig_ax = axes[-1]
        sig_steps = list(data.get("signal_steps", steps))
        for name, series in signals.items():
            values = [math.nan if v is None else v for v in series]
            sig_ax.plot(sig_steps[: len(values)], values, color=colors.get(name), linewidth=1.2, marker=".")
        threshold = data.get("threshold") or []
        if threshold:
            values = [math.nan if v is None else v for v in threshold]
            sig_ax.plot(sig_steps[: len(values)], values, color="black", linestyle="--", label="threshold")
            sig_ax.legend(fontsize=7, loc="upper right")
        sig_ax.set_ylabel(data.get("signal_name", "signal"))
        if all(v is None or v > 0 for series in signals.values() for v in series):
            sig_ax.set_yscale("log")
    axes[-1].set_xlabel("optimizer step")
    axes[-1].set_xlim(0, max(end, 1))
    fig.subplots_adjust(left=0.2, right=0.85, top=0.94, bottom=0.11, hspace=0.25)
    return fig


def plot_timeline(data: Mapping[str, Any], path: str) -> str | None:
    """Write a PNG of ``data`` (a freezing callback's timeline) to ``path``; ``None`` without matplotlib."""
    fig = timeline_figure(data)
    if fig is None:
        return None
    save_figure(fig, path)
    return path


def save_figure(fig: Any, path: str) -> None:
    """Write ``fig`` as a PNG (fast compression: the file is written at the end of every fit)."""
    fig.savefig(path, dpi=_DPI, pil_kwargs={"compress_level": 1})


def figure_image(fig: Any) -> Any:
    """The rendered figure as an ``(height, width, 3)`` uint8 numpy array, the form image loggers take."""
    import numpy as np

    fig.set_dpi(_DPI)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def log_timeline_image(loggers: Iterable[Any], image: Any, step: int) -> list[str]:
    """Log ``image`` to every logger that takes images; returns their class names.

    A logger takes images through its own ``log_image(key, images, step)`` (WandbLogger, and loggers
    written to that API), or through its experiment's ``add_image`` (TensorBoard's ``SummaryWriter``) or
    ``log_image(run_id, image, artifact_file)`` (MLflow's client).
    """
    logged = []
    for logger in loggers:
        if callable(getattr(logger, "log_image", None)):
            logger.log_image(key=TIMELINE_NAME, images=[image], step=step)
        else:
            experiment = getattr(logger, "experiment", None)
            if callable(getattr(experiment, "add_image", None)):
                experiment.add_image(TIMELINE_NAME, image, global_step=step, dataformats="HWC")
            elif callable(getattr(experiment, "log_image", None)) and getattr(logger, "run_id", None):
                experiment.log_image(logger.run_id, image, artifact_file=f"{TIMELINE_NAME}.png")
            else:
                continue
        logged.append(type(logger).__name__)
    return logged


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]
