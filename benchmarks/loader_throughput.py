"""Windows per second through a torch DataLoader, map-style vs streaming views.

Builds a synthetic LeRobot v3.0 corpus (or uses ``--dataset DIR``), then times full passes (or
``--max-batches`` batches) of ``ActionWindowDataset`` and ``StreamingActionWindows`` with batch size 256 and
``num_workers`` 0 and 2. Prints a table and writes JSON (``--out``).

    python benchmarks/loader_throughput.py --episodes 300 --out benchmarks/results/loader_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch

from modeling_actprior.action_space import get_embodiment
from modeling_actprior.data import (
    ActionWindowDataset,
    Episode,
    StreamingActionWindows,
    collate_windows,
    fit_normalizer,
    load_lerobot_dataset,
    write_lerobot_dataset,
)


def build_corpus(root: str, episodes: int, mean_length: int, seed: int) -> str:
    spec = get_embodiment("panda")
    rng = np.random.default_rng(seed)

    def gen():
        for i in range(episodes):
            t = int(rng.integers(mean_length // 2, mean_length * 3 // 2 + 1))
            actions = np.cumsum(rng.normal(scale=0.05, size=(t, spec.action_dim)), 0).astype(np.float32)
            states = rng.normal(size=(t, 9)).astype(np.float32)
            yield Episode(actions, states, f"synthetic task {i % 10}")

    return write_lerobot_dataset(root, gen(), spec, fps=spec.fps, overwrite=True,
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="existing LeRobot v3.0 folder (default: build a synthetic corpus)")
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--mean-length", type=int, default=120)
    p.add_argument("--history", type=int, default=16)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--max-batches", type=int, default=0, help="stop each measurement after this many batches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "loader_throughput.json"))
    args = p.parse_args(argv)

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
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")
    if tmp:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
