"""LeRobot itself reads the LeRobot v3.0 datasets we write, video cameras included.

What it checks. Our writer (``write_lerobot_dataset``) writes small datasets whose every value is known: three
episodes (20, 45 and 60 frames at 30 fps, two tasks), a 9-D state, 7-D ``panda`` actions, and two cameras of
different sizes (96x128 and 64x64: a height/width swap would show) stored as MP4 the way ``lerobot-record`` stores
them. The frames are smooth moving patterns (what a camera films; noise would measure the codec, not the reader),
which change by several levels per pixel from one frame to the next, so a frame off by one cannot pass for the right
one. Cases:

* ``av1``: AV1 (SVT-AV1), LeRobot's default codec, one video file per camera;
* ``h264``: H.264 (x264), one video file per camera;
* ``av1-rollover``: AV1 with tiny ``video_files_size_in_mb`` and ``data_files_size_in_mb``, so that each camera's
  episodes are spread over several MP4 files and the frames over several data files.

Each dataset is then opened with LeRobot's own ``LeRobotDataset(repo_id, root=..., video_backend=...)`` (offline,
``HF_HUB_OFFLINE=1``) and checked: episode and frame counts; ``meta.info`` (codebase version, fps, every feature's
dtype, shape, names and video info); ``meta.episodes`` (lengths, index ranges, tasks, video files that exist);
``meta.stats``; every frame's action, state, timestamp, indices and task equal to what was written; every camera
frame LeRobot decodes against the frame we encoded (mean and max absolute error on the uint8 scale, PSNR, and that
it is the right frame); ``delta_timestamps`` windows across episode boundaries (clamping and ``*_is_pad``); a batch
through a torch ``DataLoader``. The same frames decoded by our reader (``load_lerobot_dataset``, PyAV) are compared
with LeRobot's.

Thresholds (uint8 scale, per camera and case; LeRobot returns float CHW in [0, 1], read back as ``round(255 x)``):
mean absolute error < 3 and PSNR > 35 dB against the frames we encoded, every single frame above 30 dB, and every
frame nearer to its own source frame than to any other frame of its episode. Measured here: mean 1.6-2.2 levels, of
which about 1.3 is the RGB -> yuv420p -> RGB conversion alone (reported beside it), and 39-42 dB. A frame from the
wrong time is caught three ways: a one-frame shift of these patterns costs 5.7 levels and 31.6 dB, and the identity
check names it; a wrong colour conversion or a transposed or resized frame lands far outside. (30 dB, the usual
"good video" mark, would let a one-frame shift through.) Ours against LeRobot's decoding: mean absolute difference
< 1 and PSNR > 40 dB, as both decode with FFmpeg and may differ only in the library build and the YUV-to-RGB step.

The script runs in two Pythons. LeRobot 0.4.4 (the last release for Python 3.11) pins ``huggingface-hub<0.36`` and
``datasets<5``, while our package needs ``transformers>=5`` (which needs ``huggingface-hub>=2.4``), so the two cannot
share one environment: the script runs in LeRobot's venv and writes the datasets, and decodes them with our reader,
in a subprocess of the project's own Python (``--actprior-python``, default ``.venv/bin/python`` of this repository;
``PYTHONPATH`` is set to the repository for it).

Setup of the LeRobot venv (x86_64, Python 3.11; the torch/torchvision pair below is the one that imports together
here: PyPI's torchvision fails beside the local CPU torch 2.13.0 wheel, and LeRobot's ``pyav`` backend needs
``torchvision.io.VideoReader``, which torchvision 0.29 no longer has, so decoding goes through torchcodec, LeRobot's
default backend, which loads the system's FFmpeg libraries)::

    apt-get update && apt-get install -y --no-install-recommends ffmpeg      # FFmpeg 5.1 libs for torchcodec
    python3.11 -m venv /tmp/lerobot-venv
    /tmp/lerobot-venv/bin/pip install --no-deps lerobot==0.4.4
    /tmp/lerobot-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/lerobot-venv/bin/pip install --no-deps torchcodec==0.17.0
    /tmp/lerobot-venv/bin/pip install "datasets>=4.0.0,<5.0.0" "huggingface-hub>=0.34.2,<0.36.0" \
        "av>=15.0.0,<16.0.0" "jsonlines>=4.0.0,<5.0.0" "packaging>=24.2,<26.0" "deepdiff>=7.0.1,<9.0.0" \
        "termcolor>=2.4.0,<4.0.0" "imageio[ffmpeg]>=2.34.0,<3.0.0" "draccus==0.10.0" "einops>=0.8.0,<0.9.0" \
        "setuptools>=71,<81" "accelerate>=1.10.0,<2.0.0"

(torch, torchvision and torchcodec are newer than LeRobot 0.4.4 declares; the report lists every such mismatch.)
Run (exit status 0 when every check passes, 1 when one fails, 2 when the setup is incomplete)::

    /tmp/lerobot-venv/bin/python benchmarks/lerobot_roundtrip.py --out benchmarks/results/lerobot_roundtrip.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "lerobot_roundtrip.json"
DEFAULT_ACTPRIOR_PYTHON = ROOT / ".venv" / "bin" / "python"

FPS = 30
LENGTHS = (20, 45, 60)
TASKS = ("pick up the red block", "open the top drawer")
CAMERAS = {"front": (96, 128), "wrist": (64, 64)}  # name -> (height, width), both even (yuv420p)
STATE_DIM = 9
EMBODIMENT = "panda"
IMAGE_PREFIX = "observation.images."
CASES = {
    "av1": {"video_codec": "av1"},
    "h264": {"video_codec": "h264"},
    "av1-rollover": {"video_codec": "av1", "video_files_size_in_mb": 0.001, "data_files_size_in_mb": 0.001},
}

MEAN_ABS_MAX = 3.0  # against the frames we encoded, uint8 levels
PSNR_MIN_DB = 35.0  # a one-frame shift of the patterns scores about 31.6 dB
FRAME_PSNR_MIN_DB = 30.0  # every single frame
OURS_MEAN_ABS_MAX = 1.0  # our decoding against LeRobot's
OURS_PSNR_MIN_DB = 40.0
DELTAS = {"camera": (-2, -1, 0), "action": (0, 1, 2, 3)}  # in frames, for the delta_timestamps check


# ------------------------------------------------------------------------------------------ known content
def camera_frames(camera: int, episode: int, length: int, height: int, width: int) -> np.ndarray:
    """``(length, height, width, 3)`` uint8: a drifting luminance wave, a slow colour tint and a soft moving blob,
    different per camera and episode (camera-like: detail in luminance, smooth colour). Consecutive frames differ by
    about 6 levels on average."""
    t = np.arange(length, dtype=np.float64)[:, None, None]
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = 0.37 * episode + 1.1 * camera
    luma = 128 + 60 * np.sin(2 * np.pi * (x / width + t / 30 + phase)) * np.cos(np.pi * (y / height - t / 53 + phase))
    cx = width * (0.5 + 0.3 * np.sin(2 * np.pi * t / 47 + phase))
    cy = height * (0.5 + 0.3 * np.cos(2 * np.pi * t / 61 + phase))
    blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * (min(height, width) / 6) ** 2))
    tint = 30 * np.sin(np.pi * (x + y) / (width + height) + phase)
    rgb = np.stack([luma + tint + 50 * blob, luma + 20 * blob, luma - tint - 40 * blob], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def episode_arrays(action_dim: int) -> list[dict]:
    rng = np.random.default_rng(7)
    out = []
    for e, length in enumerate(LENGTHS):
        actions = np.cumsum(rng.normal(scale=0.05, size=(length, action_dim)), axis=0).astype(np.float32)
        states = rng.normal(size=(length, STATE_DIM)).astype(np.float32)
        images = {cam: camera_frames(c, e, length, h, w) for c, (cam, (h, w)) in enumerate(CAMERAS.items())}
        out.append({"actions": actions, "states": states, "task": TASKS[e % len(TASKS)], "images": images})
    return out


# ------------------------------------------------------------------------------------------ our side
def write_role(workdir: Path, cases: list[str]) -> None:
    """Run in the project's Python: write each case with our writer, read it back with our reader, and leave
    ``<case>/arrays.npz`` (what was written, and our decoding) and ``written.json`` in ``workdir``."""
    import av
    import datasets
    import pyarrow
    import torch

    import modeling_actprior
    from modeling_actprior.action_space import get_embodiment
    from modeling_actprior.data import Episode, load_lerobot_dataset, write_lerobot_dataset

    spec = get_embodiment(EMBODIMENT)
    eps = episode_arrays(spec.action_dim)
    written = {"python": sys.version.split()[0], "executable": sys.executable,
               "versions": {"actprior": modeling_actprior.__version__, "numpy": np.__version__, "av": av.__version__,
                            "pyarrow": pyarrow.__version__, "datasets": datasets.__version__,
                            "torch": torch.__version__},
               "action_names": list(spec.action_names), "cases": {}}
    for case in cases:
        root = workdir / case / "dataset"
        t0 = time.perf_counter()
        write_lerobot_dataset(str(root), [Episode(actions=ep["actions"], states=ep["states"], task=ep["task"],
                                                  images=ep["images"]) for ep in eps],
                              spec, fps=FPS, camera_names=tuple(CAMERAS), **CASES[case])
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = load_lerobot_dataset(str(root), cache_dir=str(workdir / "actprior-hf-cache"))
        ds.validate_videos()
        back = [ds.episode(e, images=True) for e in range(ds.num_episodes)]
        read_s = time.perf_counter() - t0
        arrays = {"actions": np.concatenate([ep["actions"] for ep in eps]),
                  "states": np.concatenate([ep["states"] for ep in eps]),
                  "ours.actions": np.concatenate([b.actions for b in back]),
                  "ours.states": np.concatenate([b.states for b in back])}
        for cam in CAMERAS:
            arrays[f"truth.{cam}"] = np.concatenate([ep["images"][cam] for ep in eps])
            arrays[f"ours.{cam}"] = np.concatenate([b.images[cam] for b in back])
        np.savez(workdir / case / "arrays.npz", **arrays)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        written["cases"][case] = {"root": str(root), "settings": CASES[case], "write_s": round(write_s, 3),
                                  "our_read_s": round(read_s, 3), "files": files,
                                  "our_readback_tasks": [b.task for b in back]}
    (workdir / "written.json").write_text(json.dumps(written, indent=2))


# ------------------------------------------------------------------------------------------ LeRobot's side
class Checks:
    """Named pass/fail results with their figures."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, name: str, ok: bool, detail: str = "", **figures) -> bool:
        self.items.append({"check": name, "ok": bool(ok), "detail": detail, **figures})
        return bool(ok)

    def fail_with(self, name: str, exc: BaseException) -> None:
        """A LeRobot call that raised: the error, where in LeRobot it raised, and the traceback."""
        frames = traceback.extract_tb(exc.__traceback__)
        inside = [f for f in frames if f"{os.sep}lerobot{os.sep}" in f.filename]
        where = f"{inside[-1].filename}:{inside[-1].lineno} ({inside[-1].name})" if inside else ""
        self.add(name, False, f"{type(exc).__name__}: {exc}", raised_in=where,
                 traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))

    @property
    def ok(self) -> bool:
        return all(i["ok"] for i in self.items)


