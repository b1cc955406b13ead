"""Learning-curve plots (matplotlib, imported lazily and drawn off-screen)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_curve(curve: Sequence[dict], path: Path, title: str, metric: str = "accuracy") -> Path | None:
    """Best training loss and best dev score against calls used; None when there is nothing to plot."""
    if not curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calls = [point["calls"] for point in curve]
    figure, loss_axis = plt.subplots(figsize=(6.4, 4.0))
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
    plt.close(figure)
    return path
