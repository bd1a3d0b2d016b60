"""MP4 camera streams as LeRobot v3 stores them: encode, probe, and decode frames by timestamp.

The decoder is PyAV (``av`` on PyPI): its wheels bundle FFmpeg with dav1d (AV1, LeRobot's default codec), SVT-AV1
and x264, so ``pip install`` is the whole installation on Linux, macOS and Windows. torchcodec decodes as well but
loads the system's FFmpeg shared libraries, which a plain ``pip install`` does not provide (there are none on our CI
machines), so it cannot be a default dependency.

Frames are located as LeRobot does: a frame's time in its video file is the episode's ``from_timestamp`` plus the
frame's ``timestamp``; the decoded frame nearest to it is taken, and a frame farther than ``tolerance_s`` (LeRobot's
default ``1e-4`` s) is an error naming the file and episode. Reading is by episode span: one seek, then the span's
frames are decoded in order and kept in a per-process LRU cache (``VideoFrameCache``, a byte budget), so the random
windows of a training epoch decode each frame about once per data-loader worker.
"""

from __future__ import annotations

import fractions
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

#: LeRobot's timestamp tolerance (``LeRobotDataset(tolerance_s=1e-4)``).
DEFAULT_TOLERANCE_S = 1e-4
#: ``codec name in info.json -> (PyAV encoder, encoder options)``; LeRobot encodes with SVT-AV1, GOP 2, CRF 30.
VIDEO_CODECS = {
    "av1": ("libsvtav1", {"g": "2", "crf": "30", "preset": "10"}),
    "h264": ("libx264", {"g": "2", "crf": "23", "preset": "veryfast"}),
}
DEFAULT_VIDEO_CODEC = "av1"
PIX_FMT = "yuv420p"
#: Decoded frames kept per process (bytes); ACTPRIOR_VIDEO_CACHE_MB overrides it.
DEFAULT_CACHE_BYTES = 512 * 1024 * 1024


class VideoError(ValueError):
    """A video file that cannot serve the frames the metadata points to."""


def _av():
    try:
        import av
    except ImportError:  # pragma: no cover - av is a dependency
        raise ImportError("Reading or writing video cameras needs PyAV: pip install av") from None
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration otherwise
    av.logging.set_level(av.logging.ERROR)
    return av


# ------------------------------------------------------------------------------------------ encoding
class VideoEncoder:
    """One MP4 file: frames appended episode after episode, ``close`` finishes it. ``frames_written / fps`` is the
    next frame's time, the ``from_timestamp`` of the next episode."""

    def __init__(self, path: str, fps: float, width: int, height: int, codec: str = DEFAULT_VIDEO_CODEC):
        if codec not in VIDEO_CODECS:
            raise ValueError(f"Unknown video codec {codec!r}; choose from {sorted(VIDEO_CODECS)}.")
        if width % 2 or height % 2:
            raise ValueError(f"Video frames must have even width and height (yuv420p); got {width}x{height}.")
        av = _av()
        encoder, options = VIDEO_CODECS[codec]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path, self.fps, self.codec = path, float(fps), codec
        self._container = av.open(path, "w")
        self._stream = self._container.add_stream(encoder, rate=fractions.Fraction(self.fps).limit_denominator(10000),
                                                  options=dict(options))
        self._stream.width, self._stream.height, self._stream.pix_fmt = int(width), int(height), PIX_FMT
        self.frames_written = 0
        self.bytes_written = 0  # encoded packet bytes (the muxer buffers, so the file's size lags behind)

    def add(self, frames: np.ndarray) -> None:
        av = _av()
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, dtype=np.uint8), format="rgb24")
            vf = vf.reformat(format=PIX_FMT, threads=1)  # single-threaded swscale: fork-safe (see decode_span)
            vf.pts = self.frames_written
            self.frames_written += 1
            for packet in self._stream.encode(vf):
                self.bytes_written += packet.size
                self._container.mux(packet)

    def size_bytes(self) -> int:
        return self.bytes_written

    def close(self) -> None:
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None


