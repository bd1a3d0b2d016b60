"""``actprior quickstart``: the main job, end to end on data generated on this machine.

1. Generate a cross-embodiment Stage-1 corpus with the scripted experts (state and action only): Meta-World
   tasks outside MT10 (MT10 stays unseen for later VLA evaluation), pybullet arms in joint space, robosuite
   arms with OSC_POSE deltas.
2. Train the Stage-1 action prior on it with ``training_scripts/train_stage1.py``.
3. Evaluate on held-out episodes against "repeat the last action" and "the embodiment's mean chunk", and
   write ``report.md`` with the tables and plots of this run.

Every step is skipped when its output already exists (rerun after an interruption to continue;
``--fresh`` starts over). Defaults fit a 2-core CPU in about ten minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

# Meta-World tasks for the Stage-1 corpus: outside MT10, so MT10 stays unseen by the prior.
STAGE1_METAWORLD_TASKS = (
    "assembly-v3", "basketball-v3", "box-close-v3", "button-press-v3", "coffee-push-v3", "dial-turn-v3",
    "door-close-v3", "faucet-open-v3", "hammer-v3", "handle-press-v3", "lever-pull-v3", "plate-slide-v3",
    "push-back-v3", "reach-wall-v3", "sweep-v3", "soccer-v3",
)
STAGE1_ROBOSUITE_ROBOTS = ("panda", "ur5e", "kinova3")
STAGE1_ROBOSUITE_TASKS = ("Lift", "Stack")


def add_quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="folder for data, checkpoints and the report")
    parser.add_argument("--metaworld-episodes", type=int, default=10, help="episodes per Meta-World task")
    parser.add_argument("--pybullet-episodes", type=int, default=20, help="episodes per pybullet task and arm")
    parser.add_argument("--robosuite-episodes", type=int, default=10, help="episodes per robosuite task and arm")
    parser.add_argument("--stage1-steps", type=int, default=2500)
    parser.add_argument("--stage1-preset", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="simulator processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="delete --out first and start over")


def _generate(out: str, args) -> list:
    from modeling_actprior.sim.generate import generate

    plan = [
        ("metaworld", dict(episodes=args.metaworld_episodes, tasks=STAGE1_METAWORLD_TASKS)),
        ("pybullet", dict(episodes=args.pybullet_episodes)),
        ("robosuite", dict(episodes=args.robosuite_episodes, robots=STAGE1_ROBOSUITE_ROBOTS,
                           tasks=STAGE1_ROBOSUITE_TASKS)),
    ]
    roots = []
    for sim, kw in plan:
        target = os.path.join(out, sim)
        if os.path.isdir(target):
            print(f"[quickstart] {sim}: using the corpus already in {target}")
            roots.append(target)
            continue
        print(f"[quickstart] {sim}: generating expert episodes")
        generate(sim, target, workers=args.workers, seed=args.seed, **kw)
        roots.append(target)
    return roots


def run_quickstart(args: argparse.Namespace) -> int:
    out = os.path.abspath(args.out)
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    timings = {}

    corpus = _generate(os.path.join(out, "data", "stage1"), args)
    timings["generate_s"] = time.time() - t0

    stage1_dir = os.path.join(out, "stage1")
    final = os.path.join(stage1_dir, "final")
    if not os.path.isfile(os.path.join(final, "eval_results.json")):
        train_stage1 = _training_script("train_stage1")
        t1 = time.time()
        argv = ["--dataset", *corpus, "--output_dir", stage1_dir, "--max_steps", str(args.stage1_steps),
                "--model_preset", args.stage1_preset, "--batch_size", str(args.batch_size), "--seed", str(args.seed),
                "--learning_rate", "1e-3", "--eval_every", "250", "--checkpoint_every", "500", "--log_every", "50"]
        argv += ["--resume_from_checkpoint", "latest"]  # continues an interrupted quickstart; fresh otherwise
        print("[quickstart] stage 1: training the action prior")
        train_stage1.main(argv)
        timings["stage1_s"] = time.time() - t1
    else:
        print(f"[quickstart] stage 1: using the trained prior in {final}")

    report = write_report(out, final, timings)
    print(f"[quickstart] done in {time.time() - t0:.0f} s; report: {report}")
    return 0


def _training_script(name: str):
    """Import ``training_scripts/<name>.py`` from the repository (or an installed ``training_scripts``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    scripts = os.path.normpath(os.path.join(here, "..", "training_scripts"))
    if os.path.isfile(os.path.join(scripts, f"{name}.py")) and scripts not in sys.path:
        sys.path.insert(0, scripts)
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(
            f"training_scripts/{name}.py was not found next to the package; run the quickstart from a clone of the "
            "repository installed with `pip install -e .` (see README)."
        ) from None


def plot_stage1_errors(evaluation: dict, path: str) -> str:
    """Grouped bars: per-embodiment held-out MSE of the prior and both baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    embs = sorted(evaluation)
    x = np.arange(len(embs))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(embs)), 3.6), dpi=120)
    for i, (key, label) in enumerate([("prior_mse", "action prior (sampled)"), ("repeat_last_mse", "repeat last action"),
                                      ("mean_chunk_mse", "mean chunk")]):
        ax.bar(x + (i - 1) * 0.27, [evaluation[e][key] for e in embs], width=0.27, label=label)
    ax.set_xticks(x, embs, rotation=20)
    ax.set_ylabel("held-out MSE (normalized units)")
    ax.set_title("Stage 1: predicting the next chunk from the past")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out: str, final: str, timings: dict) -> str:
    from modeling_actprior.training import markdown_table

    with open(os.path.join(final, "eval_results.json")) as f:
        results = json.load(f)
    evaluation, corpus = results["evaluation"], results["corpus"]
    shutil.copy(os.path.join(final, "loss_curve.png"), os.path.join(out, "stage1_loss_curve.png"))
    plot_stage1_errors(evaluation, os.path.join(out, "stage1_errors.png"))
    rows = [{"embodiment": e, **{k: v for k, v in r.items() if k != "beats_baselines"},
             "beats both": "yes" if r["beats_baselines"] else "no"} for e, r in sorted(evaluation.items())]
    lines = [
        "# actprior quickstart report",
        "",
        "Everything below was produced by this run (`actprior quickstart`), on data generated on this machine.",
        "",
        "## Stage-1 corpus",
        "",
        markdown_table(corpus["datasets"], ["embodiment", "episodes", "frames", "train_episodes", "val_episodes"]),
        "",
        "## Stage 1: the action prior on held-out episodes",
        "",
        "Masked MSE / L1 in normalized units between the true next chunk and: a chunk sampled by the prior from its",
        "latent of the past actions; the last action repeated; the embodiment's mean training chunk.",
        "",
        markdown_table(rows, ["embodiment", "windows", "prior_mse", "repeat_last_mse", "mean_chunk_mse", "prior_l1",
                              "repeat_last_l1", "mean_chunk_l1", "active_dims", "beats both"]),
        "",
        "![stage-1 errors](stage1_errors.png)",
        "",
        "![stage-1 loss](stage1_loss_curve.png)",
        "",
        f"Checkpoint: `{os.path.relpath(final, out)}` (load with `AutoModel.from_pretrained`).",
        "",
        "Timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) if timings else "",
    ]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
