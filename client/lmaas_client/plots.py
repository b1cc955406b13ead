"""Learning-curve plots (matplotlib, imported lazily and drawn off-screen).

A `Figure` drawn without pyplot: saving a run's curve never switches the backend of a notebook the run
was started from, and leaves no figure open in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_curve(curve: Sequence[dict], path: Path, title: str, metric: str = "accuracy") -> Path | None:
    """Best training loss and best dev score against calls used; None when there is nothing to plot."""
    if not curve:
        return None
    from matplotlib.figure import Figure

    calls = [point["calls"] for point in curve]
    figure = Figure(figsize=(6.4, 4.0))
    loss_axis = figure.subplots()
    loss_axis.plot(calls, [point["best_train_loss"] for point in curve], color="tab:blue", label="best train loss")
    loss_axis.set_xlabel("calls used")
    loss_axis.set_ylabel("best train loss", color="tab:blue")
    dev = [(c, p["dev_score"]) for c, p in zip(calls, curve, strict=True) if p.get("dev_score") is not None]
    if dev:
        dev_axis = loss_axis.twinx()
        dev_axis.step(
            [c for c, _ in dev], [s for _, s in dev], where="post", color="tab:orange", label=f"best dev {metric}"
        )
        dev_axis.set_ylabel(f"best dev {metric}", color="tab:orange")
    loss_axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path