def feature_info(width: int, height: int, fps: float, codec: str) -> dict:
    """The ``info`` block LeRobot writes for a video feature in ``meta/info.json``."""
    return {"video.height": int(height), "video.width": int(width), "video.codec": codec, "video.pix_fmt": PIX_FMT,
            "video.is_depth_map": False, "video.fps": float(fps), "video.channels": 3, "has_audio": False}


# ------------------------------------------------------------------------------------------ probing
@dataclass(frozen=True)
class VideoProbe:
    path: str
    codec: str
    width: int
    height: int
    fps: float
    duration_s: float  # the last frame's time plus one frame period


_PROBES: dict[tuple, VideoProbe] = {}


def probe_video(path: str, where: str = "") -> VideoProbe:
    """Open ``path``, check that its video stream can be decoded, and measure its duration from its last frame.
    Cached per (path, size, mtime). Raises ``VideoError`` naming the file (and ``where``, e.g. the episode)."""
    ctx = f" ({where})" if where else ""
    if not os.path.isfile(path):
        raise VideoError(f"{path}{ctx} is missing: the episode metadata points to this video file. Copy the dataset's "
                         "videos/ folder too, or re-record the episode.")
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key in _PROBES:
        return _PROBES[key]
    av = _av()
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"{path}{ctx} holds no video stream.")
            stream = container.streams.video[0]
            name = stream.codec_context.name
            tb = stream.time_base
            first = next(iter(container.decode(stream)), None)  # the codec really decodes here
            if first is None:
                raise VideoError(f"{path}{ctx} has no decodable frame.")
            container.seek(0, stream=stream)
            last = max((p.pts for p in container.demux(stream) if p.pts is not None), default=first.pts)
            rate = float(stream.average_rate or stream.guessed_rate or 0) or 1.0
            probe = VideoProbe(path, name, int(first.width), int(first.height), rate, float(last * tb) + 1.0 / rate)
    except VideoError:
        raise
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}{ctx} cannot be decoded ({type(e).__name__}: {e}): the file is truncated or "
                         "damaged, or its codec is not in PyAV's FFmpeg (it decodes AV1, H.264, HEVC and VP9). "
                         "Copy the file again, or re-encode it with AV1 or H.264.") from None
    _PROBES[key] = probe
    return probe


