"""Writing a LeRobot v3.0 dataset, all or nothing: episodes into a temporary sibling folder (data parquet, MP4 or
image cameras, metadata, statistics), fsynced, then renamed onto the dataset's root; and the recovery of an
interrupted write."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ...action_space import (
    EmbodimentSpec,
)
from ...training.atomic_io import fsync_dir, fsync_tree
from .layout import (
    ACTION_KEY,
    ACTPRIOR_KEY,
    CODEBASE_VERSION,
    DATA_PATH,
    DEFAULT_CHUNKS_SIZE,
    DEFAULT_DATA_FILE_SIZE_IN_MB,
    DEFAULT_FEATURES,
    DEFAULT_VIDEO_FILE_SIZE_IN_MB,
    EPISODES_PATH,
    IMAGE_KEY_PREFIX,
    INFO_PATH,
    STATE_KEY,
    STATS_PATH,
    TASKS_PATH,
    VIDEO_PATH,
    DatasetFormatError,
    Episode,
    _fps_value,
)
from .stats import STAT_KEYS, aggregate_stats, image_stats, vector_stats

PathLike = Union[str, os.PathLike]  # noqa: UP007 - a runtime alias

logger = logging.getLogger(__name__)


def _write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=4)


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
        from ..video import VIDEO_CODECS

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
                from ..video import feature_info

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
        from ..video import VideoEncoder

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
