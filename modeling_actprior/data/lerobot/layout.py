"""LeRobot v3.0's on-disk layout: file templates, feature keys, default sizes, the episode record, and the
format error."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

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
# Columns every LeRobot frame carries, with LeRobot's dtypes.
DEFAULT_FEATURES: dict[str, dict] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}


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


def _fps_value(fps: float):
    fps = float(fps)
    return int(fps) if fps.is_integer() else fps


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
