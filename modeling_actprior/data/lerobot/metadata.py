"""A LeRobot v3.0 dataset's metadata (``meta/``): info, tasks, episodes, statistics, file locations, checked
against each other."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Any, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ...action_space import (
    EMBODIMENT_REGISTRY,
    EmbodimentSpec,
    EmbodimentStats,
    UnknownEmbodimentError,
    register_embodiment,
)
from .layout import (
    ACTION_KEY,
    ACTPRIOR_KEY,
    EPISODES_DIR,
    INFO_PATH,
    STATE_KEY,
    STATS_PATH,
    TASKS_PATH,
    DatasetFormatError,
    embodiment_name_from_robot_type,
    flatten_names,
)

PathLike = Union[str, os.PathLike]  # noqa: UP007 - a runtime alias

logger = logging.getLogger(__name__)


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
