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
    parser.add_argument("--update-readme", default=None, metavar="PAGE",
                        help="also copy the report (figures into quickstart/ beside it) between the quickstart-results "
                             "markers of this markdown page (the repository's: docs/quickstart.md)")


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
    from modeling_actprior.reports import update_readme, write_figures, write_report
    from modeling_actprior.study import prior_dir, run_study, stage2_name

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