def to_uint8_hwc(x) -> np.ndarray:
    """LeRobot's float CHW (or ...CHW) frames in [0, 1] as uint8 HWC."""
    a = x.detach().cpu().numpy()
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8).transpose(*range(a.ndim - 3), -2, -1, -3)


def psnr(mse: float) -> float:
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def compare_frames(got: np.ndarray, want: np.ndarray) -> dict:
    d = got.astype(np.float64) - want.astype(np.float64)
    per_frame = (d**2).reshape(len(d), -1).mean(1)
    return {"mean_abs": round(float(np.abs(d).mean()), 4), "max_abs": int(np.abs(d).max()),
            "psnr_db": round(psnr(float(per_frame.mean())), 2),
            "worst_frame_psnr_db": round(psnr(float(per_frame.max())), 2),
            "identical_frames": int((per_frame == 0).sum())}


def yuv420p_floor(frames: np.ndarray) -> float:
    """Mean absolute error of converting ``frames`` to the videos' pixel format (yuv420p) and back, with no codec:
    the part of the error that no decoder removes."""
    import av

    back = np.stack([av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p").to_ndarray(format="rgb24")
                     for f in frames])
    return round(float(np.abs(back.astype(np.int16) - frames).mean()), 4)


def misidentified(got: np.ndarray, truth: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list[int]:
    """Global indices of decoded frames that are nearer to another source frame of their episode than to their own."""
    bad = []
    for lo, n in zip(starts, lengths):
        g = got[lo:lo + n].reshape(n, -1).astype(np.float32)
        t = truth[lo:lo + n].reshape(n, -1).astype(np.float32)
        dist = (g**2).sum(1)[:, None] - 2 * g @ t.T + (t**2).sum(1)[None, :]
        bad += [int(lo + i) for i in np.flatnonzero(dist.argmin(1) != np.arange(n))]
    return bad


def lerobot_versions() -> tuple[dict, list[str]]:
    """Installed versions of what LeRobot's dataset code runs on, and LeRobot's requirements that they break."""
    from importlib import metadata

    from packaging.requirements import Requirement

    names = ("lerobot", "torch", "torchvision", "torchcodec", "av", "datasets", "huggingface-hub", "pyarrow",
             "pandas", "numpy")
    versions = {}
    for n in names:
        try:
            versions[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            versions[n] = None
    mismatches = []
    for text in metadata.requires("lerobot") or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            continue  # LeRobot's recording, training and hardware dependencies: the dataset code needs none of them
        if not req.specifier.contains(have, prereleases=True):
            mismatches.append(f"{req.name} {have} (lerobot {versions['lerobot']} asks {req.specifier})")
    return versions, mismatches


def probe_backends(video: Path) -> dict:
    """Whether each of LeRobot's decoding backends decodes one frame of ``video`` here."""
    from lerobot.datasets.video_utils import decode_video_frames

    out = {}
    for backend in ("torchcodec", "pyav"):
        try:
            decode_video_frames(video, [0.0], 1e-4, backend)
            out[backend] = "ok"
        except Exception as e:  # noqa: BLE001 - reported, not raised
            out[backend] = f"unavailable: {type(e).__name__}: {e}"
    return out


def check_case(case: str, root: Path, arrays: dict, written: dict, backend: str) -> Checks:
    import torch
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    checks = Checks()
    settings = CASES[case]
    lengths = np.array(LENGTHS)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    n = int(lengths.sum())
    ep_of = np.repeat(np.arange(len(lengths)), lengths)
    frame_of = np.arange(n) - np.repeat(starts, lengths)
    cam_keys = [IMAGE_PREFIX + c for c in CAMERAS]
    repo_id = f"actprior/roundtrip-{case}"

    t0 = time.perf_counter()
    try:
        ds = LeRobotDataset(repo_id, root=root, video_backend=backend)
    except Exception as e:  # noqa: BLE001 - what LeRobot rejects is the finding
        checks.fail_with("load: LeRobotDataset(repo_id, root=...)", e)
        return checks
    checks.add("load: LeRobotDataset(repo_id, root=...)", True, f"{ds.num_episodes} episodes, {ds.num_frames} frames",
               seconds=round(time.perf_counter() - t0, 3))
    meta = ds.meta

    # ---- counts
    counts = {"num_episodes": ds.num_episodes, "num_frames": ds.num_frames, "len": len(ds),
              "total_tasks": meta.total_tasks, "hf_rows": len(ds.hf_dataset)}
    want = {"num_episodes": len(lengths), "num_frames": n, "len": n, "total_tasks": len(TASKS), "hf_rows": n}
    checks.add("counts", counts == want, "" if counts == want else f"got {counts}, expected {want}", **counts)

    # ---- meta.info
    info, problems = meta.info, []
    if info.get("codebase_version") != "v3.0":
        problems.append(f"codebase_version {info.get('codebase_version')!r}")
    if meta.fps != FPS:
        problems.append(f"fps {meta.fps!r}")
    feats = meta.features
    expect = {"action": ("float32", (len(written["action_names"]),)), "observation.state": ("float32", (STATE_DIM,)),
              "timestamp": ("float32", (1,)), "frame_index": ("int64", (1,)), "episode_index": ("int64", (1,)),
              "index": ("int64", (1,)), "task_index": ("int64", (1,))}
    for cam, (h, w) in CAMERAS.items():
        expect[IMAGE_PREFIX + cam] = ("video", (h, w, 3))
    if set(feats) != set(expect):
        problems.append(f"features {sorted(feats)} != {sorted(expect)}")
    for key, (dtype, shape) in expect.items():
        ft = feats.get(key, {})
        if ft.get("dtype") != dtype or tuple(ft.get("shape", ())) != shape:
            problems.append(f"{key}: dtype {ft.get('dtype')!r} shape {ft.get('shape')!r}, expected {dtype} {shape}")
    if feats.get("action", {}).get("names") != written["action_names"]:
        problems.append(f"action names {feats.get('action', {}).get('names')!r}")
    for cam, (h, w) in CAMERAS.items():
        ft = feats.get(IMAGE_PREFIX + cam, {})
        vinfo = ft.get("info") or {}
        if ft.get("names") != ["height", "width", "channels"]:
            problems.append(f"{IMAGE_PREFIX}{cam} names {ft.get('names')!r}")
        got = {k: vinfo.get(k) for k in ("video.codec", "video.height", "video.width", "video.fps", "video.pix_fmt")}
        if got != {"video.codec": settings["video_codec"], "video.height": h, "video.width": w, "video.fps": FPS,
                   "video.pix_fmt": "yuv420p"}:
            problems.append(f"{IMAGE_PREFIX}{cam} info {got}")
    if meta.video_keys != cam_keys or meta.camera_keys != cam_keys or meta.image_keys != []:
        problems.append(f"video_keys {meta.video_keys}, camera_keys {meta.camera_keys}, image_keys {meta.image_keys}")
    checks.add("meta.info: version, fps, features", not problems, "; ".join(problems))

    # ---- meta.episodes, tasks, video files as LeRobot resolves them
    problems, files = [], {k: set() for k in cam_keys}
    tasks = [meta.tasks.iloc[i].name for i in range(len(meta.tasks))]
    if sorted(tasks) != sorted(TASKS):
        problems.append(f"tasks {tasks}")
    for e in range(len(lengths)):
        ep = meta.episodes[e]
        got = (ep["episode_index"], ep["length"], ep["dataset_from_index"], ep["dataset_to_index"], list(ep["tasks"]))
        exp = (e, int(lengths[e]), int(starts[e]), int(starts[e] + lengths[e]), [TASKS[e % len(TASKS)]])
        if got != exp:
            problems.append(f"episode {e}: {got} != {exp}")
        for key in cam_keys:
            path = root / meta.get_video_file_path(e, key)
            files[key].add(str(path.relative_to(root)))
            if not path.is_file():
                problems.append(f"episode {e}: {key} -> {path} missing")
    data_files = sorted({str(meta.get_data_file_path(e)) for e in range(len(lengths))})
    per_cam = {k: len(v) for k, v in files.items()}
    if "video_files_size_in_mb" in settings and min(per_cam.values()) < 2:
        problems.append(f"expected several video files per camera, LeRobot resolves {per_cam}")
    checks.add("meta.episodes: lengths, ranges, tasks, video files", not problems, "; ".join(problems),
               video_files_per_camera=per_cam, data_files=data_files)

    # ---- meta.stats
    problems = []
    stats = meta.stats or {}
    for key, values in (("action", arrays["actions"]), ("observation.state", arrays["states"])):
        for stat, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max)):
            got = np.asarray(stats.get(key, {}).get(stat, np.nan), dtype=np.float64)
            if got.shape != (values.shape[1],) or not np.allclose(got, fn(values.astype(np.float64), 0), atol=1e-5):
                problems.append(f"{key}.{stat}")
    for key in cam_keys:
        shapes = {s: np.asarray(stats.get(key, {}).get(s)).shape for s in ("mean", "std", "min", "max")}
        if any(v != (3, 1, 1) for v in shapes.values()):
            problems.append(f"{key} stats shapes {shapes}")
    checks.add("meta.stats", not problems, "; ".join(problems))

    # ---- every frame through ds[i]
    t0 = time.perf_counter()
    decoded = {k: np.zeros((n, h, w, 3), np.uint8) for k, (h, w) in zip(cam_keys, CAMERAS.values())}
    mismatch: dict[str, list[int]] = {}
    tensor_problems: list[str] = []
    try:
        for i in range(n):
            item = ds[i]
            e = int(ep_of[i])
            scalars = {"episode_index": e, "frame_index": int(frame_of[i]), "index": i,
                       "task_index": TASKS.index(TASKS[e % len(TASKS)])}
            for key, value in scalars.items():
                if int(item[key].item()) != value:
                    mismatch.setdefault(key, []).append(i)
            if float(item["timestamp"].item()) != float(np.float32(frame_of[i] / FPS)):
                mismatch.setdefault("timestamp", []).append(i)
            if item["task"] != TASKS[e % len(TASKS)]:
                mismatch.setdefault("task", []).append(i)
            for key, want_row in (("action", arrays["actions"][i]), ("observation.state", arrays["states"][i])):
                got_row = item[key].numpy()
                if got_row.dtype != np.float32 or not np.array_equal(got_row, want_row):
                    mismatch.setdefault(key, []).append(i)
            for key, (h, w) in zip(cam_keys, CAMERAS.values()):
                x = item[key]
                if x.dtype != torch.float32 or tuple(x.shape) != (3, h, w) or x.min() < 0 or x.max() > 1:
                    tensor_problems.append(f"frame {i} {key}: {x.dtype} {tuple(x.shape)} [{x.min():.3f}, "
                                           f"{x.max():.3f}]")
                    continue
                decoded[key][i] = to_uint8_hwc(x)
    except Exception as e:  # noqa: BLE001
        checks.fail_with(f"ds[{i}]", e)
        return checks
    read_s = time.perf_counter() - t0
    detail = "; ".join(f"{k}: {len(v)} frames differ (first {v[0]})" for k, v in mismatch.items())
    checks.add("frames: action, state, timestamp, indices, task equal to what was written", not mismatch, detail,
               frames=n, seconds=round(read_s, 3))
    checks.add("frames: camera tensors float32 CHW in [0, 1]", not tensor_problems, "; ".join(tensor_problems[:3]))

    # ---- camera frames: LeRobot's decoding vs what we encoded, and vs our decoding
    for key, cam in zip(cam_keys, CAMERAS):
        fig = compare_frames(decoded[key], arrays[f"truth.{cam}"])
        wrong = misidentified(decoded[key], arrays[f"truth.{cam}"], starts, lengths)
        ok = (fig["mean_abs"] < MEAN_ABS_MAX and fig["psnr_db"] > PSNR_MIN_DB
              and fig["worst_frame_psnr_db"] > FRAME_PSNR_MIN_DB and not wrong)
        checks.add(f"video {key}: LeRobot decoded vs encoded", ok,
                   f"{len(wrong)} frames nearer another source frame (first {wrong[:5]})" if wrong else "",
                   misidentified_frames=len(wrong), yuv420p_floor_mean_abs=yuv420p_floor(arrays[f"truth.{cam}"]),
                   **fig)
        fig = compare_frames(decoded[key], arrays[f"ours.{cam}"])
        ok = fig["mean_abs"] < OURS_MEAN_ABS_MAX and fig["psnr_db"] > OURS_PSNR_MIN_DB
        checks.add(f"video {key}: LeRobot decoded vs our reader", ok, **fig)
    ours_ok = (np.array_equal(arrays["ours.actions"], arrays["actions"])
               and np.array_equal(arrays["ours.states"], arrays["states"]))
    checks.add("our reader: actions and states equal to what was written", ours_ok)

    # ---- delta_timestamps windows (history of frames, chunk of actions), clamped at episode edges
    deltas = {key: [d / FPS for d in DELTAS["camera"]] for key in cam_keys}
    deltas["action"] = [d / FPS for d in DELTAS["action"]]
    problems = []
    samples = sorted({int(i) for lo, ln in zip(starts, lengths) for i in (lo, lo + 1, lo + ln // 2, lo + ln - 1)})
    try:
        dds = LeRobotDataset(repo_id, root=root, video_backend=backend, delta_timestamps=deltas)
        for i in samples:
            item = dds[i]
            lo, hi = int(starts[ep_of[i]]), int(starts[ep_of[i]] + lengths[ep_of[i]])
            for key, steps in [(k, DELTAS["camera"]) for k in cam_keys] + [("action", DELTAS["action"])]:
                want_idx = [min(max(i + d, lo), hi - 1) for d in steps]
                want_pad = [not lo <= i + d < hi for d in steps]
                if item[f"{key}_is_pad"].tolist() != want_pad:
                    problems.append(f"frame {i} {key}_is_pad {item[f'{key}_is_pad'].tolist()} != {want_pad}")
                if key == "action":
                    if not np.array_equal(item[key].numpy(), arrays["actions"][want_idx]):
                        problems.append(f"frame {i}: action chunk differs")
                    continue
                got = to_uint8_hwc(item[key])
                truth = arrays[f"truth.{key.removeprefix(IMAGE_PREFIX)}"]
                for j, t in zip(got, want_idx):
                    candidates = truth[lo:hi].astype(np.float32)
                    nearest = lo + int(((candidates - j.astype(np.float32)) ** 2).reshape(hi - lo, -1).sum(1).argmin())
                    if nearest != t:
                        problems.append(f"frame {i} {key}: got source frame {nearest}, expected {t}")
    except Exception as e:  # noqa: BLE001
        checks.fail_with("delta_timestamps windows", e)
    else:
        checks.add("delta_timestamps windows: frames, actions, *_is_pad", not problems, "; ".join(problems[:5]),
                   samples=len(samples), deltas_frames=DELTAS)

    # ---- one batch through a torch DataLoader (collation of tensors and task strings)
    try:
        batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False, num_workers=0)))
        ok = (tuple(batch[cam_keys[0]].shape) == (8, 3, *CAMERAS[next(iter(CAMERAS))])
              and batch["task"][0] == TASKS[0] and np.array_equal(batch["action"].numpy(), arrays["actions"][:8]))
        shapes = {k: tuple(v.shape) for k, v in batch.items() if hasattr(v, "shape")}
        checks.add("DataLoader batch", ok, "" if ok else f"shapes {shapes}")
    except Exception as e:  # noqa: BLE001
        checks.fail_with("DataLoader batch", e)
    return checks


