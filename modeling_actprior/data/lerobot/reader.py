"""Reading a LeRobot v3.0 dataset: columns, episodes and frames (``TrajectoryDataset``), its validation against the
metadata (data and video files), and ``load_lerobot_dataset``."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ...action_space import (
    EmbodimentSpec,
)
from .layout import ACTION_KEY, IMAGE_KEY_PREFIX, STATE_KEY, STATS_PATH, DatasetFormatError, Episode
from .metadata import _8BIT_IMAGE_MODES, LeRobotDatasetMeta, _image_hw
from .stats import QUANTILES

PathLike = Union[str, os.PathLike]  # noqa: UP007 - a runtime alias

logger = logging.getLogger(__name__)


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


class TrajectoryDataset:
    """A loaded LeRobot dataset: metadata, the frame table (``datasets.Dataset``), per-episode ranges.

    Frames of episode ``e`` are rows ``episode_from[e]:episode_to[e]`` of ``hf_dataset``. Numeric columns
    are read through ``column(name)`` (zero-copy views of the memory-mapped Arrow table).
    """

    def __init__(self, meta: LeRobotDatasetMeta, hf_dataset, tolerance_s: float | None = None):
        from ..video import DEFAULT_TOLERANCE_S

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
        from ..video import frame_cache

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

    def first_mismatch(col: ColumnView, expected: np.ndarray) -> tuple[int, int] | None:
        """``(row, value)`` of the first row of ``col`` that differs from ``expected``, scanned chunk by chunk."""
        for start, values in col.chunks():
            bad = np.flatnonzero(values != expected[start:start + len(values)])
            if bad.size:
                return start + int(bad[0]), int(values[bad[0]])
        return None

    mismatch = first_mismatch(ds.column("episode_index"), np.repeat(np.arange(len(lengths), dtype=np.int64), lengths))
    if mismatch:
        row, value = mismatch
        e, f, path = where(row)
        raise DatasetFormatError(
            f"{path}: episode {e}: row {row} (frame {f}) has episode_index={value}; the episode "
            f"metadata says episode {e} spans rows {from_[e]}..{to[e] - 1} (length {lengths[e]}).")
    mismatch = first_mismatch(ds.column("frame_index"), np.arange(n, dtype=np.int64) - np.repeat(from_, lengths))
    if mismatch:
        row, value = mismatch
        e, f, path = where(row)
        raise DatasetFormatError(
            f"{path}: episode {e}: frame_index jumps to {value} where {f} was expected "
            f"(frame_index must run 0..{lengths[e] - 1} without gaps).")
    mismatch = first_mismatch(ds.column("index"), np.arange(n, dtype=np.int64)) if "index" in hf.column_names else None
    if mismatch:
        row, value = mismatch
        e, f, path = where(row)
        raise DatasetFormatError(f"{path}: episode {e}, frame {f}: index={value}, expected {row} (global frame index).")
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
    from ..video import probe_video

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
