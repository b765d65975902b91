"""The freeze-timeline plot: each layer's learning rate over training, with freeze and thaw points."""

from __future__ import annotations

from typing import Any


def plot_timeline(data: dict[str, Any], path: str) -> str | None:
    """Write a PNG of ``data`` (the freezing callbacks' history and events) to ``path``.

    A layer's line stops while it is frozen; ``x`` marks a freeze and ``^`` a thaw. Returns ``path``, or
    ``None`` when matplotlib is not installed (the same data is in the JSON file next to it).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = data["history"]["step"]
    lrs: dict[str, list[float | None]] = data["history"]["lr"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = {}
    for name, series in lrs.items():
        values = [float("nan") if v is None else v for v in series]
        (line,) = ax.plot(steps[: len(values)], values, label=name, linewidth=1.5)
        colors[name] = line.get_color()
    for event in data["events"]:
        name = event["layer"]
        marker = "x" if event["action"] == "freeze" else "^"
        ax.axvline(event["step"], color=colors.get(name, "grey"), alpha=0.25, linewidth=1)
        ax.plot(
            [event["step"]], [0], marker=marker, color=colors.get(name, "grey"), markersize=8, clip_on=False
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{data.get('callback', 'freezing')}: learning rate per layer (x = frozen, ^ = thawed)")
    ax.set_ylim(bottom=0)
    if len(lrs) <= 16:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
