"""Training views over trajectory datasets: action windows by index arithmetic.

A sample is anchored at frame ``t`` of one episode. With history length ``K`` and chunk length ``H``:

* ``history`` ``(K, D_max)``: normalized past actions ``a_{t-K} .. a_{t-1}``; rows before the episode
  start are zero and ``history_mask`` ``(K,)`` is False there.
* ``actions`` ``(H, D_max)``: the normalized future chunk ``a_t .. a_{t+H-1}``; rows past the episode end
  are zero and ``action_mask`` ``(H,)`` is False there.
* ``dim_mask`` ``(D_max,)``: True for the embodiment's real action dimensions (padding is zero).

Windows never cross episode boundaries. Nothing copies the corpus: map-style views keep the per-episode
row ranges and read the rows of one window from the memory-mapped Arrow column; the streaming view
reads parquet files one episode at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq
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
        n_eps = dataset.num_episodes
        eps = np.arange(n_eps, dtype=np.int64) if episodes is None else np.asarray(list(episodes), dtype=np.int64)
        if eps.size and (eps.min() < 0 or eps.max() >= n_eps):
            raise IndexError(f"{dataset.root}: episodes must be in 0..{n_eps - 1}; got {eps.tolist()[:10]}...")
        self.episodes = eps
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


# ----------------------------------------------------------------------------------------- mixture
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


# --------------------------------------------------------------------------------------- streaming
def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class StreamingActionWindows(torch.utils.data.IterableDataset):
    """The samples of ``ActionWindowDataset``, streamed from the parquet files episode by episode.

    Only the rows of one episode (its row groups, action/state columns only) are in memory at a time, so
    the corpus may be larger than memory. Episodes are sharded across distributed ranks and DataLoader
    workers: shard ``rank * num_workers + worker_id`` of ``world_size * num_workers`` takes every
    ``num_shards``-th episode. Shards can differ by one episode; with DDP, cap steps per epoch.

    Args:
        source: a dataset folder, its ``LeRobotDatasetMeta`` or a ``TrajectoryDataset``.
        normalizer, history, chunk, episodes, include_state, max_state_dim: as ``ActionWindowDataset``.
        shuffle: shuffle the episode order per epoch and mix windows in a buffer of ``shuffle_buffer``.
        seed: base seed for shuffling (with ``set_epoch``).
        rank, world_size: distributed shard (default: torch.distributed, else env RANK/WORLD_SIZE).
    """

    def __init__(
        self,
        source: str | os.PathLike | LeRobotDatasetMeta | TrajectoryDataset,
        normalizer: ActionNormalizer,
        history: int = 16,
        chunk: int = 16,
        episodes: Sequence[int] | None = None,
        include_state: bool = False,
        max_state_dim: int = 0,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 4096,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        _check_window_args(history, chunk)
        if isinstance(source, TrajectoryDataset):
            meta = source.meta
        elif isinstance(source, LeRobotDatasetMeta):
            meta = source
        else:
            meta = LeRobotDatasetMeta(source)
        self.meta = meta
        self.normalizer = normalizer
        self.history, self.chunk = int(history), int(chunk)
        self.embodiment = meta.embodiment.name
        self.d_max = normalizer.max_action_dim
        self._offset, self._scale, self.action_dim = _affine(normalizer, self.embodiment)
        n_eps = meta.num_episodes
        eps = np.arange(n_eps, dtype=np.int64) if episodes is None else np.asarray(list(episodes), dtype=np.int64)
        if eps.size and (eps.min() < 0 or eps.max() >= n_eps):
            raise IndexError(f"{meta.root}: episodes must be in 0..{n_eps - 1}.")
        self.episodes = eps
        self.include_state = bool(include_state)
        self.max_state_dim = int(max_state_dim)
        if self.include_state:
            self.max_state_dim = self.max_state_dim or meta.state_dim
            self._s_mean, self._s_std, self.state_dim = _state_affine(meta, self.max_state_dim)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.epoch = 0
        self.rank, self.world_size = rank, world_size
        # Global row of the first row of each data file (files hold consecutive episodes).
        self._file_start: dict[tuple[int, int], int] = {}
        for e, (c, f) in enumerate(zip(meta.episodes["data/chunk_index"], meta.episodes["data/file_index"])):
            key = (int(c), int(f))
            self._file_start[key] = min(self._file_start.get(key, 1 << 62), int(meta.episode_from[e]))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def num_windows(self) -> int:
        """Total windows over all shards (one per frame of the selected episodes)."""
        return int(self.meta.episode_lengths[self.episodes].sum()) if self.episodes.size else 0

    def shard_episodes(self, shard: int, num_shards: int) -> np.ndarray:
        """Episodes read by shard ``shard`` of ``num_shards`` in the current epoch, in reading order."""
        eps = self.episodes
        if self.shuffle:
            eps = np.random.default_rng([self.seed, self.epoch]).permutation(eps)
        return eps[shard::num_shards]

    def read_episode(self, episode: int, _cache: dict | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw ``(actions (T, A), states (T, S) or None)`` of one episode, read from its parquet row groups."""
        m = self.meta
        path = m.data_file(episode)
        lo_g, hi_g = int(m.episode_from[episode]), int(m.episode_to[episode])
        base = self._file_start[(int(m.episodes["data/chunk_index"][episode]),
                                 int(m.episodes["data/file_index"][episode]))]
        lo, hi = lo_g - base, hi_g - base
        cache = _cache if _cache is not None else {}
        if cache.get("path") != path:
            cache.clear()
            cache["path"] = path
            cache["pf"] = pq.ParquetFile(path)
            md = cache["pf"].metadata
            sizes = np.array([md.row_group(i).num_rows for i in range(md.num_row_groups)], dtype=np.int64)
            cache["rg_starts"] = np.concatenate([[0], np.cumsum(sizes)])
        starts = cache["rg_starts"]
        if hi > starts[-1]:
            raise DatasetFormatError(f"{path}: episode {episode} needs rows {lo}..{hi - 1} of this file but it has "
                                     f"{starts[-1]} rows.")
        g0 = int(np.searchsorted(starts, lo, side="right")) - 1
        g1 = int(np.searchsorted(starts, hi - 1, side="right")) - 1
        groups = tuple(range(g0, g1 + 1))
        if cache.get("groups") != groups:
            cols = [ACTION_KEY, "episode_index", "frame_index"]
            if self.include_state:
                cols.append(STATE_KEY)
            cache["groups"] = groups
            cache["table"] = cache["pf"].read_row_groups(list(groups), columns=cols)
        table = cache["table"].slice(lo - int(starts[g0]), hi - lo)
        ep_col = table.column("episode_index").to_numpy()
        fi_col = table.column("frame_index").to_numpy()
        if (ep_col != episode).any() or not np.array_equal(fi_col, np.arange(hi - lo)):
            bad = int(np.flatnonzero((ep_col != episode) | (fi_col != np.arange(hi - lo)))[0])
            raise DatasetFormatError(
                f"{path}: episode {episode}: row {lo + bad} has episode_index={int(ep_col[bad])}, frame_index="
                f"{int(fi_col[bad])}; expected episode {episode}, frame {bad} (metadata and data disagree, or "
                "frame_index has a gap).")
        actions = _fixed_rows(table.column(ACTION_KEY), self.action_dim)
        states = _fixed_rows(table.column(STATE_KEY), m.state_dim) if self.include_state else None
        for key, arr in ((ACTION_KEY, actions), (STATE_KEY, states)):
            if arr is not None and not np.isfinite(arr).all():
                f, d = (int(i) for i in np.argwhere(~np.isfinite(arr))[0])
                raise DatasetFormatError(f"{path}: episode {episode}, frame {f}: {key} contains NaN or inf "
                                         f"(dimension {d}).")
        return actions, states

    def _episode_windows(self, episode: int, cache: dict) -> Iterator[dict[str, Any]]:
        """All windows of one episode, built at once by fancy indexing into a zero-padded copy of it."""
        actions, states = self.read_episode(episode, cache)
        k, h, length = self.history, self.chunk, actions.shape[0]
        padded = np.zeros((k + length + h, self.d_max), np.float32)
        padded[k:k + length, : self.action_dim] = (actions - self._offset) / self._scale
        t = np.arange(length)[:, None]
        hist = padded[t + np.arange(k)[None, :]]  # (T, K, D_max): a_{t-K} .. a_{t-1}
        hmask = (t - k + np.arange(k)[None, :]) >= 0
        fut = padded[k + t + np.arange(h)[None, :]]  # (T, H, D_max): a_t .. a_{t+H-1}
        amask = (t + np.arange(h)[None, :]) < length
        if self.include_state:
            state = np.zeros((length, self.max_state_dim), np.float32)
            state[:, : self.state_dim] = (states - self._s_mean) / self._s_std
        dim_mask = torch.zeros(self.d_max, dtype=torch.bool)
        dim_mask[: self.action_dim] = True
        for i in range(length):
            sample = {HISTORY: torch.from_numpy(hist[i]), HISTORY_MASK: torch.from_numpy(hmask[i]),
                      ACTIONS: torch.from_numpy(fut[i]), ACTION_MASK: torch.from_numpy(amask[i]),
                      DIM_MASK: dim_mask.clone(), EMBODIMENT: self.embodiment,
                      EPISODE_INDEX: int(episode), FRAME_INDEX: i}
            if self.include_state:
                sample[STATE] = torch.from_numpy(state[i])
            yield sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = _dist_info(self.rank, self.world_size)
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        shard, num_shards = rank * nw + wid, world * nw
        cache: dict = {}
        stream = (s for e in self.shard_episodes(shard, num_shards) for s in self._episode_windows(int(e), cache))
        if not self.shuffle:
            yield from stream
            return
        rng = np.random.default_rng([self.seed, self.epoch, shard])
        buf: list[dict[str, Any]] = []
        for s in stream:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], s = s, buf[j]
            yield s
        rng.shuffle(buf)
        yield from buf


def _fixed_rows(col, width: int) -> np.ndarray:
    """A list (or, for width 1, scalar) column -> ``(N, width)`` float32."""
    arr = col.combine_chunks()
    flat = arr.flatten() if hasattr(arr, "flatten") else arr
    flat = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32)
    if flat.size != len(arr) * width:
        raise DatasetFormatError(f"Column {col.type} does not hold {width} values per row.")
    return flat.reshape(-1, width)


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
