"""LeRobot v3.0 datasets on local disk: writing, reading, validating.

A dataset folder follows LeRobot's published v3.0 layout, so LeRobot tools read what we write and we
read what LeRobot writes::

    meta/info.json                               # codebase_version "v3.0", robot_type, fps, features...
    meta/stats.json                              # per feature: min max mean std count q01 q10 q50 q90 q99
    meta/tasks.parquet                           # task string (index "task") -> task_index
    meta/episodes/chunk-000/file-000.parquet     # one row per episode: length, tasks, data file, index range
    data/chunk-000/file-000.parquet              # one row per frame, one row group per episode

``info.json`` carries an extra ``"actprior"`` block (``embodiment``, per-episode ``success``,
``generator`` provenance) that LeRobot ignores.

Writing is atomic: everything goes into a sibling folder ``<root>.tmp-<pid>``, is fsync'ed, and is
renamed onto ``root`` only when complete, so an interrupted generation never leaves a folder whose
metadata disagrees with its data.

Reading registers the dataset's embodiment when the registry does not know its ``robot_type``: from
the ``actprior`` block, or else from LeRobot's own description (``features.action.shape`` and
``features.action.names``, ``fps``). Validation errors name the file, the episode and what was expected.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..action_space import (
    EMBODIMENT_REGISTRY,
    EmbodimentSpec,
    EmbodimentStats,
    UnknownEmbodimentError,
    register_embodiment,
)
from ..training.atomic_io import fsync_dir, fsync_tree

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]  # noqa: UP007 - a runtime alias

CODEBASE_VERSION = "v3.0"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
CHUNK_FILE_PATTERN = "chunk-{chunk_index:03d}/file-{file_index:03d}"
EPISODES_PATH = EPISODES_DIR + "/" + CHUNK_FILE_PATTERN + ".parquet"
DATA_PATH = "data/" + CHUNK_FILE_PATTERN + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE_PATTERN + ".mp4"
DEFAULT_CHUNKS_SIZE = 1000
DEFAULT_DATA_FILE_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB = 200

ACTION_KEY = "action"
STATE_KEY = "observation.state"
IMAGE_KEY_PREFIX = "observation.images."
ACTPRIOR_KEY = "actprior"
QUANTILES: dict[str, float] = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
STAT_KEYS = ("min", "max", "mean", "std", "count") + tuple(QUANTILES)

# Columns every LeRobot frame carries, with LeRobot's dtypes.
DEFAULT_FEATURES: dict[str, dict] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}

_MAX_IMAGE_STAT_FRAMES = 64  # frames sampled per episode for image statistics
_MAX_IMAGE_STAT_SIDE = 150  # images are strided down to about this size for statistics


class DatasetFormatError(ValueError):
    """A dataset folder that does not follow the layout or disagrees with itself."""


@dataclass
class Episode:
    """One demonstration, in raw units.

    Attributes:
        actions: ``(T, A)`` float32 actions, ``A`` the embodiment's ``action_dim``.
        states: ``(T, S)`` float32 proprioceptive states (``S`` may be 0: no state feature).
        task: natural-language instruction.
        images: camera name -> ``(T, H, W, 3)`` uint8 frames, or None.
        success: whether the demonstration reached its goal.
    """

    actions: np.ndarray
    states: np.ndarray
    task: str
    images: dict[str, np.ndarray] | None = None
    success: bool = True


# ------------------------------------------------------------------------------------------ helpers
def _fps_value(fps: float):
    fps = float(fps)
    return int(fps) if fps.is_integer() else fps


def _write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=4)


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


def _hf_features(features: Mapping[str, dict]):
    """``datasets.Features`` for the parquet columns of LeRobot ``features`` (videos live outside)."""
    import datasets

    out = {}
    for key, ft in features.items():
        dtype, shape = ft["dtype"], list(ft.get("shape") or [1])
        if dtype == "video":
            continue
        if dtype == "image":
            out[key] = datasets.Image()
        elif shape == [1]:
            out[key] = datasets.Value(dtype)
        elif len(shape) == 1:
            out[key] = datasets.Sequence(datasets.Value(dtype), length=shape[0])
        else:
            raise DatasetFormatError(f"Feature {key!r}: unsupported shape {shape} for dtype {dtype}.")
    return datasets.Features(out)


def flatten_names(names: Any) -> list[str] | None:
    """LeRobot feature names: a list, or a dict like ``{"motors": [...]}`` (values concatenated)."""
    if names is None:
        return None
    if isinstance(names, Mapping):
        flat: list[str] = []
        for value in names.values():
            sub = flatten_names(value)
            if sub is None:
                return None
            flat.extend(sub)
        return flat
    if isinstance(names, (list, tuple)):
        if all(isinstance(n, str) for n in names):
            return list(names)
        flat = []
        for n in names:
            sub = flatten_names(n) if not isinstance(n, str) else [n]
            if sub is None:
                return None
            flat.extend(sub)
        return flat
    if isinstance(names, str):
        return [names]
    return None


def embodiment_name_from_robot_type(robot_type: str) -> str:
    """``"SO-100 follower"`` -> ``"so_100_follower"``: a valid embodiment name."""
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9_]", "_", robot_type.strip().lower())).strip("_")


# -------------------------------------------------------------------------------------------- writer
class LeRobotDatasetWriter:
    """Write episodes into a LeRobot v3.0 dataset folder, atomically.

    Args:
        root: the dataset folder to create.
        spec: the embodiment whose actions are stored; ``robot_type`` is ``spec.name``.
        fps: recording rate (``timestamp = frame_index / fps``).
        state_names: names of the ``observation.state`` dimensions (default ``state_0``...).
        camera_names: cameras stored as ``observation.images.<cam>`` (PNG in parquet, or MP4 with ``video_codec``).
        image_size: if given, every frame must be ``(image_size, image_size, 3)``.
        provenance: free-form JSON stored as ``info.json["actprior"]["generator"]``.
        overwrite: replace an existing dataset at ``root`` (only at the final rename).
        chunks_size: files per chunk folder (LeRobot's ``chunks_size``).
        data_files_size_in_mb: a data file is closed and a new one started beyond this size.
        png_compress_level: zlib level for PNG frames (1 is fast, 9 is small).
        video_codec: ``"av1"`` (LeRobot's default) or ``"h264"``: store the cameras as MP4 files under ``videos/``
            the way LeRobot records them (episodes concatenated per file, located by ``from_timestamp``); None
            keeps PNG frames in the parquet files.
        video_files_size_in_mb: a video file is closed and a new one started beyond this size.

    Use as a context manager: the dataset is finalized when the block ends normally and nothing is left
    behind when it raises::

        with LeRobotDatasetWriter(root, get_embodiment("panda"), fps=20) as w:
            for ep in episodes:
                w.add_episode(ep)
    """

    def __init__(
        self,
        root: PathLike,
        spec: EmbodimentSpec,
        fps: float,
        state_names: Sequence[str] | None = None,
        camera_names: Sequence[str] = (),
        image_size: int | None = None,
        provenance: dict | None = None,
        overwrite: bool = False,
        chunks_size: int = DEFAULT_CHUNKS_SIZE,
        data_files_size_in_mb: float = DEFAULT_DATA_FILE_SIZE_IN_MB,
        png_compress_level: int = 1,
        video_codec: str | None = None,
        video_files_size_in_mb: float = DEFAULT_VIDEO_FILE_SIZE_IN_MB,
    ):
        if not isinstance(spec, EmbodimentSpec):
            raise TypeError(f"spec must be an EmbodimentSpec; got {type(spec).__name__}.")
        if not (float(fps) > 0):
            raise ValueError(f"fps must be positive; got {fps}.")
        self.root = os.path.abspath(os.fspath(root))
        self.spec = spec
        self.fps = float(fps)
        self.state_names = list(state_names) if state_names is not None else None
        self.camera_names = list(camera_names)
        if len(set(self.camera_names)) != len(self.camera_names):
            raise ValueError(f"camera_names must be unique; got {self.camera_names}.")
        for cam in self.camera_names:
            if not cam or "/" in cam or "." in cam:
                raise ValueError(f"Camera name {cam!r}: use a plain identifier like 'agentview'.")
        self.image_size = int(image_size) if image_size is not None else None
        self.provenance = dict(provenance or {})
        self.overwrite = bool(overwrite)
        self.chunks_size = int(chunks_size)
        self.data_files_size_bytes = float(data_files_size_in_mb) * 1024 * 1024
        self.png_compress_level = int(png_compress_level)
        from .video import VIDEO_CODECS

        if video_codec is not None and video_codec not in VIDEO_CODECS:
            raise ValueError(f"video_codec must be one of {sorted(VIDEO_CODECS)} or None (PNG frames); got "
                             f"{video_codec!r}.")
        self.video_codec = video_codec
        self.video_files_size_bytes = float(video_files_size_in_mb) * 1024 * 1024
        if self.chunks_size <= 0 or self.data_files_size_bytes <= 0 or self.video_files_size_bytes <= 0:
            raise ValueError("chunks_size, data_files_size_in_mb and video_files_size_in_mb must be positive.")
        undo_interrupted_writes(self.root)
        if os.path.exists(self.root) and not self.overwrite:
            raise FileExistsError(f"{self.root} already exists; pass overwrite=True to replace it.")
        if os.path.lexists(self.root):
            check_replaceable(self.root)
        self.tmp_root = f"{self.root}.tmp-{os.getpid()}"
        if os.path.exists(self.tmp_root):
            shutil.rmtree(self.tmp_root)
        os.makedirs(self.tmp_root)

        self._state_dim: int | None = len(self.state_names) if self.state_names is not None else None
        self._image_shapes: dict[str, tuple[int, int]] = {}
        self._tasks: dict[str, int] = {}
        self._episodes: list[dict] = []
        self._success: list[bool] = []
        self._actions: list[np.ndarray] = []
        self._states: list[np.ndarray] = []
        self._image_stats: dict[str, list[dict]] = {cam: [] for cam in self.camera_names}
        self._num_frames = 0
        self._chunk, self._file = 0, 0
        self._sink: pa.NativeFile | None = None
        self._videos: dict[str, Any] = {}  # camera -> open VideoEncoder
        self._video_file: dict[str, tuple[int, int]] = {cam: (0, 0) for cam in self.camera_names}
        self._pq_writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self._features: dict[str, dict] | None = None
        self._closed = False

    # ------------------------------------------------------------------------------------ context
    def __enter__(self) -> LeRobotDatasetWriter:  # noqa: PYI034
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.abort()
            return False
        if not self._closed:
            self.finalize()
        return False

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    @property
    def num_frames(self) -> int:
        return self._num_frames

    # ------------------------------------------------------------------------------------ validation
    def _check_episode(self, ep: Episode) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        i = len(self._episodes)
        where = f"Episode {i} (for {self.root})"
        if not isinstance(ep, Episode):
            raise TypeError(f"{where}: expected an Episode, got {type(ep).__name__}.")
        actions = np.asarray(ep.actions)
        if actions.ndim != 2 or actions.shape[1] != self.spec.action_dim:
            raise ValueError(
                f"{where}: actions must have shape (T, {self.spec.action_dim}) for embodiment "
                f"{self.spec.name!r} ({', '.join(self.spec.action_names)}); got {actions.shape}."
            )
        t = actions.shape[0]
        if t == 0:
            raise ValueError(f"{where}: has no frames (T=0); drop empty episodes before writing.")
        if actions.dtype.kind not in "fiu":
            raise ValueError(f"{where}: actions must be numeric; got dtype {actions.dtype}.")
        actions = actions.astype(np.float32)
        _check_finite_frames(actions, f"{where}: actions")
        states = np.asarray(ep.states) if ep.states is not None else np.zeros((t, 0), np.float32)
        if states.ndim == 1 and states.shape[0] == t:
            states = states[:, None]
        if states.ndim != 2 or states.shape[0] != t:
            raise ValueError(f"{where}: states must have shape (T={t}, S); got {states.shape}.")
        if self._state_dim is None:
            self._state_dim = states.shape[1]
        if states.shape[1] != self._state_dim:
            raise ValueError(
                f"{where}: states have width {states.shape[1]} but this dataset's observation.state has "
                f"width {self._state_dim}" + (f" ({', '.join(self.state_names)})." if self.state_names else ".")
            )
        if states.dtype.kind not in "fiu":
            raise ValueError(f"{where}: states must be numeric; got dtype {states.dtype}.")
        states = states.astype(np.float32)
        _check_finite_frames(states, f"{where}: states")
        if not isinstance(ep.task, str) or not ep.task.strip():
            raise ValueError(f"{where}: task must be a non-empty instruction string; got {ep.task!r}.")
        images = dict(ep.images or {})
        if set(images) != set(self.camera_names):
            raise ValueError(
                f"{where}: images for cameras {sorted(images)} but the writer was created with "
                f"camera_names={self.camera_names}; give exactly those cameras."
            )
        for cam, frames in images.items():
            frames = np.asarray(frames)
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != t or frames.shape[-1] != 3:
                raise ValueError(
                    f"{where}: camera {cam!r} frames must be uint8 (T={t}, H, W, 3); got {frames.dtype} "
                    f"{frames.shape}."
                )
            hw = tuple(frames.shape[1:3])
            if self.image_size is not None and hw != (self.image_size, self.image_size):
                raise ValueError(f"{where}: camera {cam!r} frames are {hw}, expected image_size "
                                 f"{self.image_size}x{self.image_size}.")
            if self._image_shapes.setdefault(cam, hw) != hw:
                raise ValueError(f"{where}: camera {cam!r} frames are {hw}, earlier episodes had "
                                 f"{self._image_shapes[cam]}.")
            images[cam] = frames
        return actions, states, images

    # ------------------------------------------------------------------------------------ features
    def _build_features(self) -> dict[str, dict]:
        feats: dict[str, dict] = {
            ACTION_KEY: {"dtype": "float32", "shape": [self.spec.action_dim], "names": list(self.spec.action_names)}
        }
        if self._state_dim:
            names = self.state_names or [f"state_{i}" for i in range(self._state_dim)]
            feats[STATE_KEY] = {"dtype": "float32", "shape": [self._state_dim], "names": names}
        for cam in self.camera_names:
            h, w = self._image_shapes[cam]
            feats[IMAGE_KEY_PREFIX + cam] = {"dtype": "image", "shape": [h, w, 3],
                                             "names": ["height", "width", "channels"]}
            if self.video_codec:
                from .video import feature_info

                feats[IMAGE_KEY_PREFIX + cam].update(dtype="video", info=feature_info(w, h, self.fps, self.video_codec))
        for key, ft in DEFAULT_FEATURES.items():
            feats[key] = dict(ft)
        return feats

    def _data_relpath(self) -> str:
        return DATA_PATH.format(chunk_index=self._chunk, file_index=self._file)

    def _open_data_file(self) -> None:
        path = os.path.join(self.tmp_root, self._data_relpath())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._sink = pa.OSFile(path, "wb")
        self._pq_writer = pq.ParquetWriter(self._sink, self._schema, compression="snappy")

    def _close_data_file(self) -> None:
        if self._pq_writer is not None:
            self._pq_writer.close()
            self._pq_writer = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    # ------------------------------------------------------------------------------------ writing
    def add_episode(self, episode: Episode) -> int:
        """Validate and append one episode; returns its ``episode_index``."""
        if self._closed:
            raise RuntimeError(f"Writer for {self.root} is already finalized or aborted.")
        actions, states, images = self._check_episode(episode)
        if self._features is None:
            self._features = self._build_features()
            self._schema = _hf_features(self._features).arrow_schema
        ep_idx = len(self._episodes)
        t = actions.shape[0]
        task_idx = self._tasks.setdefault(episode.task, len(self._tasks))
        start = self._num_frames
        frame_index = np.arange(t, dtype=np.int64)
        timestamp = (frame_index / self.fps).astype(np.float32)
        cols: dict[str, pa.Array] = {ACTION_KEY: _vector_column(actions)}
        if self._state_dim:
            cols[STATE_KEY] = _vector_column(states)
        from PIL import Image

        for cam in (() if self.video_codec else self.camera_names):
            encoded = []
            for frame in images[cam]:
                buf = io.BytesIO()
                Image.fromarray(frame).save(buf, format="PNG", compress_level=self.png_compress_level)
                encoded.append(buf.getvalue())
            cols[IMAGE_KEY_PREFIX + cam] = pa.StructArray.from_arrays(
                [pa.array(encoded, pa.binary()), pa.array([None] * t, pa.string())], names=["bytes", "path"])
        cols["timestamp"] = pa.array(timestamp)
        cols["frame_index"] = pa.array(frame_index)
        cols["episode_index"] = pa.array(np.full(t, ep_idx, np.int64))
        cols["index"] = pa.array(np.arange(start, start + t, dtype=np.int64))
        cols["task_index"] = pa.array(np.full(t, task_idx, np.int64))
        table = pa.table([cols[f.name] for f in self._schema], schema=self._schema)

        if self._pq_writer is None:
            self._open_data_file()
        self._pq_writer.write_table(table, row_group_size=max(t, 1))  # one row group per episode
        data_chunk, data_file = self._chunk, self._file

        stats = {ACTION_KEY: vector_stats(actions)}
        if self._state_dim:
            stats[STATE_KEY] = vector_stats(states)
        for cam in self.camera_names:
            st = image_stats(images[cam])
            stats[IMAGE_KEY_PREFIX + cam] = st
            self._image_stats[cam].append(st)
        stats["timestamp"] = vector_stats(timestamp)
        stats["frame_index"] = vector_stats(frame_index)
        stats["episode_index"] = vector_stats(np.full(t, ep_idx))
        stats["index"] = vector_stats(np.arange(start, start + t))
        stats["task_index"] = vector_stats(np.full(t, task_idx))
        row = {
            "episode_index": ep_idx,
            "tasks": [episode.task],
            "length": t,
            "data/chunk_index": data_chunk,
            "data/file_index": data_file,
            "dataset_from_index": start,
            "dataset_to_index": start + t,
        }
        for feat, st in stats.items():
            for key in STAT_KEYS:
                row[f"stats/{feat}/{key}"] = st[key]
        for cam in (self.camera_names if self.video_codec else ()):
            row.update(self._add_video(cam, images[cam]))
        row["meta/episodes/chunk_index"] = 0
        row["meta/episodes/file_index"] = 0
        self._episodes.append(row)
        self._success.append(bool(episode.success))
        self._actions.append(actions)
        if self._state_dim:
            self._states.append(states)
        self._num_frames += t

        if self._sink.tell() >= self.data_files_size_bytes:  # roll over to the next data file
            self._close_data_file()
            self._file += 1
            if self._file >= self.chunks_size:
                self._chunk, self._file = self._chunk + 1, 0
        return ep_idx

    def _add_video(self, cam: str, frames: np.ndarray) -> dict:
        """Append an episode's frames to the camera's current MP4 file; its ``videos/...`` metadata columns."""
        from .video import VideoEncoder

        key = IMAGE_KEY_PREFIX + cam
        chunk, file = self._video_file[cam]
        enc = self._videos.get(cam)
        if enc is None:
            rel = VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)
            h, w = self._image_shapes[cam]
            enc = self._videos[cam] = VideoEncoder(os.path.join(self.tmp_root, rel), self.fps, w, h, self.video_codec)
        start = enc.frames_written / self.fps
        enc.add(frames)
        cols = {f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                f"videos/{key}/from_timestamp": start, f"videos/{key}/to_timestamp": enc.frames_written / self.fps}
        if enc.size_bytes() >= self.video_files_size_bytes:  # roll over to the next video file
            enc.close()
            del self._videos[cam]
            file += 1
            self._video_file[cam] = (chunk + 1, 0) if file >= self.chunks_size else (chunk, file)
        return cols

    def _close_videos(self) -> None:
        for cam in list(self._videos):
            self._videos.pop(cam).close()

    def _global_stats(self) -> dict[str, dict]:
        n = self._num_frames
        stats = {ACTION_KEY: vector_stats(np.concatenate(self._actions))}
        if self._state_dim:
            stats[STATE_KEY] = vector_stats(np.concatenate(self._states))
        for cam in self.camera_names:
            stats[IMAGE_KEY_PREFIX + cam] = aggregate_stats(self._image_stats[cam])
        lengths = [ep["length"] for ep in self._episodes]
        frame_index = np.concatenate([np.arange(t) for t in lengths])
        stats["timestamp"] = vector_stats((frame_index / self.fps).astype(np.float32))
        stats["frame_index"] = vector_stats(frame_index)
        stats["episode_index"] = vector_stats(np.repeat(np.arange(len(lengths)), lengths))
        stats["index"] = vector_stats(np.arange(n))
        task_ids = [self._tasks[ep["tasks"][0]] for ep in self._episodes]
        stats["task_index"] = vector_stats(np.repeat(np.asarray(task_ids, dtype=np.int64), lengths))
        return stats

    def _info(self) -> dict:
        e = len(self._episodes)
        return {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.spec.name,
            "total_episodes": e,
            "total_frames": self._num_frames,
            "total_tasks": len(self._tasks),
            "chunks_size": self.chunks_size,
            "data_files_size_in_mb": _fps_value(self.data_files_size_bytes / (1024 * 1024)),
            "video_files_size_in_mb": _fps_value(self.video_files_size_bytes / (1024 * 1024)),
            "fps": _fps_value(self.fps),
            "splits": {"train": f"0:{e}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.video_codec and self.camera_names else None,
            "features": self._features,
            ACTPRIOR_KEY: {
                "embodiment": self.spec.to_dict(),
                "success": list(self._success),
                "generator": self.provenance,
            },
        }

    def finalize(self) -> str:
        """Write metadata, fsync, and rename the finished dataset onto ``root``; returns ``root``."""
        if self._closed:
            raise RuntimeError(f"Writer for {self.root} is already finalized or aborted.")
        try:
            if not self._episodes:
                raise ValueError(f"No episodes were added to {self.root}; nothing to write.")
            self._close_data_file()
            self._close_videos()
            tmp = self.tmp_root
            import pandas as pd

            tasks = pd.DataFrame({"task_index": list(self._tasks.values())},
                                 index=pd.Index(list(self._tasks), name="task"))
            os.makedirs(os.path.join(tmp, "meta"), exist_ok=True)
            tasks.to_parquet(os.path.join(tmp, TASKS_PATH))
            ep_path = os.path.join(tmp, EPISODES_PATH.format(chunk_index=0, file_index=0))
            os.makedirs(os.path.dirname(ep_path), exist_ok=True)
            pq.write_table(pa.Table.from_pylist(self._episodes), ep_path)
            _write_json(os.path.join(tmp, STATS_PATH), self._global_stats())
            _write_json(os.path.join(tmp, INFO_PATH), self._info())
            fsync_tree(tmp)
            self._commit()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.root

    def _commit(self) -> None:
        parent = os.path.dirname(self.root)
        old = None
        if os.path.lexists(self.root):
            if not self.overwrite:
                raise FileExistsError(f"{self.root} appeared while writing; pass overwrite=True to replace it.")
            old = f"{self.root}.old-{os.getpid()}"
            if os.path.lexists(old):
                shutil.rmtree(old)
            os.rename(self.root, old)
        try:
            os.rename(self.tmp_root, self.root)
        except BaseException:
            if old is not None:
                os.rename(old, self.root)
            raise
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Drop everything written so far; ``root`` is left as it was."""
        try:
            self._close_data_file()
        except (OSError, pa.ArrowException) as e:  # pragma: no cover - closing a broken writer
            logger.debug("Closing the data file of an aborted writer failed: %s", e)
        for enc in self._videos.values():
            try:
                enc.close()
            except Exception as e:  # noqa: BLE001 - an aborted writer drops the file anyway
                logger.debug("Closing a video file of an aborted writer failed: %s", e)
        self._videos = {}
        shutil.rmtree(self.tmp_root, ignore_errors=True)
        self._closed = True


#: What a dataset this library wrote may hold: the LeRobot v3 layout (and a Hub card). ``overwrite`` replaces
#: nothing else.
_WRITTEN_FILES = re.compile(
    r"(meta/(info\.json|stats\.json|tasks\.parquet|episodes/chunk-\d+/file-\d+\.parquet)"
    r"|data/chunk-\d+/file-\d+\.parquet|videos/[^/]+/chunk-\d+/file-\d+\.mp4|README\.md|\.gitattributes)")


def check_replaceable(root: str) -> None:
    """Refuse to replace ``root`` unless it is a dataset this library wrote (its ``meta/info.json`` carries the
    ``actprior`` block) holding nothing but the dataset's own files, or an empty folder: ``overwrite`` must never
    delete a user's files. The error names what would have been lost."""
    if os.path.isdir(root) and not os.path.islink(root) and not os.listdir(root):
        return
    info = os.path.join(root, INFO_PATH)
    written = False
    if os.path.isfile(info):
        try:
            with open(info) as f:
                written = ACTPRIOR_KEY in json.load(f)
        except (OSError, ValueError):
            written = False
    if not written or os.path.islink(root) or not os.path.isdir(root):
        raise FileExistsError(
            f"{root} exists and is not a dataset written by actprior (no {INFO_PATH} with an '{ACTPRIOR_KEY}' block), "
            "so overwrite will not replace it: nothing was changed. Choose another --out, or move that folder away "
            "yourself.")
    foreign = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            if not _WRITTEN_FILES.fullmatch(rel) or os.path.islink(os.path.join(folder, name)):
                foreign.append(os.path.join(folder, name))
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise FileExistsError(
            f"{root} is an actprior dataset but also holds files it did not write ({', '.join(foreign[:5])}{more}), "
            "which overwrite would delete: nothing was changed. Move them out of the folder, or choose another --out.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def undo_interrupted_writes(root: str) -> None:
    """Clear what a writer killed mid-way left beside ``root``: its ``.tmp-<pid>`` folder and, if it was killed
    between the two renames of an overwrite, the previous dataset ``.old-<pid>`` (renamed back onto ``root``).
    Folders of writers still running are left alone."""
    parent, name = os.path.split(root)
    if not os.path.isdir(parent):
        return
    for entry in sorted(os.listdir(parent)):
        m = re.fullmatch(re.escape(name) + r"\.(tmp|old)-(\d+)", entry)
        if not m or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        path = os.path.join(parent, entry)
        if m.group(1) == "old" and not os.path.lexists(root):
            logger.warning("%s: restoring the dataset a killed writer had moved to %s", root, path)
            os.rename(path, root)
        else:
            shutil.rmtree(path, ignore_errors=True)


def write_lerobot_dataset(root: PathLike, episodes: Iterable[Episode], spec: EmbodimentSpec, fps: float,
                          **kw) -> str:
    """Write ``episodes`` to a LeRobot v3.0 folder at ``root`` (see ``LeRobotDatasetWriter``); returns root."""
    with LeRobotDatasetWriter(root, spec, fps, **kw) as writer:
        for ep in episodes:
            writer.add_episode(ep)
    return writer.root


def _vector_column(x: np.ndarray) -> pa.Array:
    """``(T, D)`` -> a fixed-size list column; width 1 is a plain scalar column, as LeRobot stores shape [1]."""
    if x.shape[1] == 1:
        return pa.array(x[:, 0])
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def _check_finite_frames(x: np.ndarray, what: str) -> None:
    if not np.isfinite(x).all():
        frame, dim = (int(i) for i in np.argwhere(~np.isfinite(x))[0])
        raise ValueError(f"{what} contain NaN or inf at frame {frame}, dimension {dim} (value {x[frame, dim]}).")


_8BIT_IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "YCbCr")


def _image_hw(feature: dict) -> tuple[int, int] | None:
    """``(height, width)`` an image feature of info.json declares (``[h, w, c]`` or ``[c, h, w]``), if it does."""
    shape, names = feature.get("shape"), feature.get("names")
    if not isinstance(shape, (list, tuple)) or len(shape) != 3:
        return None
    if isinstance(names, (list, tuple)) and "height" in names and "width" in names:
        return int(shape[names.index("height")]), int(shape[names.index("width")])
    if shape[-1] in (1, 3, 4):
        return int(shape[0]), int(shape[1])
    if shape[0] in (1, 3, 4):
        return int(shape[1]), int(shape[2])
    return None


# -------------------------------------------------------------------------------------------- meta
def _safe_template(root: str, template: Any, key: str, info_path: str, **fmt) -> str:
    """Format a path template from info.json and make sure it stays inside the dataset root."""
    if not isinstance(template, str) or not template:
        raise DatasetFormatError(f"{info_path}: {key} must be a relative path template; got {template!r}.")
    parts = re.split(r"[\\/]+", template)
    if os.path.isabs(template) or template.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", template) \
            or ".." in parts or "~" in template[:1]:
        raise DatasetFormatError(
            f"{info_path}: {key} {template!r} points outside the dataset folder (absolute path or '..'); "
            "templates must be relative, like 'data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet'."
        )
    try:
        rel = template.format(**fmt)
    except (KeyError, IndexError, ValueError) as e:
        raise DatasetFormatError(f"{info_path}: {key} {template!r} cannot be formatted ({e!r}).") from None
    path = os.path.normpath(os.path.join(root, rel))
    real_root = os.path.realpath(root)
    if os.path.isabs(rel) or os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
        raise DatasetFormatError(f"{info_path}: {key} {template!r} resolves to {path}, outside {root}.")
    return path


class LeRobotDatasetMeta:
    """The metadata of a LeRobot v3.0 dataset folder: info, stats, tasks, episodes, embodiment.

    Attributes:
        root: the dataset folder.
        info: ``meta/info.json`` as a dict.
        stats: ``meta/stats.json`` as ``{feature: {stat: np.ndarray}}`` (empty if absent and not validated).
        tasks: task strings, ``tasks[task_index]``.
        episodes: per-episode metadata columns (no ``stats/...``) as ``{column: list}``, sorted by episode.
        embodiment: the ``EmbodimentSpec`` of the actions (registered if it was new).
    """

    def __init__(self, root: PathLike, require_stats: bool = True):
        self.root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"No dataset folder at {self.root}.")
        self.info_path = os.path.join(self.root, INFO_PATH)
        self.info = self._read_info()
        self.stats = self._read_stats(require_stats)
        self.tasks = self._read_tasks()
        self.episodes = self._read_episodes()
        self.embodiment = self._resolve_embodiment()

    # ------------------------------------------------------------------------------------ reading
    def _read_info(self) -> dict:
        if not os.path.isfile(self.info_path):
            raise FileNotFoundError(f"{self.info_path} is missing; {self.root} is not a LeRobot v3.0 dataset.")
        try:
            with open(self.info_path) as f:
                info = json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{self.info_path} is not valid JSON ({e}).") from None
        version = str(info.get("codebase_version", ""))
        if not version.startswith("v3"):
            raise DatasetFormatError(
                f"{self.info_path}: codebase_version {version!r}; only LeRobot v3.x datasets are supported "
                "(convert v2.1 datasets with LeRobot's convert_dataset_v21_to_v30 script)."
            )
        for key in ("fps", "features", "data_path"):
            if key not in info:
                raise DatasetFormatError(f"{self.info_path} lacks the key {key!r}.")
        if not isinstance(info["features"], dict) or ACTION_KEY not in info["features"]:
            raise DatasetFormatError(f"{self.info_path}: features has no {ACTION_KEY!r} feature.")
        if not (float(info["fps"]) > 0):
            raise DatasetFormatError(f"{self.info_path}: fps must be positive; got {info['fps']}.")
        _safe_template(self.root, info["data_path"], "data_path", self.info_path, chunk_index=0, file_index=0)
        if info.get("video_path"):
            _safe_template(self.root, info["video_path"], "video_path", self.info_path,
                           chunk_index=0, file_index=0, video_key="x")
        return info

    def _read_stats(self, required: bool) -> dict[str, dict[str, np.ndarray]]:
        path = os.path.join(self.root, STATS_PATH)
        if not os.path.isfile(path):
            if required:
                raise DatasetFormatError(
                    f"{path} is missing; action statistics are needed to normalize actions. Recompute them "
                    "(LeRobot writes meta/stats.json with every dataset)."
                )
            return {}
        try:
            with open(path) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{path} is not valid JSON ({e}).") from None
        stats = {feat: {k: np.atleast_1d(np.asarray(v, dtype=np.float64)) for k, v in d.items()}
                 for feat, d in raw.items() if isinstance(d, dict)}
        if required:
            if ACTION_KEY not in stats:
                raise DatasetFormatError(f"{path} has no statistics for {ACTION_KEY!r} (found: {sorted(stats)}).")
            a = stats[ACTION_KEY]
            missing = [k for k in ("mean", "std", "min", "max") if k not in a]
            if missing:
                raise DatasetFormatError(f"{path}: statistics for {ACTION_KEY!r} lack {missing}.")
            width = self.action_dim
            for k, v in a.items():
                if k != "count" and v.size != width:
                    raise DatasetFormatError(
                        f"{path}: {ACTION_KEY}.{k} has {v.size} values; features.action.shape says {width}.")
                if not np.isfinite(v).all():
                    raise DatasetFormatError(f"{path}: {ACTION_KEY}.{k} contains NaN or inf.")
        return stats

    def _read_tasks(self) -> list[str]:
        path = os.path.join(self.root, TASKS_PATH)
        if not os.path.isfile(path):
            if int(self.info.get("total_tasks", 0) or 0) > 0:
                raise DatasetFormatError(f"{path} is missing but info.json lists "
                                         f"{self.info['total_tasks']} tasks.")
            return []
        table = pq.read_table(path)
        cols = table.column_names
        if "task_index" not in cols:
            raise DatasetFormatError(f"{path} has no 'task_index' column (columns: {cols}).")
        task_col = "task" if "task" in cols else next((c for c in cols if c != "task_index"), None)
        if task_col is None:
            raise DatasetFormatError(f"{path} has no task string column (columns: {cols}).")
        idx = table.column("task_index").to_pylist()
        names = table.column(task_col).to_pylist()
        tasks: list[str | None] = [None] * len(idx)
        for i, name in zip(idx, names):
            if not (0 <= i < len(idx)) or tasks[i] is not None:
                raise DatasetFormatError(f"{path}: task_index values must be 0..{len(idx) - 1}, each once.")
            tasks[i] = name
        return tasks  # type: ignore[return-value]

    def _read_episodes(self) -> dict[str, list]:
        files = sorted(glob.glob(os.path.join(self.root, EPISODES_DIR, "chunk-*", "file-*.parquet")))
        if not files:
            raise DatasetFormatError(f"No episode metadata under {os.path.join(self.root, EPISODES_DIR)}.")
        tables = []
        for path in files:
            try:
                schema = pq.read_schema(path)
                cols = [n for n in schema.names if not n.startswith("stats/")]
                for need in ("episode_index", "length", "dataset_from_index", "dataset_to_index"):
                    if need not in cols:
                        raise DatasetFormatError(f"{path} lacks the episode column {need!r}.")
                tables.append((path, pq.read_table(path, columns=cols)))
            except (pa.ArrowException, OSError) as e:
                raise DatasetFormatError(f"{path} cannot be read as Parquet ({type(e).__name__}: {e}): the episode "
                                         "metadata is truncated or damaged. Copy or regenerate the dataset.") from None
        rows: list[tuple[int, str, dict]] = []
        for path, t in tables:
            for r in t.to_pylist():
                rows.append((int(r["episode_index"]), path, r))
        rows.sort(key=lambda x: x[0])
        if not rows:
            raise DatasetFormatError(f"{self.root} holds no episodes (the episode metadata under "
                                     f"{os.path.join(self.root, EPISODES_DIR)} is empty); record or generate at least "
                                     "one episode.")
        ids = [r[0] for r in rows]
        if ids != list(range(len(ids))):
            raise DatasetFormatError(
                f"{os.path.join(self.root, EPISODES_DIR)}: episode_index values must be 0..{len(ids) - 1} "
                f"each once; got {ids[:20]}{'...' if len(ids) > 20 else ''}.")
        keys = sorted({k for _, _, r in rows for k in r})
        out = {k: [r.get(k) for _, _, r in rows] for k in keys}
        out["_meta_file"] = [p for _, p, _ in rows]
        total = self.info.get("total_episodes")
        if total is not None and int(total) != len(ids):
            raise DatasetFormatError(f"{self.info_path}: total_episodes={total} but the episode metadata "
                                     f"lists {len(ids)} episodes.")
        prev_to = 0
        for e in range(len(ids)):
            lo, hi, n = out["dataset_from_index"][e], out["dataset_to_index"][e], out["length"][e]
            if hi - lo != n or n <= 0 or lo != prev_to:
                raise DatasetFormatError(
                    f"{out['_meta_file'][e]}: episode {e}: dataset_from_index={lo}, dataset_to_index={hi}, "
                    f"length={n}; expected length == to - from > 0 and from == {prev_to} (end of episode "
                    f"{e - 1}).")
            prev_to = hi
        total_frames = self.info.get("total_frames")
        if total_frames is not None and int(total_frames) != prev_to:
            raise DatasetFormatError(f"{self.info_path}: total_frames={total_frames} but the episodes cover "
                                     f"{prev_to} frames.")
        for col in ("data/chunk_index", "data/file_index"):
            if col not in out:
                out[col] = [0] * len(ids)
        return out

    def _resolve_embodiment(self) -> EmbodimentSpec:
        feat = self.info["features"][ACTION_KEY]
        shape = feat.get("shape")
        width = int(shape[0]) if isinstance(shape, (list, tuple)) and len(shape) == 1 else None
        if width is None:
            raise DatasetFormatError(f"{self.info_path}: features.action.shape must be [action_dim]; got {shape!r}.")
        block = self.info.get(ACTPRIOR_KEY) or {}
        robot_type = self.info.get("robot_type")
        try:
            if isinstance(block, dict) and block.get("embodiment"):
                spec = register_embodiment(EmbodimentSpec.from_dict(block["embodiment"]))
            elif robot_type and robot_type in EMBODIMENT_REGISTRY:
                spec = EMBODIMENT_REGISTRY[robot_type]
            else:
                names = flatten_names(feat.get("names"))
                name = embodiment_name_from_robot_type(robot_type) if isinstance(robot_type, str) else ""
                if name and name in EMBODIMENT_REGISTRY:
                    spec = EMBODIMENT_REGISTRY[name]
                elif not name or names is None or len(names) != width:
                    why = ("it has no robot_type" if not name else
                           "features.action.names is missing" if names is None else
                           f"features.action.names has {len(names)} names for shape [{width}]")
                    raise UnknownEmbodimentError(
                        f"{self.info_path}: robot_type {robot_type!r} is not a registered embodiment and the "
                        f"dataset does not describe it ({why}). Add an 'actprior': {{'embodiment': {{...}}}} "
                        "block or one name per action dimension in features.action.names, or register the robot "
                        "with modeling_actprior.register_embodiment(EmbodimentSpec(...)). Known embodiments: "
                        f"{', '.join(sorted(EMBODIMENT_REGISTRY))}."
                    )
                else:
                    spec = register_embodiment(EmbodimentSpec(
                        name=name, action_dim=width, action_names=tuple(names), control_mode="other",
                        fps=float(self.info["fps"]),
                        description=f"Registered from LeRobot dataset {os.path.basename(self.root)} "
                                    f"(robot_type {robot_type!r}).",
                    ))
                    logger.info("Registered embodiment %r (action_dim=%d) from %s", name, width, self.info_path)
        except (ValueError, TypeError) as e:
            if isinstance(e, UnknownEmbodimentError):
                raise
            raise DatasetFormatError(f"{self.info_path}: cannot use this dataset's embodiment: {e}") from None
        if spec.action_dim != width:
            raise DatasetFormatError(
                f"{self.info_path}: embodiment {spec.name!r} has action_dim={spec.action_dim} but "
                f"features.action.shape is [{width}].")
        return spec

    # ------------------------------------------------------------------------------------ properties
    @property
    def fps(self) -> float:
        return float(self.info["fps"])

    @property
    def robot_type(self) -> str | None:
        return self.info.get("robot_type")

    @property
    def features(self) -> dict[str, dict]:
        return self.info["features"]

    @property
    def num_episodes(self) -> int:
        return len(self.episodes["episode_index"])

    @property
    def num_frames(self) -> int:
        return int(self.episodes["dataset_to_index"][-1]) if self.num_episodes else 0

    @property
    def action_dim(self) -> int:
        return int(self.features[ACTION_KEY]["shape"][0])

    @property
    def state_dim(self) -> int:
        ft = self.features.get(STATE_KEY)
        return int(ft["shape"][0]) if ft else 0

    @property
    def camera_keys(self) -> list[str]:
        """Feature keys of all cameras (``observation.images.<cam>``), stored as images or videos."""
        return [k for k, ft in self.features.items() if ft.get("dtype") in ("image", "video")]

    @property
    def image_keys(self) -> list[str]:
        return [k for k, ft in self.features.items() if ft.get("dtype") == "image"]

    @property
    def video_keys(self) -> list[str]:
        return [k for k, ft in self.features.items() if ft.get("dtype") == "video"]

    @property
    def episode_from(self) -> np.ndarray:
        return np.asarray(self.episodes["dataset_from_index"], dtype=np.int64)

    @property
    def episode_to(self) -> np.ndarray:
        return np.asarray(self.episodes["dataset_to_index"], dtype=np.int64)

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.asarray(self.episodes["length"], dtype=np.int64)

    @property
    def success(self) -> list[bool] | None:
        block = self.info.get(ACTPRIOR_KEY) or {}
        s = block.get("success") if isinstance(block, dict) else None
        return [bool(x) for x in s] if s is not None else None

    @property
    def provenance(self) -> dict:
        block = self.info.get(ACTPRIOR_KEY) or {}
        return dict(block.get("generator") or {}) if isinstance(block, dict) else {}

    def episode_task(self, episode_index: int) -> str:
        tasks = self.episodes.get("tasks")
        if tasks is not None and tasks[episode_index]:
            t = tasks[episode_index]
            return t[0] if isinstance(t, (list, tuple)) else str(t)
        return ""

    def data_file(self, episode_index: int) -> str:
        """Absolute path of the data file holding ``episode_index``."""
        return _safe_template(self.root, self.info["data_path"], "data_path", self.info_path,
                              chunk_index=int(self.episodes["data/chunk_index"][episode_index]),
                              file_index=int(self.episodes["data/file_index"][episode_index]))

    def video_location(self, key: str, episode_index: int) -> tuple[str, float, float]:
        """``(file, from_timestamp, to_timestamp)`` of video feature ``key`` for ``episode_index``."""
        cols = [f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
        missing = [c for c in cols if c not in self.episodes]
        if missing or not self.info.get("video_path"):
            raise DatasetFormatError(
                f"{self.root}: {key!r} is stored as video but "
                + (f"the episode metadata lacks {missing}" if missing else "meta/info.json has no video_path")
                + "; a LeRobot v3 dataset locates each episode's frames by them. Re-export the dataset with LeRobot.")
        chunk, file, start, end = (self.episodes[c][episode_index] for c in cols)
        path = _safe_template(self.root, self.info["video_path"], "video_path", self.info_path,
                              video_key=key, chunk_index=int(chunk), file_index=int(file))
        return path, float(start), float(end)

    def data_files(self) -> list[str]:
        """The data files in (chunk, file) order, i.e. in global frame order."""
        pairs = sorted(set(zip((int(c) for c in self.episodes["data/chunk_index"]),
                               (int(f) for f in self.episodes["data/file_index"]))))
        return [_safe_template(self.root, self.info["data_path"], "data_path", self.info_path,
                               chunk_index=c, file_index=f) for c, f in pairs]

    def feature_stats(self, key: str) -> dict[str, np.ndarray]:
        if key not in self.stats:
            raise DatasetFormatError(f"{os.path.join(self.root, STATS_PATH)} has no statistics for {key!r}; expected "
                                     "one entry (mean, std, min, max, ...) per feature used. Recompute the dataset's "
                                     "statistics.")
        return self.stats[key]

    def action_stats(self) -> EmbodimentStats:
        """Action statistics as ``EmbodimentStats`` (for ``ActionNormalizer.add_embodiment``)."""
        st = self.feature_stats(ACTION_KEY)
        try:
            return EmbodimentStats.from_dict({k: v for k, v in st.items() if k in
                                              ("mean", "std", "q01", "q99", "min", "max", "count")})
        except ValueError as e:
            raise DatasetFormatError(f"{os.path.join(self.root, STATS_PATH)}: {ACTION_KEY!r}: {e}") from None

    def __repr__(self) -> str:
        return (f"LeRobotDatasetMeta(root={self.root!r}, embodiment={self.embodiment.name!r}, "
                f"episodes={self.num_episodes}, frames={self.num_frames}, fps={self.fps})")


# ------------------------------------------------------------------------------------------- columns
class ColumnView:
    """Row access to one column of a (memory-mapped) Arrow table without copying the column.

    Numeric columns (scalars or fixed/variable lists of equal width) become per-chunk numpy views;
    ``rows(lo, hi)`` concatenates only the requested rows. Other columns answer ``value(i)``.
    """

    def __init__(self, column: pa.ChunkedArray, width: int | None = None, name: str = "column"):
        self.name = name
        self.type = column.type
        chunks = [c for c in column.chunks if len(c) > 0]
        lengths = np.array([len(c) for c in chunks], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._arrow = chunks
        self.width = width
        self._np: list[np.ndarray] | None = None
        t = column.type
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            if width is None:
                width = t.list_size if pa.types.is_fixed_size_list(t) else None
            views = []
            for c in chunks:
                flat = c.flatten().to_numpy(zero_copy_only=False)
                w = width if width is not None else (len(flat) // len(c) if len(c) else 0)
                if len(flat) != len(c) * w:
                    raise DatasetFormatError(f"Column {name!r}: rows do not all have {w} values.")
                views.append(flat.reshape(len(c), w))
            self.width = width if width is not None else (views[0].shape[1] if views else 0)
            self._np = views
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            self._np = [c.to_numpy(zero_copy_only=False) for c in chunks]
            if width == 1:  # a width-1 vector feature stored as a scalar column
                self._np = [a.reshape(-1, 1) for a in self._np]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)`` as a numpy array (a view when they lie in one chunk)."""
        if self._np is None:
            raise TypeError(f"Column {self.name!r} ({self.type}) is not numeric.")
        if hi <= lo:
            shape = (0,) if self._np and self._np[0].ndim == 1 else (0, self.width or 0)
            return np.zeros(shape, dtype=self._np[0].dtype if self._np else np.float32)
        c0 = int(np.searchsorted(self._starts, lo, side="right")) - 1
        c1 = int(np.searchsorted(self._starts, hi - 1, side="right")) - 1
        if c0 == c1:
            s = self._starts[c0]
            return self._np[c0][lo - s: hi - s]
        parts = []
        for c in range(c0, c1 + 1):
            s = self._starts[c]
            parts.append(self._np[c][max(lo, s) - s: min(hi, self._starts[c + 1]) - s])
        return np.concatenate(parts)

    def chunks(self) -> Iterable[tuple[int, np.ndarray]]:
        """``(first_row, numpy view)`` for each chunk, for vectorized scans."""
        if self._np is None:
            raise TypeError(f"Column {self.name!r} ({self.type}) is not numeric.")
        for s, a in zip(self._starts[:-1], self._np):
            yield int(s), a

    def value(self, i: int) -> Any:
        """Row ``i`` as a Python object (structs such as images become dicts)."""
        c = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._arrow[c][int(i - self._starts[c])].as_py()


# ------------------------------------------------------------------------------------------- dataset
class TrajectoryDataset:
    """A loaded LeRobot dataset: metadata, the frame table (``datasets.Dataset``), per-episode ranges.

    Frames of episode ``e`` are rows ``episode_from[e]:episode_to[e]`` of ``hf_dataset``. Numeric columns
    are read through ``column(name)`` (zero-copy views of the memory-mapped Arrow table).
    """

    def __init__(self, meta: LeRobotDatasetMeta, hf_dataset, tolerance_s: float | None = None):
        from .video import DEFAULT_TOLERANCE_S

        self.meta = meta
        self.hf_dataset = hf_dataset
        # How far a video frame may sit from the time the data gives it (LeRobot's tolerance_s).
        self.tolerance_s = float(DEFAULT_TOLERANCE_S if tolerance_s is None else tolerance_s)
        self._columns: dict[str, ColumnView] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_columns"] = {}  # views are rebuilt lazily (DataLoader workers must not copy columns)
        return state

    @property
    def root(self) -> str:
        return self.meta.root

    @property
    def embodiment(self) -> EmbodimentSpec:
        return self.meta.embodiment

    @property
    def num_episodes(self) -> int:
        return self.meta.num_episodes

    @property
    def num_frames(self) -> int:
        return self.meta.num_frames

    def __len__(self) -> int:
        return self.num_frames

    @property
    def episode_from(self) -> np.ndarray:
        return self.meta.episode_from

    @property
    def episode_to(self) -> np.ndarray:
        return self.meta.episode_to

    @property
    def episode_lengths(self) -> np.ndarray:
        return self.meta.episode_lengths

    def column(self, name: str) -> ColumnView:
        if name not in self._columns:
            if name not in self.hf_dataset.column_names:
                raise KeyError(f"{self.root}: no column {name!r} (columns: {self.hf_dataset.column_names}).")
            width = None
            ft = self.meta.features.get(name)
            if ft and ft.get("dtype") not in ("image", "video") and len(ft.get("shape") or [1]) == 1 \
                    and (list(ft["shape"]) != [1] or name in (ACTION_KEY, STATE_KEY)):
                width = int(ft["shape"][0])  # vectors are (N, width); other shape-[1] features stay (N,)
            self._columns[name] = ColumnView(self.hf_dataset.data.column(name), width, name)
        return self._columns[name]

    def _range(self, episode_index: int) -> tuple[int, int]:
        if not 0 <= episode_index < self.num_episodes:
            raise IndexError(f"Episode {episode_index} out of range (dataset has {self.num_episodes}).")
        return int(self.episode_from[episode_index]), int(self.episode_to[episode_index])

    def actions(self, episode_index: int) -> np.ndarray:
        """Raw actions ``(T, A)`` float32 of one episode (a copy)."""
        lo, hi = self._range(episode_index)
        return np.array(self.column(ACTION_KEY).rows(lo, hi), dtype=np.float32)

    def states(self, episode_index: int) -> np.ndarray:
        """States ``(T, S)`` float32 of one episode (``(T, 0)`` without a state feature)."""
        lo, hi = self._range(episode_index)
        if STATE_KEY not in self.hf_dataset.column_names:
            return np.zeros((hi - lo, 0), np.float32)
        return np.array(self.column(STATE_KEY).rows(lo, hi), dtype=np.float32)

    def task(self, episode_index: int) -> str:
        lo, _ = self._range(episode_index)
        if "task_index" in self.hf_dataset.column_names and self.meta.tasks:
            return self.meta.tasks[int(self.column("task_index").rows(lo, lo + 1)[0])]
        return self.meta.episode_task(episode_index)

    def frame_task(self, row: int) -> str:
        """Instruction of global frame ``row``."""
        if "task_index" in self.hf_dataset.column_names and self.meta.tasks:
            return self.meta.tasks[int(self.column("task_index").rows(row, row + 1)[0])]
        e = int(np.searchsorted(self.episode_to, row, side="right"))
        return self.meta.episode_task(e)

    def image(self, key: str, row: int) -> np.ndarray:
        """Frame ``row`` of image feature ``key`` (``observation.images.<cam>``) as HWC uint8."""
        from PIL import Image

        if self.meta.features.get(key, {}).get("dtype") == "video":
            return self._video_frame(key, row)
        v = self.column(key).value(row)
        if isinstance(v, dict):
            data, path = v.get("bytes"), v.get("path")
        else:
            data, path = v, None
        if data is None:
            if not path:
                raise DatasetFormatError(f"{self.root}: frame {row} of {key!r} has neither bytes nor path.")
            full = path if os.path.isabs(path) else os.path.join(self.root, path)
            with open(full, "rb") as f:
                data = f.read()
        e = int(np.searchsorted(self.episode_to, row, side="right"))
        where = f"{self.root}: {key} of episode {e}, frame {row - int(self.episode_from[e])}"
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.mode not in _8BIT_IMAGE_MODES:
                    raise DatasetFormatError(
                        f"{where} is a {im.mode!r} image; expected 8-bit RGB (or grayscale/palette/RGBA, which are "
                        "converted). Re-encode the frames as 8-bit PNG or JPEG.")
                frame = np.asarray(im.convert("RGB"))
        except OSError as err:  # PIL.UnidentifiedImageError, truncated data
            raise DatasetFormatError(f"{where} can't be decoded as an image ({type(err).__name__}); expected PNG or "
                                     "JPEG bytes. Re-encode that frame.") from None
        expected = _image_hw(self.meta.features.get(key, {}))
        if expected is not None and frame.shape[:2] != expected:
            raise DatasetFormatError(
                f"{where} is {frame.shape[0]}x{frame.shape[1]} pixels (height x width) but meta/info.json declares "
                f"{expected[0]}x{expected[1]} for {key}. Resize the frames or fix the feature's shape.")
        return frame

    def validate_videos(self, keys: Sequence[str] | None = None) -> None:
        """Check the video features ``keys`` (default all) up front: each file an episode points to exists, opens,
        decodes, has the declared frame size and covers the episode's frame times; a ``VideoError`` or
        ``DatasetFormatError`` names the file and episode otherwise."""
        _validate_videos(self, self.meta.video_keys if keys is None else list(keys))

    def _video_frame(self, key: str, row: int) -> np.ndarray:
        """Frame ``row`` of video feature ``key``: the episode's span decoded once (``video.frame_cache``), the frame
        nearest to ``from_timestamp + timestamp`` within ``tolerance_s``."""
        from .video import frame_cache

        e = int(np.searchsorted(self.episode_to, row, side="right"))
        path, start, end = self.meta.video_location(key, e)
        t = start + float(self.column("timestamp").value(row))
        where = f"{key}, episode {e}, frame {row - int(self.episode_from[e])}"
        return frame_cache().frame(path, start, end, t, self.tolerance_s, where)

    def episode(self, episode_index: int, images: bool = False) -> Episode:
        """Episode ``episode_index`` read back (camera frames decoded only if ``images``)."""
        lo, hi = self._range(episode_index)
        imgs = None
        if images and self.meta.camera_keys:
            imgs = {k.removeprefix(IMAGE_KEY_PREFIX):
                    np.stack([self.image(k, r) for r in range(lo, hi)]) for k in self.meta.camera_keys}
        success = self.meta.success
        return Episode(actions=self.actions(episode_index), states=self.states(episode_index),
                       task=self.task(episode_index), images=imgs,
                       success=bool(success[episode_index]) if success is not None else True)

    def __repr__(self) -> str:
        return f"TrajectoryDataset({self.meta!r})"


#: A value more than this many times the dataset's recorded range (stats min..max) outside it is refused.
OUTLIER_SPANS = 100


def _validate_data(ds: TrajectoryDataset) -> None:
    meta = ds.meta
    n = meta.num_frames
    files = meta.data_files()
    hf = ds.hf_dataset
    if len(hf) != n:
        raise DatasetFormatError(f"{meta.root}: the data files ({', '.join(files)}) hold {len(hf)} frames but "
                                 f"the episode metadata lists {n}.")
    for col in ("episode_index", "frame_index", ACTION_KEY):
        if col not in hf.column_names:
            raise DatasetFormatError(f"{files[0]}: no column {col!r}.")
    from_, to = meta.episode_from, meta.episode_to
    lengths = meta.episode_lengths

    def where(row: int) -> tuple[int, int, str]:
        e = int(np.searchsorted(to, row, side="right"))
        return e, int(row - from_[e]), meta.data_file(e)

    ep_col = ds.column("episode_index")
    fi_col = ds.column("frame_index")
    idx_col = ds.column("index") if "index" in hf.column_names else None
    expected_ep = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    expected_fi = np.arange(n, dtype=np.int64) - np.repeat(from_, lengths)
    for start, ep in ep_col.chunks():
        bad = np.flatnonzero(ep != expected_ep[start:start + len(ep)])
        if bad.size:
            row = start + int(bad[0])
            e, f, path = where(row)
            raise DatasetFormatError(
                f"{path}: episode {e}: row {row} (frame {f}) has episode_index={int(ep[bad[0]])}; the episode "
                f"metadata says episode {e} spans rows {from_[e]}..{to[e] - 1} (length {lengths[e]}).")
    for start, fi in fi_col.chunks():
        bad = np.flatnonzero(fi != expected_fi[start:start + len(fi)])
        if bad.size:
            row = start + int(bad[0])
            e, f, path = where(row)
            raise DatasetFormatError(
                f"{path}: episode {e}: frame_index jumps to {int(fi[bad[0]])} where {f} was expected "
                f"(frame_index must run 0..{lengths[e] - 1} without gaps).")
    if idx_col is not None:
        for start, ix in idx_col.chunks():
            bad = np.flatnonzero(ix != np.arange(start, start + len(ix)))
            if bad.size:
                row = start + int(bad[0])
                e, f, path = where(row)
                raise DatasetFormatError(f"{path}: episode {e}, frame {f}: index={int(ix[bad[0]])}, expected "
                                         f"{row} (global frame index).")
    for key in (ACTION_KEY, STATE_KEY):
        if key not in hf.column_names:
            continue
        col = ds.column(key)
        width = int(meta.features[key]["shape"][0])
        if col.width != width:
            raise DatasetFormatError(f"{files[0]}: {key} rows have {col.width} values; info.json says {width}.")
        # Values this far outside the dataset's own recorded range are corrupt, not a rare motion: they would
        # normalize to ~1e3 and beyond and drive training to NaN.
        lo = hi = None
        st = meta.stats.get(key) if isinstance(meta.stats, dict) else None
        if st and "min" in st and "max" in st:
            mn, mx = np.asarray(st["min"], dtype=np.float64), np.asarray(st["max"], dtype=np.float64)
            if mn.shape == (width,) and mx.shape == (width,):
                span = np.maximum(mx - mn, 1e-3)
                lo, hi = mn - OUTLIER_SPANS * span, mx + OUTLIER_SPANS * span
        for start, a in col.chunks():
            finite = np.isfinite(a).all(axis=1)
            if not finite.all():
                r = int(np.flatnonzero(~finite)[0])
                dim = int(np.flatnonzero(~np.isfinite(a[r]))[0])
                e, f, path = where(start + r)
                raise DatasetFormatError(
                    f"{path}: episode {e}, frame {f}: {key} contains NaN or inf (dimension {dim}, value "
                    f"{a[r, dim]}). Clean or drop those frames.")
            if lo is not None:
                out = ((a < lo) | (a > hi)).any(axis=1)
                if out.any():
                    r = int(np.flatnonzero(out)[0])
                    dim = int(np.flatnonzero((a[r] < lo) | (a[r] > hi))[0])
                    e, f, path = where(start + r)
                    raise DatasetFormatError(
                        f"{path}: episode {e}, frame {f}: {key} dimension {dim} is {a[r, dim]:.6g}, more than "
                        f"{OUTLIER_SPANS} times the dataset's range [{mn[dim]:.6g}, {mx[dim]:.6g}] "
                        f"({STATS_PATH}) outside it: a corrupt value. Fix or drop the frame, or recompute the "
                        "statistics if it is real.")
    # Row ranges of each data file must contain the episodes the metadata assigns to it.
    pairs = list(zip(meta.episodes["data/chunk_index"], meta.episodes["data/file_index"]))
    order = {p: i for i, p in enumerate(sorted(set(pairs)))}
    starts = np.zeros(len(order) + 1, dtype=np.int64)
    for i in order.values():
        path = files[i]
        if not os.path.isfile(path):
            raise DatasetFormatError(f"{path} is missing (listed in the episode metadata).")
        starts[i + 1] = pq.ParquetFile(path).metadata.num_rows
    starts = np.cumsum(starts)
    for e, p in enumerate(pairs):
        i = order[p]
        if not (starts[i] <= from_[e] and to[e] <= starts[i + 1]):
            raise DatasetFormatError(
                f"{meta.episodes['_meta_file'][e]}: episode {e} is listed in {files[i]} (rows {from_[e]}.."
                f"{to[e] - 1}) but that file holds global rows {starts[i]}..{starts[i + 1] - 1}.")


def _validate_videos(ds: TrajectoryDataset, keys: Sequence[str]) -> None:
    """Every video file the episodes point to opens and decodes, has the declared frame size, and covers the times
    the data give its episodes' frames (within the tolerance)."""
    meta = ds.meta
    if not keys:
        return
    from .video import probe_video

    ts = ds.column("timestamp")
    for key in keys:
        expected = _image_hw(meta.features[key])
        for e in range(meta.num_episodes):
            path, start, end = meta.video_location(key, e)
            where = f"{key}, episode {e}"
            probe = probe_video(path, where)
            if expected is not None and (probe.height, probe.width) != expected:
                raise DatasetFormatError(f"{path} ({where}) is {probe.height}x{probe.width} pixels but meta/info.json "
                                         f"declares {expected[0]}x{expected[1]} for {key}.")
            lo, hi = int(meta.episode_from[e]), int(meta.episode_to[e])
            first, last = start + float(ts.value(lo)), start + float(ts.value(hi - 1))
            latest = probe.duration_s - 1.0 / probe.fps + ds.tolerance_s
            if start < -ds.tolerance_s or last > latest:
                raise DatasetFormatError(
                    f"{path} ({where}): the episode's frames run from {first:.4f} s to {last:.4f} s in this file "
                    f"(from_timestamp {start:.4f} + frame timestamps) but its last frame is at "
                    f"{probe.duration_s - 1.0 / probe.fps:.4f} s: the file is truncated or the metadata points past "
                    "it. Copy the video again or re-export the dataset.")


def content_fingerprint(files: Sequence[str], block: int = 1 << 20) -> str:
    """A 16-hex-digit BLAKE2 digest of the files' sizes and bytes (about 1 GB/s): what the Arrow cache is keyed by."""
    import hashlib

    digest = hashlib.blake2b(digest_size=8)
    for path in files:
        digest.update(f"{os.path.getsize(path)}:".encode())
        with open(path, "rb") as f:
            while chunk := f.read(block):
                digest.update(chunk)
    return digest.hexdigest()


def load_lerobot_dataset(root: PathLike, validate: bool = True, cache_dir: str | None = None,
                         keep_in_memory: bool = False, tolerance_s: float | None = None) -> TrajectoryDataset:
    """Load a LeRobot v3.0 folder as a ``TrajectoryDataset``.

    The data files are read with ``datasets.load_dataset("parquet", ...)`` (memory-mapped Arrow cache in
    ``cache_dir``, the Hugging Face cache by default). With ``validate`` the data are checked against the
    metadata: episode ranges, frame_index without gaps, finite actions and states. Video cameras are checked by
    ``TrajectoryDataset.validate_videos`` (Stage-2 windows call it for the cameras they read; actions-only use needs no
    video). ``tolerance_s``: how far a video frame may sit from its timestamp (LeRobot's default 1e-4 s).
    """
    import datasets

    meta = LeRobotDatasetMeta(root, require_stats=validate)
    files = meta.data_files()
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DatasetFormatError(f"{missing[0]} is missing (listed in the episode metadata of {meta.root}).")
    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        # The cache is keyed by the files' content, not only their paths and mtimes (which `datasets` uses): a file
        # rewritten with its mtime restored must not be served from the old cache.
        hf = datasets.load_dataset("parquet", name=f"actprior-{content_fingerprint(files)}", data_files=files,
                                   split="train", cache_dir=cache_dir, keep_in_memory=keep_in_memory)
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
    ds = TrajectoryDataset(meta, hf, tolerance_s)
    if validate:
        _validate_data(ds)
        if not all(k in meta.stats[ACTION_KEY] for k in ("q01", "q99")):
            # Older LeRobot stats have no quantiles: measure them from the data.
            a = np.concatenate([np.asarray(v, np.float64) for _, v in ds.column(ACTION_KEY).chunks()])
            for key, q in QUANTILES.items():
                meta.stats[ACTION_KEY].setdefault(key, np.quantile(a, q, axis=0))
            logger.warning("%s: action stats had no quantiles; computed them from the data.",
                           os.path.join(meta.root, STATS_PATH))
    return ds
