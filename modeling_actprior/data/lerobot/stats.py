"""Per-feature statistics as LeRobot's ``meta/stats.json`` holds them (min, max, mean, std, count, quantiles), per
episode and aggregated."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

QUANTILES: dict[str, float] = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
STAT_KEYS = ("min", "max", "mean", "std", "count") + tuple(QUANTILES)
_MAX_IMAGE_STAT_FRAMES = 64  # frames sampled per episode for image statistics
_MAX_IMAGE_STAT_SIDE = 150  # images are strided down to about this size for statistics


def vector_stats(x: np.ndarray) -> dict[str, list]:
    """LeRobot-style statistics of ``x`` ``(N, D)``: each stat a list of D floats, ``count`` ``[N]``."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    out = {
        "min": x.min(0).tolist(),
        "max": x.max(0).tolist(),
        "mean": x.mean(0).tolist(),
        "std": x.std(0).tolist(),
        "count": [int(x.shape[0])],
    }
    qs = np.quantile(x, list(QUANTILES.values()), axis=0)
    for i, key in enumerate(QUANTILES):
        out[key] = qs[i].tolist()
    return out


def image_stats(frames: np.ndarray) -> dict[str, list]:
    """Per-channel statistics in [0, 1] of uint8 ``(T, H, W, 3)`` frames, each shaped ``(3, 1, 1)``.

    Like LeRobot, a subsample of frames (and of pixels, for large images) is used; ``count`` is the
    number of frames sampled.
    """
    t, h, w = frames.shape[:3]
    idx = np.unique(np.linspace(0, t - 1, num=min(t, _MAX_IMAGE_STAT_FRAMES)).round().astype(int))
    step = max(1, math.ceil(max(h, w) / _MAX_IMAGE_STAT_SIDE))
    px = frames[idx, ::step, ::step, :].reshape(-1, frames.shape[-1]).astype(np.float64) / 255.0
    st = {k: [[[c]] for c in v] for k, v in vector_stats(px).items() if k != "count"}
    st["count"] = [len(idx)]
    return st


def aggregate_stats(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine per-part statistics: exact mean/std/min/max/count, count-weighted quantiles (as LeRobot)."""
    counts = np.array([float(np.asarray(p["count"]).reshape(-1)[0]) for p in parts])
    total = counts.sum()
    w = counts / total
    shape_of = np.asarray(parts[0]["mean"], dtype=np.float64).shape
    stack = {k: np.stack([np.asarray(p[k], dtype=np.float64).reshape(shape_of) for p in parts])
             for k in STAT_KEYS if k != "count" and all(k in p for p in parts)}
    wb = w.reshape((-1,) + (1,) * len(shape_of))
    mean = (wb * stack["mean"]).sum(0)
    var = (wb * (stack["std"] ** 2 + (stack["mean"] - mean) ** 2)).sum(0)
    out: dict[str, Any] = {"min": stack["min"].min(0).tolist(), "max": stack["max"].max(0).tolist(),
                           "mean": mean.tolist(), "std": np.sqrt(var).tolist(), "count": [int(total)]}
    for key in QUANTILES:
        if key in stack:
            out[key] = (wb * stack[key]).sum(0).tolist()
    return out