# ------------------------------------------------------------------------------------------ decoding
def decode_span(path: str, start_s: float, end_s: float, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Every frame of ``path`` with time in ``[start_s - 1/fps, end_s + 1/fps]``, decoded after ONE seek:
    ``(times (N,) float64 seconds, frames (N, H, W, 3) uint8)``."""
    av = _av()
    ctx = f" ({where})" if where else ""
    times, frames = [], []
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            tb = stream.time_base
            period = 1.0 / float(stream.average_rate or stream.guessed_rate or 30)
            container.seek(max(0, int((start_s - period) / tb)), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                t = float(frame.pts * tb)
                if t < start_s - period:
                    continue
                if t > end_s + period:
                    break
                times.append(t)
                # threads=1: a threaded swscale context in a process that later forks (DataLoader workers) leaves
                # the child's first conversion waiting forever on the parent's threads.
                frames.append(frame.to_ndarray(format="rgb24", threads=1))
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}{ctx}: decoding failed ({type(e).__name__}: {e}); the file is truncated or "
                         "damaged.") from None
    if not frames:
        raise VideoError(f"{path}{ctx} has no frame between {start_s:.4f} s and {end_s:.4f} s.")
    return np.asarray(times), np.stack(frames)


def nearest_frames(times: np.ndarray, wanted: np.ndarray, tolerance_s: float, path: str, where: str = "") -> np.ndarray:
    """Index into ``times`` of the frame nearest to each ``wanted`` time; ``VideoError`` beyond ``tolerance_s``."""
    idx = np.clip(np.searchsorted(times, wanted), 1, len(times) - 1) if len(times) > 1 else np.zeros(len(wanted), int)
    if len(times) > 1:
        left_closer = np.abs(wanted - times[idx - 1]) <= np.abs(times[idx] - wanted)
        idx = np.where(left_closer, idx - 1, idx)
    gap = np.abs(times[idx] - wanted)
    if (gap > tolerance_s).any():
        j = int(np.argmax(gap))
        raise VideoError(
            f"{path}{f' ({where})' if where else ''}: no frame within {tolerance_s:g} s of {wanted[j]:.6f} s (the "
            f"nearest is at {times[idx[j]]:.6f} s; the file's frames span {times[0]:.4f}-{times[-1]:.4f} s). The "
            "timestamps in the data or the episode's from_timestamp do not match the video: re-encode it, or check "
            "the dataset's fps.")
    return idx


class VideoFrameCache:
    """Decoded episode spans, least recently used first out, within ``max_bytes``. One per process (data-loader
    workers each get their own after fork); thread-safe."""

    def __init__(self, max_bytes: int | None = None):
        env = os.environ.get("ACTPRIOR_VIDEO_CACHE_MB")
        self.max_bytes = int(max_bytes if max_bytes is not None else float(env) * 2**20 if env else DEFAULT_CACHE_BYTES)
        self._spans: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.decoded_spans = 0

    def span(self, path: str, start_s: float, end_s: float, where: str = "") -> tuple[np.ndarray, np.ndarray]:
        key = (path, round(start_s, 6), round(end_s, 6))
        with self._lock:
            hit = self._spans.get(key)
            if hit is not None:
                self._spans.move_to_end(key)
                return hit
        value = decode_span(path, start_s, end_s, where)
        with self._lock:
            self.decoded_spans += 1
            self._spans[key] = value
            self._bytes += value[1].nbytes
            while self._bytes > self.max_bytes and len(self._spans) > 1:
                _, (_, old) = self._spans.popitem(last=False)
                self._bytes -= old.nbytes
        return value

    def clear(self) -> None:
        """Drop every decoded span (the next read of each decodes again)."""
        with self._lock:
            self._spans.clear()
            self._bytes = 0

    def frame(self, path: str, start_s: float, end_s: float, t: float, tolerance_s: float = DEFAULT_TOLERANCE_S,
              where: str = "") -> np.ndarray:
        """The frame at time ``t`` of ``path``, decoding (once) the span ``[start_s, end_s]`` it belongs to."""
        times, frames = self.span(path, start_s, end_s, where)
        return frames[int(nearest_frames(times, np.array([t]), tolerance_s, path, where)[0])]


_CACHE: VideoFrameCache | None = None
_CACHE_PID: int | None = None


def frame_cache() -> VideoFrameCache:
    """This process's cache (a forked worker starts its own)."""
    global _CACHE, _CACHE_PID
    if _CACHE is None or _CACHE_PID != os.getpid():
        _CACHE, _CACHE_PID = VideoFrameCache(), os.getpid()
    return _CACHE


def write_mp4(frames, path: str, fps: float, codec: str = "h264") -> str:
    """A whole clip (``(H, W, 3)`` uint8 frames) as MP4 (frames cropped to even sizes); returns ``path``."""
    frames = np.asarray(frames, dtype=np.uint8)
    h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    enc = VideoEncoder(path, fps, w, h, codec)
    try:
        enc.add(frames[:, :h, :w])
    finally:
        enc.close()
    return path


__all__ = ["DEFAULT_TOLERANCE_S", "DEFAULT_VIDEO_CODEC", "VIDEO_CODECS", "VideoEncoder", "VideoError",
           "VideoFrameCache", "VideoProbe", "decode_span", "feature_info", "frame_cache", "nearest_frames",
           "probe_video", "write_mp4"]
