#!/usr/bin/env python
"""Stage-1 training throughput: windows/s of `train_stage1.py` and the share of step time spent waiting
for data, next to the loader's own rate in the same process.

    python benchmarks/stage1_throughput.py [--dataset DIR] [--preset small] [--steps 40] [--out FILE]

Without --dataset it writes a synthetic two-robot corpus to a temporary folder. Prints a table, writes
JSON (default benchmarks/results/stage1_throughput.json). A benchmark, not a test.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]


def loader_rate(dataset_dirs, history, chunk, batch_size, seconds=5.0):
    from modeling_actprior.data import (
        ActionWindowDataset,
        MixtureDataset,
        collate_windows,
        fit_normalizer,
        load_lerobot_dataset,
    )
    from modeling_actprior.training import endless_batches

    corpora = [load_lerobot_dataset(d) for d in dataset_dirs]
    norm = fit_normalizer(corpora)
    sets = [ActionWindowDataset(c, norm, history, chunk) for c in corpora]
    total = sum(len(s) for s in sets)
    mix = MixtureDataset(sets, num_samples=total // batch_size * batch_size, seed=0)
    it = endless_batches(mix, batch_size, 0, collate=collate_windows)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it)["actions"].shape[0]
    return n / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", nargs="+")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stage1_throughput.json"))
    args = p.parse_args()
    from modeling_actprior.training import stage1 as train_stage1

    with tempfile.TemporaryDirectory() as tmp:
        dirs = args.dataset
        if not dirs:
            from synthetic import make_corpus

            dirs = make_corpus(Path(tmp) / "corpus", n_episodes=40, length=100)
        summary = train_stage1.main(["--dataset", *dirs, "--output_dir", os.path.join(tmp, "run"), "--max_steps",
                                     str(args.steps), "--model_preset", args.preset, "--batch_size", str(args.batch_size),
                                     "--eval_every", "0", "--checkpoint_every", str(10**9), "--no_progress",
                                     "--eval_windows", "32", "--log_every", str(args.steps)])
        rate = loader_rate(dirs, 16, 16, args.batch_size)
    result = {
        "preset": args.preset, "batch_size": args.batch_size, "steps": args.steps,
        "train_windows_per_s": summary["windows_per_second"],
        "data_wait_fraction": summary["data_wait_fraction"],
        "loader_windows_per_s": rate,
        "loader_over_training": rate / summary["windows_per_second"],
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__},
    }
    print(f"| preset | train windows/s | data wait | loader windows/s | loader / training |\n|---|---|---|---|---|\n"
          f"| {args.preset} | {result['train_windows_per_s']:.0f} | {100 * result['data_wait_fraction']:.1f}% | "
          f"{rate:.0f} | {result['loader_over_training']:.1f}x |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
