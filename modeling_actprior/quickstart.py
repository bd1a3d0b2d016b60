"""``actprior quickstart``: the main job, end to end on data generated on this machine.

1. Generate a cross-embodiment Stage-1 corpus with the scripted experts (state and action only): Meta-World
   tasks outside MT10 (MT10 stays unseen for the VLA evaluation), pybullet arms in joint space, robosuite arms with
   OSC_POSE deltas; and Meta-World MT10 demonstrations with a 64 px camera and the task's instruction.
2. Train the Stage-1 action prior (``training_scripts/train_stage1.py``) and evaluate it on held-out episodes
   against "repeat the last action" and "the embodiment's mean chunk".
3. Train the VLA twice for the same budget, from scratch and with the prior (decoder reuse and early latent
   distillation, the action head at 0.3x the learning rate: the best variant of the medium prior-vs-scratch study),
   in parallel (``training_scripts/train_stage2.py``).
4. Roll both out in closed loop in Meta-World at each checkpoint (evaluation seeds the demonstrations never used),
   and draw how the VLA's latents align with the prior's (``actprior viz-latents``).
5. Write ``report.md`` with the tables and plots of this run.

This is the prior-vs-scratch study (``modeling_actprior/study.py``) at its smallest budget; every step is skipped
when its output already exists (rerun after an interruption to continue; ``--fresh`` starts over). Defaults fit a
2-core CPU in about ten minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time


def add_quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    from modeling_actprior.study import BUDGETS

    b = BUDGETS["quickstart"]
    parser.add_argument("--out", default="runs/quickstart", help="folder for data, checkpoints and the report")
    parser.add_argument("--stage1-episodes", type=int, default=b.stage1_sizes[0],
                        help="Stage-1 corpus: episodes per task and robot")
    parser.add_argument("--tasks", default=",".join(b.tasks), help="Meta-World MT10 tasks the VLA learns")
    parser.add_argument("--demos", type=int, default=b.demos[0], help="demonstrations per task")
    parser.add_argument("--stage1-steps", type=int, default=b.stage1_steps)
    parser.add_argument("--stage1-preset", default=b.stage1_preset, choices=["tiny", "small", "base"])
    parser.add_argument("--batch-size", type=int, default=b.stage1_batch_size, help="Stage-1 batch size")
    parser.add_argument("--stage2-steps", type=int, default=b.stage2_steps)
    parser.add_argument("--stage2-preset", default=b.stage2_preset, choices=["tiny", "small"])
    parser.add_argument("--eval-every", type=int, default=b.eval_every, help="closed-loop evaluation every N steps")
    parser.add_argument("--eval-episodes", type=int, default=b.eval_episodes, help="closed-loop episodes per task")
    parser.add_argument("--workers", type=int, default=2, help="simulator processes")
    parser.add_argument("--jobs", type=int, default=None, help="training runs in parallel (default: CPU cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="delete --out first and start over")
    parser.add_argument("--update-readme", default=None, metavar="README",
                        help="also copy the report (figures into docs/ beside it) between the quickstart-results "
                             "markers of this README")


def quickstart_budget(args: argparse.Namespace):
    from modeling_actprior.study import BUDGETS, MT10

    tasks = tuple(t for t in args.tasks.split(",") if t)
    unknown = sorted(set(tasks) - set(MT10))
    if unknown:
        raise ValueError(f"--tasks must be Meta-World MT10 tasks (the prior never saw them); got {unknown}. "
                         f"MT10: {', '.join(MT10)}.")
    return dataclasses.replace(
        BUDGETS["quickstart"], tasks=tasks, demos=(args.demos,), seeds=(args.seed,),
        stage1_sizes=(args.stage1_episodes,), stage1_steps=args.stage1_steps, stage1_preset=args.stage1_preset,
        stage1_batch_size=args.batch_size, stage2_steps=args.stage2_steps, stage2_preset=args.stage2_preset,
        eval_every=args.eval_every, eval_episodes=args.eval_episodes,
        distill_hold_steps=min(BUDGETS["quickstart"].distill_hold_steps, max(1, args.stage2_steps // 5)),
        distill_decay_steps=min(BUDGETS["quickstart"].distill_decay_steps, max(1, args.stage2_steps * 2 // 5)),
    )


def run_quickstart(args: argparse.Namespace) -> int:
    from modeling_actprior.study import prior_dir, run_study, stage2_name, write_figures

    out = os.path.abspath(args.out)
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    budget = quickstart_budget(args)
    t0 = time.time()
    summary = run_study(out, budget, jobs=args.jobs, workers=args.workers, seed=args.seed)
    figures = write_figures(out, summary)
    latents = None
    with_prior = next((v for v in budget.variants if v != "scratch"), None)
    full = os.path.join(out, "stage2", stage2_name(budget.demos[0], with_prior or "full", budget.stage1_sizes[0],
                                                   args.seed, budget.stage1_sizes[0]))
    if os.path.isdir(os.path.join(full, "final")):
        from modeling_actprior.viz import visualize_latents

        latents_dir = os.path.join(out, "latents")
        if not os.path.isfile(os.path.join(latents_dir, "latent_alignment.json")):
            print("[quickstart] drawing the latent alignment of the VLA trained with the prior")
            visualize_latents(full, [os.path.join(out, "data", "demos")], latents_dir, num_windows=96, progress=False)
        latents = latents_dir
    timings = dict(summary.get("timings", {}), this_run_s=time.time() - t0)
    report = write_report(out, os.path.join(prior_dir(out, budget, budget.stage1_sizes[0]), "final"), timings,
                          summary=summary, figures=figures, latents=latents)
    print(f"[quickstart] done in {time.time() - t0:.0f} s; report: {report}")
    if args.update_readme:
        update_readme(args.update_readme, report, f"actprior quickstart (seed {args.seed})")
    return 1 if summary.get("failed_jobs") else 0


README_START, README_END = "<!-- quickstart-results:start -->", "<!-- quickstart-results:end -->"


def update_readme(readme: str, report: str, command: str) -> None:
    """Put ``report`` (markdown) between the README's quickstart-results markers; its images are copied into
    ``docs/quickstart/`` next to the README and the links rewritten, so the README shows this run's figures."""
    import re

    root, out = os.path.dirname(os.path.abspath(readme)), os.path.dirname(os.path.abspath(report))
    docs = os.path.join(root, "docs", "quickstart")
    os.makedirs(docs, exist_ok=True)
    with open(report) as f:
        body = f.read().split("\n", 1)[1].strip()  # drop the report's title

    def copy(m):
        src = os.path.join(out, m.group(2))
        if not m.group(2).endswith(".png") or not os.path.isfile(src):
            return m.group(0)
        name = m.group(2).replace("/", "_")
        shutil.copy(src, os.path.join(docs, name))
        return f"{m.group(1)}(docs/quickstart/{name})"

    body = re.sub(r"(!\[[^\]]*\])\(([^)]+)\)", copy, body)
    body = re.sub(r"\[([^\]]+)\]\((latents/index\.html)\)", r"`\1` (in the run folder)", body)
    from .training.reporting import replace_readme_block

    replace_readme_block(readme, README_START, README_END,
                         f"From `{command}`, copied from its `report.md` by `--update-readme`:\n\n{body}")


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


