"""A picture of ``train_log.jsonl``: loss and mean block density over the optimizer steps."""

from __future__ import annotations

import json
import os
from typing import Optional

__all__ = ["plot_train_log"]


def plot_train_log(log_path: str, out_path: Optional[str] = None) -> Optional[str]:
    """Write ``train_log.png`` beside the log (or ``out_path``); returns its path, or None when
    matplotlib is not installed or the log is empty."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not os.path.isfile(log_path):
        return None
    with open(log_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        return None
    steps = [r["step"] for r in records]
    dens = [(r["step"], r["density"]) for r in records if "density" in r]
    fig, loss_ax = plt.subplots(figsize=(7, 4))
    loss_ax.plot(steps, [r["loss"] for r in records], color="tab:blue", label="loss")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("flow-matching loss", color="tab:blue")
    handles = loss_ax.get_lines()
    if dens:
        dens_ax = loss_ax.twinx()
        dens_ax.plot(*zip(*dens), color="tab:orange", label="block density")
        dens_ax.set_ylabel("mean block density", color="tab:orange")
        dens_ax.set_ylim(0, 1.05)
        handles = handles + dens_ax.get_lines()
    loss_ax.legend(handles, [h.get_label() for h in handles], loc="upper right")
    loss_ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(log_path))) or "training")
    fig.tight_layout()
    out_path = out_path or os.path.splitext(log_path)[0] + ".png"
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
