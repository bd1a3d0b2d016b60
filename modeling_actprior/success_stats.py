"""The statistics behind every success rate this project reports: Wilson score intervals for one rate, the paired
bootstrap difference of two policies over the same scenes, and the training step at which a success curve reaches a
target. Used by ``actprior evaluate``, the study and the real-time benchmark."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); ``(0, 1)`` for zero trials."""
    if trials <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, trials={trials}]; got {successes}.")
    p, n, z2 = successes / trials, trials, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At p = 0 or 1 the bound is exactly the observed rate (rounding would land a hair inside it).
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == trials else min(1.0, center + half)
    return low, high


def paired_difference(a: dict, b: dict, resamples: int = 10000, seed: int = 0) -> dict | None:
    """Mean paired difference ``a - b`` of success over the episodes both hold (same training seed, task and scene),
    with a 95% percentile bootstrap interval over those pairs. ``a``, ``b``: ``{key: success}``. None without pairs.

    Pairing removes the scene's own difficulty from the comparison (an easy scene is easy for both), so the interval
    is narrower than two independent Wilson intervals would suggest, and it is the one that decides a difference."""
    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    d = np.array([float(a[k]) - float(b[k]) for k in keys])
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"mean_difference": float(d.mean()), "ci95": [float(lo), float(hi)], "pairs": len(keys),
            "a_only": int((d > 0).sum()), "b_only": int((d < 0).sum()), "resamples": int(resamples)}


def steps_to_reach(curve: Sequence[dict], target: float) -> dict | None:
    """The training step at which a success curve (``[{"step", "success_rate"}]``, ascending steps) first reaches
    ``target``, linearly interpolated between the two checkpoints around the crossing. When the first checkpoint
    already reaches it, that step is an upper bound (``upper_bound`` True). None when no checkpoint reaches it."""
    prev = None
    for c in curve:
        if c["success_rate"] >= target:
            if prev is None:
                return {"step": float(c["step"]), "upper_bound": True}
            s0, r0, s1, r1 = prev["step"], prev["success_rate"], c["step"], c["success_rate"]
            frac = 1.0 if r1 == r0 else (target - r0) / (r1 - r0)
            return {"step": float(s0 + frac * (s1 - s0)), "upper_bound": False}
        prev = c
    return None


__all__ = ["paired_difference", "steps_to_reach", "wilson_interval"]