def print_case(case: str, checks: Checks) -> None:
    print(f"\n[{case}] {'PASS' if checks.ok else 'FAIL'}")
    for c in checks.items:
        figures = {k: v for k, v in c.items() if k not in ("check", "ok", "detail", "traceback", "raised_in")}
        line = f"  {'ok  ' if c['ok'] else 'FAIL'} {c['check']}"
        if "psnr_db" in figures:
            line += (f": mean |err| {figures['mean_abs']:.3f}, max {figures['max_abs']}, PSNR {figures['psnr_db']:.2f} "
                     f"dB (worst frame {figures['worst_frame_psnr_db']:.2f} dB), identical frames "
                     f"{figures['identical_frames']}")
            if "misidentified_frames" in figures:
                line += (f", wrong frames {figures['misidentified_frames']} (yuv420p alone: mean |err| "
                         f"{figures['yuv420p_floor_mean_abs']:.3f})")
        elif figures:
            line += ": " + ", ".join(f"{k}={v}" for k, v in figures.items())
        if c["detail"]:
            line += f" -- {c['detail']}"
        print(line)
        if c.get("raised_in"):
            print(f"       raised in {c['raised_in']}")
        if c.get("traceback"):
            print("       " + c["traceback"].rstrip().replace("\n", "\n       "))


