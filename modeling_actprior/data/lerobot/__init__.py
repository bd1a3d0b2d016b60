"""LeRobot v3.0 datasets on local disk: writing, reading, validating, split along LeRobot's own seams so that a
change of the upstream format can be diffed file against file:

- ``layout``: file templates, feature keys, default sizes, the ``Episode`` record;
- ``stats``: ``meta/stats.json`` statistics;
- ``writer``: ``LeRobotDatasetWriter`` / ``write_lerobot_dataset`` (atomic), recovery of interrupted writes;
- ``metadata``: ``LeRobotDatasetMeta`` (``meta/``: info, tasks, episodes, file locations);
- ``reader``: ``TrajectoryDataset``, its validation, ``load_lerobot_dataset``.

A dataset folder follows LeRobot's published v3.0 layout, so LeRobot tools read what we write and we
read what LeRobot writes (``benchmarks/lerobot_roundtrip.py`` checks it with LeRobot itself)::

    meta/info.json                               # codebase_version "v3.0", robot_type, fps, features...
    meta/stats.json                              # per feature: min max mean std count q01 q10 q50 q90 q99
    meta/tasks.parquet                           # task string (index "task") -> task_index
    meta/episodes/chunk-000/file-000.parquet     # one row per episode: length, tasks, data file, index range
    data/chunk-000/file-000.parquet              # one row per frame, one row group per episode
    videos/<camera>/chunk-000/file-000.mp4       # cameras stored as video (AV1 or H.264)

``info.json`` carries an extra ``"actprior"`` block (``embodiment``, per-episode ``success``,
``generator`` provenance) that LeRobot ignores.

Writing is atomic: everything goes into a sibling folder ``<root>.tmp-<pid>``, is fsync'ed, and is
renamed onto ``root`` only when complete, so an interrupted generation never leaves a folder whose
metadata disagrees with its data.

Reading registers the dataset's embodiment when the registry does not know its ``robot_type``: from
the ``actprior`` block, or else from LeRobot's own description (``features.action.shape`` and
``features.action.names``, ``fps``). Validation errors name the file, the episode and what was expected.
"""

from .layout import (
    ACTION_KEY,
    ACTPRIOR_KEY,
    CHUNK_FILE_PATTERN,
    CODEBASE_VERSION,
    DATA_PATH,
    DEFAULT_CHUNKS_SIZE,
    DEFAULT_DATA_FILE_SIZE_IN_MB,
    DEFAULT_FEATURES,
    DEFAULT_VIDEO_FILE_SIZE_IN_MB,
    EPISODES_DIR,
    EPISODES_PATH,
    IMAGE_KEY_PREFIX,
    INFO_PATH,
    STATE_KEY,
    STATS_PATH,
    TASKS_PATH,
    VIDEO_PATH,
    DatasetFormatError,
    Episode,
    embodiment_name_from_robot_type,
    flatten_names,
)
from .metadata import LeRobotDatasetMeta
from .reader import ColumnView, TrajectoryDataset, content_fingerprint, load_lerobot_dataset
from .stats import QUANTILES, STAT_KEYS, aggregate_stats, image_stats, vector_stats
from .writer import LeRobotDatasetWriter, check_replaceable, undo_interrupted_writes, write_lerobot_dataset

__all__ = [
    "ACTION_KEY", "ACTPRIOR_KEY", "CHUNK_FILE_PATTERN", "CODEBASE_VERSION", "DATA_PATH", "DEFAULT_CHUNKS_SIZE",
    "DEFAULT_DATA_FILE_SIZE_IN_MB", "DEFAULT_FEATURES", "DEFAULT_VIDEO_FILE_SIZE_IN_MB", "EPISODES_DIR",
    "EPISODES_PATH", "IMAGE_KEY_PREFIX", "INFO_PATH", "QUANTILES", "STATE_KEY", "STATS_PATH", "STAT_KEYS",
    "TASKS_PATH", "VIDEO_PATH", "ColumnView", "DatasetFormatError", "Episode", "LeRobotDatasetMeta",
    "LeRobotDatasetWriter", "TrajectoryDataset", "aggregate_stats", "check_replaceable", "content_fingerprint",
    "embodiment_name_from_robot_type", "flatten_names", "image_stats", "load_lerobot_dataset",
    "undo_interrupted_writes", "vector_stats", "write_lerobot_dataset",
]
