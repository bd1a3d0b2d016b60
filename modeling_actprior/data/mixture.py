"""Several window datasets as one: draws by per-dataset weight, reproducible per epoch and resumable mid-epoch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .windows import DATASET_INDEX, ActionWindowDataset


class MixtureDataset(torch.utils.data.Dataset):
    """Several window datasets drawn with per-dataset probabilities ``weights``.

    Item ``k`` of epoch ``e`` is a deterministic function of ``(seed, e, k)``: dataset ``i`` is drawn with
    probability ``w_i`` and, the ``j``-th time dataset ``i`` is drawn in the epoch, its sample
    ``perm_i[j mod len_i]`` is used (a fresh permutation per epoch, so a dataset is covered before it
    repeats). Use with a sequential sampler (``shuffle=False``): the draws are already random.

    Resuming: ``set_epoch(e)`` selects the epoch, ``set_start(k)`` (or ``start_index``) skips the first ``k``
    draws of it; ``state_dict()``/``load_state_dict()`` carry ``{"seed", "epoch", "start_index"}``.
    Call ``set_epoch`` before creating the DataLoader iterator (workers copy the dataset then).

    Args:
        datasets: map-style window datasets sharing ``D_max``, history and chunk lengths.
        weights: non-negative sampling weights (normalized internally); default proportional to length.
        num_samples: draws per epoch (default: total length of the datasets).
        seed: base seed.

    Samples carry the source dataset's keys plus ``"dataset_index"``.
    """

    def __init__(self, datasets: Sequence[ActionWindowDataset], weights: Sequence[float] | None = None,
                 num_samples: int | None = None, seed: int = 0, start_index: int = 0):
        if not datasets:
            raise ValueError("MixtureDataset needs at least one dataset.")
        self.datasets = list(datasets)
        lengths = np.array([len(d) for d in self.datasets], dtype=np.int64)
        for i in range(len(self.datasets)):
            if lengths[i] == 0:
                raise ValueError(f"Dataset {i} of the mixture has no samples.")
        shapes = {(getattr(d, "d_max", None), getattr(d, "history", None), getattr(d, "chunk", None))
                  for d in self.datasets}
        if len(shapes) > 1:
            raise ValueError(f"Mixture datasets disagree on (D_max, history, chunk): {sorted(shapes, key=str)}.")
        w = lengths.astype(np.float64) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self.datasets),) or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"weights must be {len(self.datasets)} non-negative numbers with a positive sum; "
                             f"got {weights}.")
        self.weights = w / w.sum()
        self.lengths = lengths
        self.num_samples = int(num_samples) if num_samples is not None else int(lengths.sum())
        self.seed = int(seed)
        self.epoch = 0
        self.start_index = 0
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None
        self.set_start(start_index)

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch`` (restarts at draw 0)."""
        self.epoch = int(epoch)
        self.start_index = 0

    def set_start(self, start_index: int) -> None:
        """Skip the first ``start_index`` draws of the current epoch (to resume mid-epoch)."""
        if not 0 <= int(start_index) <= self.num_samples:
            raise ValueError(f"start_index must be in 0..{self.num_samples}; got {start_index}.")
        self.start_index = int(start_index)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "start_index": self.start_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.set_start(int(state.get("start_index", 0)))

    def plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(dataset_ids, sample_ids)`` of all ``num_samples`` draws of ``epoch`` (default: current)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1], self._plan[2]
        rng = np.random.default_rng([self.seed, epoch])
        which = rng.choice(len(self.datasets), size=self.num_samples, p=self.weights)
        sample = np.zeros(self.num_samples, dtype=np.int64)
        for i, n in enumerate(self.lengths):
            pos = np.flatnonzero(which == i)
            if pos.size:
                reps = math.ceil(pos.size / n)
                perm = np.concatenate([rng.permutation(n) for _ in range(reps)])
                sample[pos] = perm[: pos.size]
        self._plan = (epoch, which, sample)
        return which, sample

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_plan"] = None
        return state

    def __len__(self) -> int:
        return self.num_samples - self.start_index

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if not 0 <= idx < len(self):
            raise IndexError(f"Draw {idx} out of range ({len(self)} remaining in epoch {self.epoch}).")
        which, sample = self.plan()
        k = self.start_index + int(idx)
        i = int(which[k])
        out = self.datasets[i][int(sample[k])]
        out[DATASET_INDEX] = i
        return out


__all__ = ["MixtureDataset"]
