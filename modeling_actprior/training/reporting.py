"""Reports of a training run: loss curves (PNG), markdown tables and the model-card templates."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any


def plot_curves(history: list[dict[str, float]], keys: Sequence[str], path: str, title: str) -> str | None:
    """Loss curves against step, one line per key found in ``history``; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    drawn = False
    for key in keys:
        pts = [(h["step"], h[key]) for h in history if key in h and h[key] is not None and math.isfinite(h[key])]
        if pts:
            ax.plot(*zip(*pts), label=key)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def model_card_template(name: str) -> str:
    """Path of a card template shipped with the package (``modeling_actprior/model_cards/``)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Model card template {name} not found in the package ({path}); reinstall actprior.")
    return path


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str], fmt: Callable[[Any], str] = None) -> str:
    fmt = fmt or (lambda v: f"{v:.4f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