def write_report(out: str, final: str, timings: dict, summary: dict | None = None, figures: dict | None = None,
                 latents: str | None = None) -> str:
    """``out/report.md``: the Stage-1 corpus and prior evaluation, then (with ``summary``) the VLA trained from
    scratch vs with the prior in closed loop, and (with ``latents``) the latent alignment; all from this run."""
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
    ]
    if summary is not None:
        lines += _stage2_section(out, summary, figures or {}, latents)
    lines += [
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
        "Timings (s; phases reused from an earlier run of the same folder keep that run's time): "
        + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in timings.items()) if timings else "",
    ]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _stage2_section(out: str, summary: dict, figures: dict, latents: str | None) -> list[str]:
    from modeling_actprior.study import VARIANT_LABELS, markdown_summary, stage2_name, variant_command
    from modeling_actprior.training import markdown_table

    b = summary["budget"]
    lines = [
        "## Stage 2: the VLA from scratch vs with the action prior, in closed loop",
        "",
        f"Both VLAs ({b['stage2_preset']} preset) train for {b['stage2_steps']} steps on the same "
        f"{b['demos'][0]} demonstrations per task, with the same seed, optimizer and data order; the only "
        "difference is the prior: "
        + "; ".join(f"{VARIANT_LABELS.get(v, v)} (`train_stage2.py {variant_command(v)}`)" for v in b["variants"])
        + ". The full method's history token is measured in `benchmarks/prior_vs_scratch.py` (see the README). "
        "Each checkpoint is "
        f"rolled out {b['eval_episodes']} times per task in Meta-World on evaluation seeds the demonstrations never "
        "used. Intervals are 95% Wilson intervals over episodes.",
        "",
        markdown_summary(summary),
    ]
    for key, title in (("curves", "success vs steps"), ("final", "final success")):
        if key in figures:
            lines += [f"![{title}]({os.path.relpath(figures[key], out)})", ""]
    offline = []
    for demos, per_variant in summary["demos"].items():
        for variant, v in per_variant.items():
            for seed in v["seeds"]:
                size = b["stage1_sizes"][-1]
                res = os.path.join(out, "stage2", stage2_name(int(demos), variant, size, seed, size), "final",
                                   "eval_results.json")
                if os.path.isfile(res):
                    with open(res) as f:
                        ev = json.load(f)["evaluation"]
                    for emb, r in ev.items():
                        offline.append({"variant": VARIANT_LABELS.get(variant, variant), "seed": seed,
                                        "embodiment": emb, "held-out MSE": r["vla_mse"],
                                        "repeat-last MSE": r["repeat_last_mse"]})
    if offline:
        lines += ["Offline, on held-out demonstration episodes (normalized units):", "",
                  markdown_table(offline, ["variant", "seed", "embodiment", "held-out MSE", "repeat-last MSE"]), ""]
    for demos, per_variant in summary["demos"].items():
        for variant, v in per_variant.items():
            size = b["stage1_sizes"][-1]
            for seed in v["seeds"]:
                curve = os.path.join("stage2", stage2_name(int(demos), variant, size, seed, size), "final",
                                     "loss_curve.png")
                if os.path.isfile(os.path.join(out, curve)):
                    lines += [f"Training losses, {VARIANT_LABELS.get(variant, variant)} (seed {seed}):", "",
                              f"![stage-2 loss, {variant}]({curve})", ""]
    if latents:
        with open(os.path.join(latents, "latent_alignment.json")) as f:
            lat = json.load(f)
        fin = lat.get("final", {})
        rel = os.path.relpath(latents, out)
        lines += [
            "### Latent alignment (`actprior viz-latents`)",
            "",
            "Cosine similarity between the VLA's latent and the prior's latent of the same held-out window (diagonal) "
            "and of other windows (off-diagonal), for the VLA trained with the prior"
            + (f": diagonal {fin['diagonal_mean']:.3f}, off-diagonal {fin['off_diagonal_mean']:.3f} at the end."
               if "diagonal_mean" in fin else "."),
            "",
            f"![cosine matrix]({rel}/cosine_matrix.png)",
            "",
        ]
        if os.path.isfile(os.path.join(latents, "alignment_over_training.png")):
            lines += [f"![alignment over training]({rel}/alignment_over_training.png)", ""]
        lines += [f"All of it, with the per-task view: [{rel}/index.html]({rel}/index.html).", ""]
    return lines