def git_state() -> dict:
    """The commit of the code under test, and the files of our package that differ from it (the run used those)."""
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, check=True).stdout
        commit = run("rev-parse", "HEAD").strip()
        changed = [line[3:] for line in run("status", "--porcelain", "--", "modeling_actprior").splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": commit, "uncommitted_in_modeling_actprior": changed}


def lerobot_role(args) -> int:
    cases = args.cases
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lerobot-roundtrip-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # Offline, with caches inside the work folder: nothing stale from an earlier run is read.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HOME"] = str(workdir / "hf-home")
    os.environ["HF_DATASETS_CACHE"] = str(workdir / "hf-home" / "datasets")
    try:
        import lerobot  # noqa: F401
        from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: F401
    except ImportError as e:
        print(f"LeRobot's dataset code does not import in {sys.executable} ({type(e).__name__}: {e}); set up its "
              "venv as this script's docstring says.", file=sys.stderr)
        return 2
    versions, mismatches = lerobot_versions()
    backend = args.backend or ("torchcodec" if versions["torchcodec"] else "pyav")

    python = args.actprior_python or (str(DEFAULT_ACTPRIOR_PYTHON) if DEFAULT_ACTPRIOR_PYTHON.exists()
                                      else sys.executable)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for var in ("HF_HOME", "HF_DATASETS_CACHE"):
        env.pop(var)
    t0 = time.perf_counter()
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--role", "write", "--workdir", str(workdir),
                           "--cases", *cases], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"Writing the datasets with {python} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}",
              file=sys.stderr)
        return 2
    written = json.loads((workdir / "written.json").read_text())
    source = git_state()
    print(f"Wrote {len(cases)} datasets with our writer in {time.perf_counter() - t0:.1f} s ({python}; actprior "
          f"{written['versions']['actprior']}, PyAV {written['versions']['av']}) under {workdir}")
    if source:
        changed = source["uncommitted_in_modeling_actprior"]
        print(f"Code under test: commit {source['commit'][:12]}"
              + (f" plus uncommitted changes to {len(changed)} files of modeling_actprior (listed in the JSON)"
                 if changed else ""))
    first_video = next(Path(written["cases"][cases[0]]["root"]).glob("videos/*/chunk-*/file-*.mp4"))
    backends = probe_backends(first_video)
    ffmpeg = None
    if backend == "torchcodec":
        from torchcodec._core import get_ffmpeg_library_versions

        ffmpeg = get_ffmpeg_library_versions().get("ffmpeg_version")
    print(f"LeRobot {versions['lerobot']} (torch {versions['torch']}, torchvision {versions['torchvision']}, "
          f"torchcodec {versions['torchcodec']}, PyAV {versions['av']}, datasets {versions['datasets']}); video "
          f"backend used: {backend}" + (f" (system FFmpeg {ffmpeg})" if ffmpeg else ""))
    for name, state in backends.items():
        print(f"  backend {name}: {state}")
    for m in mismatches:
        print(f"  outside LeRobot's declared requirements: {m}")

    results = {}
    for case in cases:
        root = Path(written["cases"][case]["root"])
        with np.load(workdir / case / "arrays.npz") as z:
            arrays = {k: z[k] for k in z.files}
        checks = check_case(case, root, arrays, written, backend)
        print_case(case, checks)
        results[case] = {"pass": checks.ok, "settings": CASES[case], "written": written["cases"][case],
                         "checks": checks.items}

    ok = all(r["pass"] for r in results.values())
    report = {
        "benchmark": "lerobot_roundtrip",
        "pass": ok,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "lerobot_env": {"python": sys.version.split()[0], "executable": sys.executable, "versions": versions,
                        "backend": backend, "torchcodec_ffmpeg": ffmpeg, "backends_probed": backends, "requirement_mismatches": mismatches},
        "actprior_env": {**{k: written[k] for k in ("python", "executable", "versions")}, "source": source},
        "dataset": {"fps": FPS, "episode_lengths": list(LENGTHS), "tasks": list(TASKS), "state_dim": STATE_DIM,
                    "embodiment": EMBODIMENT, "cameras": {k: {"height": h, "width": w} for k, (h, w) in CAMERAS.items()}},
        "thresholds": {"mean_abs_max": MEAN_ABS_MAX, "psnr_min_db": PSNR_MIN_DB,
                       "frame_psnr_min_db": FRAME_PSNR_MIN_DB, "ours_vs_lerobot_mean_abs_max": OURS_MEAN_ABS_MAX,
                       "ours_vs_lerobot_psnr_min_db": OURS_PSNR_MIN_DB},
        "cases": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    failed = sum(not c["ok"] for r in results.values() for c in r["checks"])
    total = sum(len(r["checks"]) for r in results.values())
    print(f"\n{'PASS' if ok else 'FAIL'}: {total - failed} of {total} checks passed over {len(cases)} datasets; "
          f"report in {out}")
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--backend", choices=["torchcodec", "pyav"], default=None,
                   help="LeRobot's video backend (default: torchcodec when installed)")
    p.add_argument("--actprior-python", default=os.environ.get("ACTPRIOR_PYTHON"),
                   help=f"the Python that has our package and its dependencies (default {DEFAULT_ACTPRIOR_PYTHON})")
    p.add_argument("--workdir", default=None, help="where the datasets go (default: a temporary folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--role", choices=["lerobot", "write"], default="lerobot", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "write":
        write_role(Path(args.workdir), args.cases)
        return 0
    return lerobot_role(args)


if __name__ == "__main__":
    sys.exit(main())
