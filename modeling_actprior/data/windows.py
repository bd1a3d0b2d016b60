"""Training views over trajectory datasets: action windows by index arithmetic.

A sample is anchored at frame ``t`` of one episode. With history length ``K`` and chunk length ``H``:

* ``history`` ``(K, D_max)``: normalized past actions ``a_{t-K} .. a_{t-1}``; rows before the episode
  start are zero and ``history_mask`` ``(K,)`` is False there.
* ``actions`` ``(H, D_max)``: the normalized future chunk ``a_t .. a_{t+H-1}``; rows past the episode end
  are zero and ``action_mask`` ``(H,)`` is False there.
* ``dim_mask`` ``(D_max,)``: True for the embodiment's real action dimensions (padding is zero).

Windows never cross episode boundaries. Nothing copies the corpus: map-style views keep the per-episode
row ranges and read the rows of one window from the memory-mapped Arrow column; the streaming view
(``streaming.StreamingActionWindows``) reads parquet files one episode at a time, and ``mixture.MixtureDataset`` draws
from several window datasets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..action_space import ActionNormalizer, EmbodimentStats

# Batch keys. The model's own inputs are defined once, in ``modeling_actprior.inputs``:
# history (K, D_max) float32 normalized past actions; history_mask (K,) bool; actions (H, D_max) float32
# normalized future chunk; action_mask (H,) bool; dim_mask (D_max,) bool; embodiment str;
# state (max_state_dim,) float32 standardized state of frame t.
from ..inputs import (
    ACTION_MASK,
    ACTIONS,
    DIM_MASK,
    EMBODIMENT,
    HISTORY,
    HISTORY_MASK,
    STATE,
)
from .lerobot import (
    ACTION_KEY,
    IMAGE_KEY_PREFIX,
    STATE_KEY,
    DatasetFormatError,
    LeRobotDatasetMeta,
    TrajectoryDataset,
    aggregate_stats,
)

EPISODE_INDEX = "episode_index"  # int
FRAME_INDEX = "frame_index"  # int
IMAGE = "image"  # {camera: (H, W, 3) uint8}
INSTRUCTION = "instruction"  # str
DATASET_INDEX = "dataset_index"  # int, which dataset of a MixtureDataset

_STD_EPS = 1e-6


# ------------------------------------------------------------------------------------------ helpers
def select_episodes(dataset, max_per_task: int | None) -> list[int] | None:
    """The first ``max_per_task`` episodes (in episode order) of each task of ``dataset`` (a ``TrajectoryDataset``
    or ``LeRobotDatasetMeta``), sorted; ``None`` (all episodes) when ``max_per_task`` is None or 0.

    Generators seed episode ``i`` of a task the same way whatever the total, so the first ``n`` episodes of a larger
    dataset are exactly the dataset generated with ``n``: demonstration- and corpus-size studies use this.
    """
    if not max_per_task:
        return None
    if max_per_task < 0:
        raise ValueError(f"max episodes per task must be positive (or 0 for all); got {max_per_task}.")
    meta = getattr(dataset, "meta", dataset)
    taken: dict[str, int] = {}
    chosen = []
    for ep in range(meta.num_episodes):
        task = dataset.task(ep) if hasattr(dataset, "task") else meta.episode_task(ep)
        if taken.get(task, 0) < max_per_task:
            taken[task] = taken.get(task, 0) + 1
            chosen.append(ep)
    return chosen


def split_episodes(num_episodes: int, val_fraction: float, seed: int = 0,
                   episodes: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """Split episode indices (never frames) into sorted ``(train, val)`` lists, deterministically.

    ``val`` gets ``round(n * val_fraction)`` episodes, at least one when ``val_fraction > 0`` and there are two or
    more episodes, and ``train`` always keeps at least one. ``episodes`` restricts the split to that subset of
    ``range(num_episodes)`` (e.g. from ``select_episodes``); ``n`` is then its size.
    """
    if episodes is not None:
        subset = sorted(int(e) for e in episodes)
        if not subset or subset[0] < 0 or subset[-1] >= num_episodes:
            raise ValueError(f"episodes must be a non-empty subset of range({num_episodes}); got {subset[:5]}...")
        train, val = split_episodes(len(subset), val_fraction, seed)
        return [subset[i] for i in train], [subset[i] for i in val]
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}.")
    if num_episodes <= 0:
        raise ValueError(f"num_episodes must be positive; got {num_episodes}.")
    n_val = round(num_episodes * val_fraction)
    if val_fraction > 0 and num_episodes >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, num_episodes - 1)
    perm = np.random.default_rng(seed).permutation(num_episodes)
    return sorted(int(i) for i in perm[n_val:]), sorted(int(i) for i in perm[:n_val])


def fit_normalizer(datasets: Sequence[TrajectoryDataset | LeRobotDatasetMeta], max_action_dim: int = 32,
                   mode: str = "quantile", normalizer: ActionNormalizer | None = None) -> ActionNormalizer:
    """An ``ActionNormalizer`` with the action statistics of ``datasets`` (from their meta/stats.json).

    Datasets of the same embodiment are pooled (exact mean/std/min/max, count-weighted quantiles).
    """
    metas = [d.meta if isinstance(d, TrajectoryDataset) else d for d in datasets]
    by_name: dict[str, list] = {}
    for m in metas:
        by_name.setdefault(m.embodiment.name, []).append(m)
    norm = normalizer or ActionNormalizer(max_action_dim=max_action_dim, mode=mode)
    for group in by_name.values():
        parts = [m.action_stats().to_dict() for m in group]
        stats = EmbodimentStats.from_dict(parts[0] if len(parts) == 1 else aggregate_stats(parts))
        norm.add_embodiment(group[0].embodiment, stats)
    return norm


def _affine(normalizer: ActionNormalizer, embodiment: str) -> tuple[np.ndarray, np.ndarray, int]:
    """``(offset, scale, action_dim)`` float32 with ``normalized = (raw - offset) / scale``.

    Measured through the public ``unnormalize`` (an affine map), in float64, so it matches ``normalize``.
    """
    spec = normalizer.spec(embodiment)
    zeros = torch.zeros(spec.action_dim, dtype=torch.float64)
    offset = normalizer.unnormalize(zeros, embodiment)
    scale = normalizer.unnormalize(zeros + 1.0, embodiment) - offset
    return offset.numpy().astype(np.float32), scale.numpy().astype(np.float32), spec.action_dim


def _state_affine(meta: LeRobotDatasetMeta, max_state_dim: int) -> tuple[np.ndarray, np.ndarray, int]:
    s = meta.state_dim
    if s == 0:
        raise DatasetFormatError(f"{meta.root}: include_state=True but the dataset has no {STATE_KEY!r} feature.")
    if s > max_state_dim:
        raise ValueError(f"{meta.root}: {STATE_KEY} has width {s} > max_state_dim={max_state_dim}.")
    st = meta.feature_stats(STATE_KEY)
    missing = [k for k in ("mean", "std") if k not in st]
    if missing:
        raise DatasetFormatError(f"{meta.root}/meta/stats.json: {STATE_KEY!r} lacks {missing}; states are standardized "
                                 "with its mean and std. Recompute the dataset's statistics.")
    mean = np.asarray(st["mean"], np.float64).reshape(-1)
    std = np.asarray(st["std"], np.float64).reshape(-1)
    if mean.shape != (s,) or std.shape != (s,):
        raise DatasetFormatError(f"{meta.root}/meta/stats.json: {STATE_KEY!r} mean/std have {mean.size}/{std.size} "
                                 f"values; the feature has width {s}. Recompute the dataset's statistics.")
    std = np.where(std < _STD_EPS, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32), s


def _window(rows_norm: np.ndarray, n_hist: int, history: int, chunk: int, d_max: int) -> dict[str, torch.Tensor]:
    """Place normalized rows ``a_{t-n_hist} .. a_{t+n_fut-1}`` (width <= D_max) into padded windows."""
    width = rows_norm.shape[1]
    n_fut = rows_norm.shape[0] - n_hist
    hist = np.zeros((history, d_max), np.float32)
    hmask = np.zeros(history, bool)
    if n_hist:
        hist[history - n_hist:, :width] = rows_norm[:n_hist]
        hmask[history - n_hist:] = True
    act = np.zeros((chunk, d_max), np.float32)
    amask = np.zeros(chunk, bool)
    act[:n_fut, :width] = rows_norm[n_hist:]
    amask[:n_fut] = True
    return {HISTORY: torch.from_numpy(hist), HISTORY_MASK: torch.from_numpy(hmask),
            ACTIONS: torch.from_numpy(act), ACTION_MASK: torch.from_numpy(amask)}


def _episode_indices(episodes: Sequence[int] | None, num_episodes: int, root) -> np.ndarray:
    """The selected episodes as an int64 array (all of them for None), each checked to be in the dataset."""
    eps = np.arange(num_episodes, dtype=np.int64) if episodes is None else np.asarray(list(episodes), dtype=np.int64)
    if eps.size and (eps.min() < 0 or eps.max() >= num_episodes):
        raise IndexError(f"{root}: episodes must be in 0..{num_episodes - 1}; got {eps.tolist()[:10]}...")
    return eps


def _check_window_args(history: int, chunk: int) -> None:
    if int(history) < 0 or int(chunk) <= 0:
        raise ValueError(f"history must be >= 0 and chunk > 0; got history={history}, chunk={chunk}.")


# ---------------------------------------------------------------------------------------- map-style
class ActionWindowDataset(torch.utils.data.Dataset):
    """One sample per frame ``t`` of the selected episodes (map-style, index arithmetic only).

    Args:
        dataset: a loaded ``TrajectoryDataset``.
        normalizer: an ``ActionNormalizer`` with statistics for the dataset's embodiment (see
            ``fit_normalizer``).
        history: ``K``, number of past actions.
        chunk: ``H``, number of future actions.
        episodes: episode indices to use (default: all), e.g. from ``split_episodes``.
        include_state: add ``"state"`` ``(max_state_dim,)``: frame t's state standardized with the dataset's
            observation.state mean/std, zero-padded.
        max_state_dim: padded state width (0: the dataset's state width).

    Sample keys and shapes: ``history (K, D_max)``, ``history_mask (K,)``, ``actions (H, D_max)``,
    ``action_mask (H,)``, ``dim_mask (D_max,)``, ``embodiment`` str, ``episode_index`` int,
    ``frame_index`` int, optionally ``state (max_state_dim,)``.
    """

    def __init__(
        self,
        dataset: TrajectoryDataset,
        normalizer: ActionNormalizer,
        history: int = 16,
        chunk: int = 16,
        episodes: Sequence[int] | None = None,
        include_state: bool = False,
        max_state_dim: int = 0,
    ):
        _check_window_args(history, chunk)
        self.dataset = dataset
        self.normalizer = normalizer
        self.history, self.chunk = int(history), int(chunk)
        self.embodiment = dataset.embodiment.name
        self.d_max = normalizer.max_action_dim
        self._offset, self._scale, self.action_dim = _affine(normalizer, self.embodiment)
        self._dim_mask = normalizer.dim_mask(self.embodiment)
        self.episodes = eps = _episode_indices(episodes, dataset.num_episodes, dataset.root)
        self._from = dataset.episode_from[eps] if eps.size else np.zeros(0, np.int64)
        lengths = dataset.episode_lengths[eps] if eps.size else np.zeros(0, np.int64)
        self._cum = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # sample offset per episode
        self.include_state = bool(include_state)
        self.max_state_dim = int(max_state_dim)
        if self.include_state:
            self.max_state_dim = self.max_state_dim or dataset.meta.state_dim
            self._s_mean, self._s_std, self.state_dim = _state_affine(dataset.meta, self.max_state_dim)

    def __len__(self) -> int:
        return int(self._cum[-1])

    def locate(self, idx: int) -> tuple[int, int, int, int]:
        """Sample ``idx`` -> ``(episode_index, frame t, global row of t, episode length)``."""
        n = len(self)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"Sample {idx} out of range ({n} windows).")
        j = int(np.searchsorted(self._cum, idx, side="right")) - 1
        t = int(idx - self._cum[j])
        return int(self.episodes[j]), t, int(self._from[j]) + t, int(self._cum[j + 1] - self._cum[j])

    def _normalize(self, raw: np.ndarray) -> np.ndarray:
        return (raw.astype(np.float32, copy=False) - self._offset) / self._scale

    def __getitem__(self, idx: int) -> dict[str, Any]:
        ep, t, row, length = self.locate(int(idx))
        n_hist = min(self.history, t)
        n_fut = min(self.chunk, length - t)
        raw = self.dataset.column(ACTION_KEY).rows(row - n_hist, row + n_fut)
        sample = _window(self._normalize(raw), n_hist, self.history, self.chunk, self.d_max)
        sample[DIM_MASK] = self._dim_mask.clone()
        sample[EMBODIMENT] = self.embodiment
        sample[EPISODE_INDEX] = ep
        sample[FRAME_INDEX] = t
        if self.include_state:
            s = np.zeros(self.max_state_dim, np.float32)
            s[: self.state_dim] = (self.dataset.column(STATE_KEY).rows(row, row + 1)[0] - self._s_mean) / self._s_std
            sample[STATE] = torch.from_numpy(s)
        return sample


class VLAWindowDataset(ActionWindowDataset):
    """Stage 2 samples: ``ActionWindowDataset`` samples plus the observation of frame ``t``.

    Extra keys: ``"image"``: ``{camera: (H, W, 3) uint8 numpy}`` of frame t (camera names without the
    ``observation.images.`` prefix), ``"instruction"``: the frame's task string.

    Args:
        cameras: camera names (or full feature keys) to decode; default all cameras (image or video features).
        (the rest as ``ActionWindowDataset``)
    """

    def __init__(self, dataset: TrajectoryDataset, normalizer: ActionNormalizer, history: int = 16,
                 chunk: int = 16, episodes: Sequence[int] | None = None, include_state: bool = False,
                 max_state_dim: int = 0, cameras: Sequence[str] | None = None):
        super().__init__(dataset, normalizer, history, chunk, episodes, include_state, max_state_dim)
        keys = dataset.meta.camera_keys
        if cameras is None:
            chosen = keys
        else:
            chosen = []
            for cam in cameras:
                key = cam if cam in keys else IMAGE_KEY_PREFIX + cam
                if key not in keys:
                    raise KeyError(f"{dataset.root}: no camera {cam!r}; cameras: {keys}.")
                chosen.append(key)
        self.camera_keys = list(chosen)
        # Video cameras: every file these windows will read opens, decodes and covers its episodes, now, before
        # training starts (not at the first batch that reaches a bad file).
        dataset.validate_videos([k for k in self.camera_keys if k in dataset.meta.video_keys])

    @staticmethod
    def camera_name(key: str) -> str:
        return key.removeprefix(IMAGE_KEY_PREFIX)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        sample = super().__getitem__(idx)
        _, _, row, _ = self.locate(int(idx))
        sample[IMAGE] = {self.camera_name(k): self.dataset.image(k, row) for k in self.camera_keys}
        sample[INSTRUCTION] = self.dataset.frame_task(row)
        return sample


# ----------------------------------------------------------------------------------------- collate
def _stack(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        if all(v.shape == first.shape for v in values):
            return torch.stack(values)
        return values
    if isinstance(first, np.ndarray):
        if all(v.shape == first.shape for v in values):
            return torch.from_numpy(np.stack(values))
        return values
    if isinstance(first, (bool, np.bool_)):
        return torch.tensor(values, dtype=torch.bool)
    if isinstance(first, (int, np.integer)):
        return torch.tensor(values, dtype=torch.long)
    if isinstance(first, (float, np.floating)):
        return torch.tensor(values, dtype=torch.float32)
    if isinstance(first, dict):
        return {k: _stack([v[k] for v in values]) for k in first}
    return list(values)


def collate_windows(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch: tensors/arrays -> ``(B, ...)`` tensors (images ``(B, H, W, 3)`` uint8),
    ints -> long ``(B,)``, strings (``embodiment``, ``instruction``) -> lists."""
    if not samples:
        raise ValueError("collate_windows got an empty batch.")
    return {k: _stack([s[k] for s in samples]) for k in samples[0]}
