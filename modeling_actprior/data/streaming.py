"""The action windows of a dataset streamed from its parquet files one episode at a time, sharded across distributed
ranks and DataLoader workers: for corpora larger than memory. The samples are those of ``ActionWindowDataset``."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from ..action_space import ActionNormalizer
from ..inputs import ACTION_MASK, ACTIONS, DIM_MASK, EMBODIMENT, HISTORY, HISTORY_MASK, STATE
from .lerobot import ACTION_KEY, STATE_KEY, DatasetFormatError, LeRobotDatasetMeta, TrajectoryDataset
from .windows import EPISODE_INDEX, FRAME_INDEX, _affine, _check_window_args, _episode_indices, _state_affine


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
        self.episodes = _episode_indices(episodes, meta.num_episodes, meta.root)
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


__all__ = ["StreamingActionWindows"]
