"""Windows per second through a torch DataLoader: Stage-1 action windows, and Stage-2 windows whose camera is video.

Actions (default): builds a synthetic LeRobot v3.0 corpus (or uses ``--dataset DIR``), then times full passes (or
``--max-batches`` batches) of ``ActionWindowDataset`` and ``StreamingActionWindows`` with batch size 256 and
``num_workers`` 0 and 2. Prints a table and writes JSON (``--out``).

    python benchmarks/loader_throughput.py --episodes 300 --out benchmarks/results/loader_throughput.json

Video (``--video``): Stage-2 windows (``VLAWindowDataset`` + the processor, batch 8, shuffled) over a corpus whose
camera is MP4 video as ``lerobot-record`` writes it (AV1 by default), against the Stage-2 training step measured in the
same run. Two epochs through persistent workers: the first decodes every episode's span once per worker (cold), the
second reads the per-worker cache (warm). The same episodes with the camera stored as images give the reference. The
synthetic frames are a moving object over a textured scene (not white noise, which no camera films); ``--dataset DIR``
measures a LeRobot dataset with a video camera instead.

    python benchmarks/loader_throughput.py --video --out benchmarks/results/loader_throughput_video.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

from modeling_actprior.action_space import get_embodiment
from modeling_actprior.data import (  # noqa: E402
    ActionWindowDataset,
    Episode,
    StreamingActionWindows,
    collate_windows,
    fit_normalizer,
    load_lerobot_dataset,
    write_lerobot_dataset,
)

GOAL_RATIO = 10.0  # the loader must deliver windows at least this many times as fast as training consumes them


def build_corpus(root: str, episodes: int, mean_length: int, seed: int, image_size: int | None = None,
                 video_codec: str | None = None) -> str:
    """The synthetic Panda corpus; with ``image_size``, one camera ``front`` filming the episode (``scene_frames``),
    stored as MP4 video of ``video_codec`` or, without one, as images."""
    spec = get_embodiment("panda")
    rng = np.random.default_rng(seed)

    def gen():
        for i in range(episodes):
            t = int(rng.integers(mean_length // 2, mean_length * 3 // 2 + 1))
            actions = np.cumsum(rng.normal(scale=0.05, size=(t, spec.action_dim)), 0).astype(np.float32)
            states = rng.normal(size=(t, 9)).astype(np.float32)
            images = {"front": scene_frames(t, image_size, actions[:, :2], rng)} if image_size else None
            yield Episode(actions, states, f"synthetic task {i % 10}", images=images)

    camera = dict(camera_names=("front",), image_size=image_size, video_codec=video_codec) if image_size else {}
    return write_lerobot_dataset(root, gen(), spec, fps=spec.fps, overwrite=True, **camera,
                                 provenance={"generator": "benchmarks/loader_throughput.py", "seed": seed})


def time_loader(dataset, num_workers: int, batch_size: int, max_batches: int, shuffle: bool) -> dict:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_windows,
        shuffle=shuffle, persistent_workers=False,
    )
    start = time.perf_counter()
    first = None
    windows = batches = 0
    for batch in loader:
        if first is None:
            first = time.perf_counter() - start
        windows += int(batch["actions"].shape[0])
        batches += 1
        if max_batches and batches >= max_batches:
            break
    elapsed = time.perf_counter() - start
    return {"windows": windows, "batches": batches, "seconds": round(elapsed, 3),
            "windows_per_s": round(windows / elapsed, 1) if elapsed > 0 else None,
            "first_batch_s": round(first or 0.0, 3)}


# ------------------------------------------------------------------------------------------------------- video
def scene_frames(length: int, size: int, path: np.ndarray, rng) -> np.ndarray:
    """``(length, size, size, 3)`` uint8: a fixed textured background (gradient, tiles, sensor noise) and a coloured
    block that moves along ``path`` (the episode's first two action dimensions), as a fixed camera would film it."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    background = np.stack([80 + 100 * xx, 60 + 90 * yy, 120 + 40 * np.sin(6 * xx + 4 * yy)], -1)
    background += 25 * (((np.arange(size)[:, None] // 8 + np.arange(size)[None] // 8) % 2) - 0.5)[..., None]
    frames = np.repeat(background[None], length, 0)
    pos = (path - path.min(0)) / np.maximum(np.ptp(path, 0), 1e-6)
    half = max(2, size // 10)
    for t, (u, v) in enumerate(pos):
        r, c = int(half + u * (size - 2 * half - 1)), int(half + v * (size - 2 * half - 1))
        frames[t, r - half:r + half, c - half:c + half] = (220, 60, 40)
    frames += rng.normal(scale=3.0, size=frames.shape)
    return np.clip(frames, 0, 255).astype(np.uint8)


def time_epochs(dataset, collate, num_workers: int, batch_size: int, epochs: int, seed: int) -> list[dict]:
    """Windows/s of each of ``epochs`` shuffled passes through one DataLoader whose workers persist between epochs
    (so the second pass finds each worker's video cache warm, as in training)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate, shuffle=True, drop_last=True,
        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))
    rows = []
    for epoch in range(epochs):
        start = time.perf_counter()
        windows = 0
        for batch in loader:
            windows += int(batch["actions"].shape[0])
        elapsed = time.perf_counter() - start
        rows.append({"epoch": epoch + 1, "windows": windows, "seconds": round(elapsed, 3),
                     "windows_per_s": round(windows / elapsed, 1)})
    del loader
    return rows


def time_stage2_step(preset: str, processor_cfg, batches: list[dict], steps: int, warmup: int) -> dict:
    """Median Stage-2 training step (forward, backward, clipping, AdamW) of a random ``preset`` VLA, batch as given."""
    import modeling_actprior as ap
    from modeling_actprior.training.stage2 import build_optimizer

    torch.manual_seed(0)
    model = ap.VLAWithPriorForAction(processor_cfg).train()
    opt = build_optimizer(model, argparse.Namespace(learning_rate=1e-4, weight_decay=1e-4))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        model(**batches[i % len(batches)]).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    ms = float(np.median(times)) * 1e3
    return {"preset": preset, "batch_size": int(batches[0]["actions"].shape[0]), "steps": steps,
            "median_ms": round(ms, 2), "iqr_ms": round(float(np.subtract(*np.percentile(times, [75, 25]))) * 1e3, 2),
            "windows_per_s": round(batches[0]["actions"].shape[0] / (ms / 1e3), 1)}


def video_main(args) -> dict:
    from speed import cpu_model

    import modeling_actprior as ap
    from modeling_actprior.data import VLAWindowDataset
    from modeling_actprior.data.video import decode_span, frame_cache
    from modeling_actprior.training.stage2 import VLACollator

    tmp = tempfile.TemporaryDirectory(prefix="actprior-bench-video-")
    t0 = time.perf_counter()
    if args.dataset:
        roots = {"video": args.dataset}
    else:
        roots = {kind: build_corpus(os.path.join(tmp.name, kind), args.episodes, args.mean_length, args.seed,
                                    args.image_size, codec)
                 for kind, codec in (("video", args.codec), ("images", None))}
    built_s = time.perf_counter() - t0
    sets = {kind: load_lerobot_dataset(root, cache_dir=os.path.join(tmp.name, f"hf_cache_{kind}"))
            for kind, root in roots.items()}
    video = sets["video"]
    cams = [k for k in video.meta.camera_keys if video.meta.features[k].get("dtype") == "video"]
    if not cams:
        raise SystemExit(f"--video: {roots['video']} has no camera stored as video (camera keys: "
                         f"{video.meta.camera_keys or 'none'}).")
    camera = cams[0].removeprefix("observation.images.")
    norm = fit_normalizer([video], max_action_dim=32)
    cfg = ap.VLAWithPriorConfig.from_preset(args.preset, vlm_family="paligemma")
    cfg.prior_config.chunk_size = args.chunk
    cfg.prior_config.history_length = args.history
    processor = ap.ActionPriorProcessor.from_config(cfg, norm, instructions=sorted({t for t in video.meta.tasks if t}))
    collate = VLACollator(processor, camera)

    # What one cache miss costs: an episode's whole span of the camera, decoded in one seek.
    span_ms = []
    for e in range(min(video.num_episodes, 32)):
        path, start, end = video.meta.video_location(cams[0], e)
        t1 = time.perf_counter()
        decode_span(path, start, end)
        span_ms.append((time.perf_counter() - t1) * 1e3)

    windows = {kind: VLAWindowDataset(ds, norm, history=args.history, chunk=args.chunk, cameras=[camera])
               for kind, ds in sets.items()}
    step = time_stage2_step(args.preset, cfg, [collate([windows["video"][i] for i in range(j, j + 8)])
                                               for j in range(0, 32, 8)], args.train_steps, 3)
    print(f"  Stage-2 training step ({args.preset}, batch 8): {step['median_ms']:.1f} ms = "
          f"{step['windows_per_s']:.1f} windows/s", flush=True)
    rows = []
    for kind, ds in windows.items():
        for workers in args.workers:
            frame_cache().clear()  # cold means cold: workers=0 reads this process's cache (forked workers start empty)
            for r in time_epochs(ds, collate, workers, 8, 2, args.seed):
                r.update(camera=kind, num_workers=workers, phase="cold" if r["epoch"] == 1 else "warm",
                         over_training=round(r["windows_per_s"] / step["windows_per_s"], 1))
                rows.append(r)
                print(f"  {kind:<7} workers={workers} epoch {r['epoch']} ({r['phase']}): {r['windows_per_s']:>8} "
                      f"windows/s = {r['over_training']}x training", flush=True)
    cold = [r for r in rows if r["camera"] == "video" and r["phase"] == "cold"]
    worst = min(cold, key=lambda r: r["over_training"])
    goal = {"goal": f"video loader >= {GOAL_RATIO:g}x Stage-2 training demand, cold epoch, every worker count",
            "value": f"{worst['over_training']}x (workers={worst['num_workers']})",
            "pass": worst["over_training"] >= GOAL_RATIO}
    print(f"\n{'camera':<7} {'workers':>7} {'epoch':>5} {'windows':>8} {'seconds':>8} {'windows/s':>10} "
          f"{'x training':>10}")
    for r in rows:
        print(f"{r['camera']:<7} {r['num_workers']:>7} {r['epoch']:>5} {r['windows']:>8} {r['seconds']:>8} "
              f"{r['windows_per_s']:>10} {r['over_training']:>10}")
    print(f"episode span decode: median {np.median(span_ms):.1f} ms over {len(span_ms)} episodes "
          f"(median {int(np.median(video.meta.episode_lengths))} frames)")
    print(f"{'PASS' if goal['pass'] else 'FAIL'}: {goal['goal']}: {goal['value']}")
    result = {
        "mode": "video", "dataset": os.path.abspath(args.dataset) if args.dataset else None,
        "codec": video.meta.features[cams[0]].get("info", {}).get("video.codec", args.codec),
        "camera": camera, "image_size": args.image_size if not args.dataset else None,
        "episodes": video.num_episodes, "frames": video.num_frames, "history": args.history, "chunk": args.chunk,
        "build_s": round(built_s, 2), "episode_span_decode_ms_median": round(float(np.median(span_ms)), 2),
        "training": step, "results": rows, "goal": goal, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "command": "python benchmarks/loader_throughput.py " + " ".join(sys.argv[1:]),
    }
    tmp.cleanup()
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="existing LeRobot v3.0 folder (default: build a synthetic corpus)")
    p.add_argument("--episodes", type=int, default=None, help="default 300 (48 with --video)")
    p.add_argument("--mean-length", type=int, default=None, help="default 120 (60 with --video)")
    p.add_argument("--history", type=int, default=16)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--max-batches", type=int, default=0, help="stop each measurement after this many batches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON results (default benchmarks/results/loader_throughput[_video].json)")
    v = p.add_argument_group("video (--video)")
    v.add_argument("--video", action="store_true", help="Stage-2 windows with the camera as video vs the training step")
    v.add_argument("--codec", default="av1", choices=["av1", "h264"])
    v.add_argument("--image-size", type=int, default=64)
    v.add_argument("--preset", default="small", help="VLA preset whose training step sets the demand (default small, as "
                   "benchmarks/speed.py's loader section)")
    v.add_argument("--train-steps", type=int, default=20)
    args = p.parse_args(argv)
    args.episodes = args.episodes or (48 if args.video else 300)
    args.mean_length = args.mean_length or (60 if args.video else 120)
    if args.video:
        result = video_main(args)
        return write_result(result, args.out or os.path.join("benchmarks", "results", "loader_throughput_video.json"))
    args.out = args.out or os.path.join("benchmarks", "results", "loader_throughput.json")

    tmp = None
    if args.dataset:
        root = args.dataset
        built_s = 0.0
    else:
        tmp = tempfile.TemporaryDirectory(prefix="actprior-bench-")
        t0 = time.perf_counter()
        root = build_corpus(os.path.join(tmp.name, "corpus"), args.episodes, args.mean_length, args.seed)
        built_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = os.path.join(tmp.name, "hf_cache") if tmp else None
    ds = load_lerobot_dataset(root, cache_dir=cache)
    load_s = time.perf_counter() - t0
    norm = fit_normalizer([ds], max_action_dim=32)
    views = {
        "map": lambda: ActionWindowDataset(ds, norm, history=args.history, chunk=args.chunk),
        "streaming": lambda: StreamingActionWindows(ds, norm, history=args.history, chunk=args.chunk,
                                                    shuffle=True, seed=args.seed),
    }
    rows = []
    for name, make in views.items():
        for workers in args.workers:
            r = time_loader(make(), workers, args.batch_size, args.max_batches, shuffle=(name == "map"))
            r.update(view=name, num_workers=workers)
            rows.append(r)
            print(f"  {name:<10} workers={workers}: {r['windows_per_s']:>10} windows/s", flush=True)

    header = f"{'view':<10} {'workers':>7} {'windows':>9} {'seconds':>8} {'windows/s':>11} {'1st batch s':>11}"
    print(f"\ncorpus: {root}  episodes={ds.num_episodes} frames={ds.num_frames} "
          f"(build {built_s:.1f}s, load+validate {load_s:.2f}s)")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['view']:<10} {r['num_workers']:>7} {r['windows']:>9} {r['seconds']:>8} "
              f"{r['windows_per_s']:>11} {r['first_batch_s']:>11}")
    result = {
        "dataset": None if tmp else os.path.abspath(root),
        "episodes": ds.num_episodes, "frames": ds.num_frames, "embodiment": ds.embodiment.name,
        "history": args.history, "chunk": args.chunk, "batch_size": args.batch_size,
        "build_s": round(built_s, 2), "load_validate_s": round(load_s, 3),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
        "results": rows,
    }
    if tmp:
        tmp.cleanup()
    return write_result(result, args.out)


def write_result(result: dict, out: str) -> dict:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
