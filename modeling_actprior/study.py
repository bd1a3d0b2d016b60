"""Prior vs scratch: does a Stage-1 action prior make VLA training converge faster and succeed more often?

One experiment, three sizes (``BUDGETS``): the quickstart's (one seed, scratch vs the full method), ``small``
(every variant, three seeds, three Stage-1 corpus sizes; under an hour on a 2-core CPU) and ``full`` (Meta-World
MT10, 10 and 50 demonstrations per task; hours, meant for a GPU machine). Every part is a step whose output is kept
on disk, so an interrupted study resumes where it stopped.

1. **Stage-1 corpus**: scripted experts of all three simulators, actions only: Meta-World tasks *outside* MT10
   (so no MT10 evaluation scene or task is ever seen by the prior), robosuite arms, pybullet arms.
2. **Demonstrations**: Meta-World MT10 tasks with one 64 px camera and the task's instruction.
3. **Priors**: ``train_stage1.py`` on the first ``n`` episodes per task of the corpus, for each size ``n`` of the
   data-scaling axis (the largest is the prior the variants build on).
4. **Stage 2**: ``train_stage2.py`` for each variant x demonstrations per task x seed, same VLM, data, step budget
   and optimizer; checkpoints every ``eval_every`` steps.
5. **Closed loop**: every checkpoint rolled out in Meta-World on evaluation seeds disjoint from the demonstrations'
   (``rollout.evaluate``); success per task with 95% Wilson intervals.
6. **Summary**: success against training steps, final success pooled over seeds (Wilson 95%) and per seed, steps
   each variant needs to reach the scratch baseline's final success, and downstream success against Stage-1
   corpus size; JSON, PNG and a markdown table.

Jobs run in parallel processes (``jobs``, one thread each by default), each writing its own log.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np

from .sensitivity import input_sensitivity, sensitivity_file  # noqa: F401 - input_sensitivity re-exported
from .success_stats import paired_difference, steps_to_reach, wilson_interval  # noqa: F401 - re-exported
from .training import write_json

logger = logging.getLogger("actprior.study")

MT10 = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
        "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3")
# MT10 tasks a small CPU budget can learn from a handful of demonstrations (fixtures in reach of a 64 px view).
EASY_MT10 = ("drawer-close-v3", "button-press-topdown-v3", "window-open-v3")

#: The study's variants -> ``VLA_BASELINES`` names of train_stage2.py: first the four that build up the method, then
#: the remedies measured against them (the same baseline plus the options in ``VARIANT_OPTIONS``).
VARIANTS = {
    "scratch": "no_prior",
    "decoder": "decoder_only",
    "decoder+kd": "no_history_token",
    "full": "full",
    # History-token remedies (issue: the full method copies its history in closed loop).
    "full+dropout": "full",
    "full+aug": "full",
    "full+lag": "full",
    "full+dart": "full",
    "full+dart+aug": "full",
    "full+dart+aug+slowhead": "full",
    # Distillation remedies (the teacher's sharp posteriors make the KL hundreds of nats early on).
    "decoder+kd+floor": "no_history_token",
    "decoder+kd+mean": "no_history_token",
    "decoder+kd+slowhead": "no_history_token",
}
#: The paper's history token as first built: the encoder's clean posterior mean of the full history, always shown.
PAPER_FULL = ("--history_noise", "0", "--history_shift", "0", "--history_lag", "0", "--history_latent", "mean",
              "--history_dropout", "0")
#: Extra ``train_stage2.py`` options of each variant (after the budget's own, so they override them).
VARIANT_OPTIONS: dict[str, tuple[str, ...]] = {
    # The paper's full method, spelled out: the `full` baseline now defaults to the history augmentation the medium
    # study measured best (VLA_BASELINES), so the paper's variant and the remedies built on it name every switch.
    "full": PAPER_FULL,
    "full+dropout": (*PAPER_FULL, "--history_dropout", "0.5"),
    "full+aug": ("--history_noise", "0.3", "--history_shift", "8", "--history_latent", "sample"),
    "full+lag": (*PAPER_FULL, "--history_lag", "8"),
    "full+dart": PAPER_FULL,
    "full+dart+aug": ("--history_noise", "0.3", "--history_shift", "8", "--history_latent", "sample"),
    "full+dart+aug+slowhead": ("--history_noise", "0.3", "--history_shift", "8", "--history_latent", "sample",
                               "--action_head_lr_multiplier", "0.3"),
    "decoder+kd+floor": ("--distill_teacher_logvar_min", "-4"),
    "decoder+kd+mean": ("--distill_match", "mean"),
    "decoder+kd+slowhead": ("--action_head_lr_multiplier", "0.3"),
}
#: Variants trained on corrective demonstrations (``generate --action-noise``, ``Budget.demo_action_noise``).
CORRECTIVE_VARIANTS = ("full+dart", "full+dart+aug", "full+dart+aug+slowhead")
VARIANT_LABELS = {
    "scratch": "no prior (random action head)",
    "decoder": "decoder reuse",
    "decoder+kd": "decoder reuse + early latent distillation",
    "full": "full method (+ history token)",
    "full+dropout": "full, history dropout 0.5",
    "full+aug": "full, history noise 0.3 + shift <= 8 + sampled token",
    "full+lag": "full, history lag 8 (never the executed part of the last chunk)",
    "full+dart": "full, corrective demonstrations (DART)",
    "full+dart+aug": "full, DART + history noise/shift/sample",
    "full+dart+aug+slowhead": "full, DART + history noise/shift/sample + action head at 0.3x learning rate",
    "decoder+kd+floor": "decoder + KD, teacher log-variance floor -4",
    "decoder+kd+mean": "decoder + KD, means only",
    "decoder+kd+slowhead": "decoder + KD, action head at 0.3x learning rate",
}
BASELINE = "scratch"


def variant_command(variant: str) -> str:
    """The ``train_stage2.py`` switches of ``variant``, as a user would type them."""
    extra = " ".join(VARIANT_OPTIONS.get(variant, ()))
    demos = " (on `generate --action-noise` demonstrations)" if variant in CORRECTIVE_VARIANTS else ""
    return f"--baseline {VARIANTS[variant]}" + (f" {extra}" if extra else "") + demos


@dataclass
class Budget:
    """Everything that sizes a study. Episodes are per task (per arm for robosuite/pybullet)."""

    name: str
    tasks: tuple[str, ...] = EASY_MT10
    demos: tuple[int, ...] = (10,)
    variants: tuple[str, ...] = tuple(VARIANTS)
    seeds: tuple[int, ...] = (0, 1, 2)
    # Stage-1 corpus: the largest size is generated; smaller sizes are its first n episodes per task.
    stage1_sizes: tuple[int, ...] = (10,)
    stage1_metaworld_tasks: tuple[str, ...] | None = None  # None: every Meta-World task outside MT10
    stage1_pybullet: bool = True
    stage1_robosuite: bool = True
    stage1_robosuite_robots: tuple[str, ...] = ("panda", "ur5e", "kinova3")
    stage1_robosuite_tasks: tuple[str, ...] = ("Lift", "Stack")
    stage1_steps: int = 1500
    stage1_preset: str = "small"
    stage1_batch_size: int = 64
    stage1_learning_rate: float = 1e-3
    # Stage 2
    stage2_preset: str = "tiny"
    stage2_steps: int = 500
    stage2_batch_size: int = 16
    stage2_learning_rate: float = 1e-3
    distill_hold_steps: int = 100
    distill_decay_steps: int = 200
    eval_every: int = 250
    # Closed loop
    eval_episodes: int = 10
    eval_max_steps: int = 200
    image_size: int = 64
    # The variant also trained on the priors of smaller corpora, for the scaling axis (None: scaling off); those
    # runs are rolled out at their last step only.
    scaling_variant: str | None = "decoder+kd"
    # Variants also trained with the other demonstration counts of ``demos`` (None: all variants at every count);
    # those runs are rolled out at their last step only. The first entry of ``demos`` is the main axis.
    demos_variants: tuple[str, ...] | None = None
    # Corrective demonstrations for CORRECTIVE_VARIANTS: executed-action noise (Meta-World action units).
    demo_action_noise: float = 0.3
    # Base seed of the closed-loop evaluation scenes (the same for every variant and training seed).
    eval_seed: int = 0
    # Extra train_stage1.py options of every prior (e.g. ("--shortcut_max_steps", "16")).
    stage1_options: tuple[str, ...] = ()
    # False: Stage-2 jobs only train (a caller rolls the runs out itself, e.g. benchmarks/realtime.py).
    closed_loop: bool = True

    @property
    def eval_steps(self) -> list[int]:
        steps = list(range(self.eval_every, self.stage2_steps + 1, self.eval_every)) if self.eval_every else []
        return steps if steps and steps[-1] == self.stage2_steps else [*steps, self.stage2_steps]


BUDGETS = {
    # actprior quickstart: one seed, scratch vs the full method, a fixed Stage-1 corpus.
    "quickstart": Budget(
        name="quickstart", variants=("scratch", "decoder+kd+slowhead"), seeds=(0,), stage1_sizes=(6,),
        stage1_metaworld_tasks=(
            "assembly-v3", "basketball-v3", "box-close-v3", "button-press-v3", "coffee-push-v3", "dial-turn-v3",
            "door-close-v3", "faucet-open-v3", "hammer-v3", "handle-press-v3", "lever-pull-v3", "plate-slide-v3",
            "push-back-v3", "reach-wall-v3", "sweep-v3", "soccer-v3"),
        stage1_robosuite_robots=("panda", "ur5e"), stage1_robosuite_tasks=("Lift",), stage1_steps=1500,
        scaling_variant=None,
    ),
    # benchmarks/prior_vs_scratch.py --budget small: all variants, 3 seeds, 3 corpus sizes; < 1 h on 2 CPU cores.
    "small": Budget(name="small", stage1_sizes=(2, 5, 10), stage1_metaworld_tasks=None, stage1_steps=1200,
                    stage1_robosuite_tasks=("Lift",), eval_episodes=8),
    # benchmarks/prior_vs_scratch.py --budget remedies: the small study's data and prior, every remedy of the full
    # method and of the distillation, two seeds, final step only (~30 min); picks what the medium budget measures.
    "remedies": Budget(name="remedies", seeds=(0, 1), stage1_sizes=(10,), stage1_steps=1200,
                       stage1_robosuite_tasks=("Lift",), eval_every=0, eval_episodes=8, scaling_variant=None,
                       variants=("scratch", "decoder+kd", "full", "full+dropout", "full+aug", "full+lag", "full+dart",
                                 "full+dart+aug", "decoder+kd+floor", "decoder+kd+mean", "decoder+kd+slowhead")),
    # benchmarks/prior_vs_scratch.py --budget medium: enough power to decide (<= ~90 min on 2 CPU cores): 5 tasks
    # (two the screen never saw), 3 seeds, 150 closed-loop episodes per variant and checkpoint on scenes the screen
    # never used (eval_seed 1), the screen's winners beside the paper's variants, 5 / 25 demonstrations for scratch
    # and the best prior variant of the screen, 4 Stage-1 corpus sizes. 1000 Stage-2 steps: at 500 on 5 tasks every
    # variant stayed at 0.11-0.17 (benchmarks/results/prior_vs_scratch_medium_500steps.md).
    "medium": Budget(name="medium", tasks=(*EASY_MT10, "reach-v3", "drawer-open-v3"), demos=(10, 5, 25),
                     demos_variants=("scratch", "decoder+kd+slowhead"), stage1_sizes=(1, 2, 5, 10),
                     stage1_steps=1200, stage1_robosuite_tasks=("Lift",), stage2_steps=1000, eval_every=500,
                     distill_hold_steps=200, distill_decay_steps=400, eval_episodes=10, eval_seed=1,
                     scaling_variant="decoder+kd+slowhead",
                     variants=("scratch", "decoder", "decoder+kd", "decoder+kd+slowhead", "full", "full+aug",
                               "full+dart+aug+slowhead")),
    # The study as specified: MT10, 10 and 50 demonstrations, bigger models and budgets (a GPU machine).
    "full": Budget(name="full", tasks=MT10, demos=(10, 50), stage1_sizes=(5, 15, 50), stage1_steps=20000,
                   stage2_preset="small", stage2_steps=5000, stage2_batch_size=32,
                   stage2_learning_rate=3e-4, distill_hold_steps=500, distill_decay_steps=1000, eval_every=1000,
                   eval_episodes=20, eval_max_steps=500),
}


@dataclass
class Job:
    """One process of the study: its name, command line, the file whose existence means it is done, and its log."""

    name: str
    argv: list[str]
    done: str
    log: str


# --------------------------------------------------------------------------------------------- plan
def _py() -> str:
    return sys.executable


def stage1_corpus_plan(budget: Budget) -> list[tuple[str, dict]]:
    """``[(simulator, generate(...) keyword arguments)]`` of the Stage-1 corpus at its largest size."""
    from modeling_actprior.sim.metaworld_expert import TASKS as MW_TASKS

    n = max(budget.stage1_sizes)
    mw = budget.stage1_metaworld_tasks or tuple(t for t in MW_TASKS if t not in MT10)
    overlap = sorted(set(mw) & set(MT10))
    if overlap:
        raise ValueError(f"Stage-1 Meta-World tasks must exclude MT10 (evaluated downstream); got {overlap}.")
    plan = [("metaworld", dict(episodes=n, tasks=mw))]
    if budget.stage1_pybullet:
        plan.append(("pybullet", dict(episodes=n)))
    if budget.stage1_robosuite:
        plan.append(("robosuite", dict(episodes=n, robots=budget.stage1_robosuite_robots,
                                       tasks=budget.stage1_robosuite_tasks)))
    return plan


def generate_data(out: str, budget: Budget, workers: int, seed: int) -> dict[str, list[str]]:
    """Generate (or reuse) the Stage-1 corpus and the demonstrations; returns their dataset folders."""
    from modeling_actprior.sim.generate import generate

    data = os.path.join(out, "data")
    stage1 = {}
    for sim, kw in stage1_corpus_plan(budget):
        target = os.path.join(data, "stage1", sim)
        if not os.path.isdir(target):
            logger.info("generating the Stage-1 corpus: %s, %s episodes per task", sim, kw["episodes"])
            generate(sim, target, workers=workers, seed=seed, **kw)
        else:
            logger.info("Stage-1 corpus: using %s", target)
        stage1[sim] = target
    demos = os.path.join(data, "demos")
    if not os.path.isdir(demos):
        logger.info("generating demonstrations: %s, %d per task, %d px images", ",".join(budget.tasks),
                    max(budget.demos), budget.image_size)
        generate("metaworld", demos, episodes=max(budget.demos), tasks=budget.tasks, image_size=budget.image_size,
                 workers=workers, seed=seed)
    else:
        logger.info("demonstrations: using %s", demos)
    data_paths = {"stage1": stage1, "demos": demos}
    if set(budget.variants) & set(CORRECTIVE_VARIANTS):
        corrective = os.path.join(data, "demos_corrective")
        if not os.path.isdir(corrective):
            logger.info("generating corrective demonstrations (action noise %g): %d per task", budget.demo_action_noise,
                        max(budget.demos))
            generate("metaworld", corrective, episodes=max(budget.demos), tasks=budget.tasks,
                     image_size=budget.image_size, workers=workers, seed=seed, action_noise=budget.demo_action_noise)
        data_paths["demos_corrective"] = corrective
    return data_paths


def plan_jobs(out: str, budget: Budget, data: dict) -> tuple[list[Job], list[Job]]:
    """The Stage-1 jobs (one prior per corpus size) and the Stage-2 jobs (train + closed loop)."""
    stage1_jobs, stage2_jobs = [], []
    largest = max(budget.stage1_sizes)
    for size in budget.stage1_sizes:
        run = prior_dir(out, budget, size)
        # The first `size` episodes of every task of every robot: smaller corpora are subsets of the larger.
        argv = [_py(), "-m", "modeling_actprior.training.stage1", "--dataset", *data["stage1"].values()]
        argv += ["--max_episodes_per_task", str(size), "--output_dir", run, "--max_steps", str(budget.stage1_steps),
                 "--model_preset", budget.stage1_preset, "--batch_size", str(budget.stage1_batch_size),
                 "--learning_rate", str(budget.stage1_learning_rate), "--eval_every", "250",
                 "--checkpoint_every", "500", "--log_every", "50", "--no_progress", "--resume_from_checkpoint",
                 "latest", "--seed", "0", *budget.stage1_options]
        stage1_jobs.append(Job(f"stage1/size{size}", argv, os.path.join(run, "final", "eval_results.json"),
                               os.path.join(out, "logs", f"stage1_size{size:03d}.log")))
    main_demos = budget.demos[0]
    for demos in budget.demos:
        for variant in budget.variants:
            if demos != main_demos and budget.demos_variants is not None and variant not in budget.demos_variants:
                continue
            sizes = budget.stage1_sizes if variant == budget.scaling_variant and demos == main_demos else (largest,)
            for size in sizes:
                for seed in budget.seeds:
                    name = stage2_name(demos, variant, size, seed, largest)
                    run = os.path.join(out, "stage2", name)
                    prior = os.path.join(prior_dir(out, budget, size), "final")
                    argv = [_py(), "-m", "modeling_actprior.study", "_stage2_job", "--out", out,
                            "--budget-json", os.path.join(out, "budget.json"), "--run", run, "--prior", prior,
                            "--demos", str(demos), "--variant", variant, "--seed", str(seed)]
                    if size != largest or (demos != main_demos and budget.demos_variants is not None):
                        argv.append("--final-only")
                    stage2_jobs.append(Job(f"stage2/{name}", argv, os.path.join(run, "closed_loop.json"),
                                           os.path.join(out, "logs", f"{name}.log")))
    return stage1_jobs, stage2_jobs


def prior_dir(out: str, budget: Budget, size: int) -> str:
    """Run folder of the prior trained on ``size`` episodes per task (``stage1/`` when there is only one size)."""
    return os.path.join(out, "stage1") if len(budget.stage1_sizes) == 1 else os.path.join(out, "stage1", f"size{size:03d}")


def stage2_name(demos: int, variant: str, size: int, seed: int, largest: int) -> str:
    tag = variant.replace("+", "_")
    return f"demos{demos:03d}_{tag}" + ("" if size == largest else f"_prior{size:03d}") + f"_seed{seed}"


# --------------------------------------------------------------------------------------------- running
def run_jobs(jobs: Sequence[Job], parallel: int, threads: int, desc: str) -> list[str]:
    """Run ``jobs`` (skipping those already done) ``parallel`` at a time with ``threads`` torch threads each.
    Returns the names of failed jobs (their logs say why); a tqdm bar shows progress."""
    from tqdm.auto import tqdm

    todo = [j for j in jobs if not os.path.isfile(j.done)]
    if len(todo) < len(jobs):
        logger.info("%s: %d of %d jobs already done, reusing them", desc, len(jobs) - len(todo), len(jobs))
    if todo and len(todo) < parallel:  # fewer jobs than slots: give each the idle cores
        threads = max(threads, (os.cpu_count() or 1) // len(todo))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    failed = []

    def one(job: Job) -> tuple[Job, int, float]:
        os.makedirs(os.path.dirname(job.log), exist_ok=True)
        t0 = time.time()
        with open(job.log, "a") as log:
            log.write(f"$ {' '.join(job.argv)}\n")
            log.flush()
            rc = subprocess.call(job.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        return job, rc, time.time() - t0

    bar = tqdm(total=len(todo), desc=desc, unit="job")
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = [pool.submit(one, j) for j in todo]
        for fut in as_completed(futures):
            job, rc, secs = fut.result()
            ok = rc == 0 and os.path.isfile(job.done)
            bar.update(1)
            bar.write(f"  {'done' if ok else 'FAILED'} {job.name} in {secs:.0f} s" + ("" if ok else f" (log: {job.log})"))
            if not ok:
                failed.append(job.name)
    bar.close()
    return failed


def _stage2_job(args: argparse.Namespace) -> int:
    """Inside a job process: train one Stage-2 run, then roll out each of its checkpoints."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    with open(args.budget_json) as f:
        budget = Budget(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.load(f).items()})
    from modeling_actprior.training import stage2

    data = os.path.join(args.out, "data", "demos_corrective" if args.variant in CORRECTIVE_VARIANTS else "demos")
    final = os.path.join(args.run, "final")
    if not os.path.isfile(os.path.join(final, "eval_results.json")):
        argv = ["--dataset", data, "--prior", args.prior, "--output_dir", args.run,
                "--baseline", VARIANTS[args.variant], "--max_episodes_per_task", str(args.demos),
                "--model_preset", budget.stage2_preset, "--max_steps", str(budget.stage2_steps),
                "--batch_size", str(budget.stage2_batch_size), "--learning_rate", str(budget.stage2_learning_rate),
                "--warmup_steps", str(min(50, budget.stage2_steps // 10)), "--seed", str(args.seed),
                "--distill_hold_steps", str(budget.distill_hold_steps),
                "--distill_decay_steps", str(budget.distill_decay_steps),
                "--checkpoint_every", str(budget.eval_every or budget.stage2_steps),
                "--keep_last", str(len(budget.eval_steps) + 1), "--eval_every", str(budget.eval_every or 0),
                "--val_fraction", "0.1", "--log_every", "25", "--no_progress", "--resume_from_checkpoint", "latest",
                *VARIANT_OPTIONS.get(args.variant, ())]
        stage2.main(argv)
    if not budget.closed_loop:
        write_json(os.path.join(args.run, "closed_loop.json"), {"run": args.run, "steps": []})
        return 0
    closed = evaluate_checkpoints(args.run, budget, seed=args.seed, final_only=args.final_only)
    # What the chunk depends on is measured on the clean demonstrations for every variant.
    sensitivity_file(args.run, os.path.join(args.out, "data", "demos"))
    write_json(os.path.join(args.run, "closed_loop.json"), closed)
    return 0


def evaluate_checkpoints(run: str, budget: Budget, seed: int = 0, final_only: bool = False) -> dict:
    """Closed-loop success of the run's checkpoints at ``budget.eval_steps`` (the last is ``final/``; with
    ``final_only`` only that one)."""
    from transformers import pipeline

    from modeling_actprior.rollout import evaluate
    from modeling_actprior.runs import find_run, load_checkpoint_weights, load_vla

    found = find_run(run)
    by_step = dict(found.checkpoints)
    model = processor = None  # loaded on first need; `loaded_step` says whose weights it holds
    loaded_step = None
    out = {"run": run, "steps": []}
    for step in budget.eval_steps[-1:] if final_only else budget.eval_steps:
        path = os.path.join(run, f"closed_loop_step{step:06d}.json")
        if not os.path.isfile(path):
            if step != budget.stage2_steps and step not in by_step:
                raise FileNotFoundError(f"{run}: no checkpoint of step {step} to evaluate (have {sorted(by_step)}).")
            if model is None or (step == budget.stage2_steps and loaded_step != step):
                model, processor = load_vla(found.final)
                loaded_step = budget.stage2_steps
            if step != budget.stage2_steps:
                load_checkpoint_weights(model, by_step[step])
                loaded_step = step
            robot = pipeline("robot-action", model=model, processor=processor, device="cpu")
            # One evaluation scene set for every run: seeds of the study, not of the training run.
            evaluate(f"{run}@{step}", sim="metaworld", tasks=budget.tasks, episodes=budget.eval_episodes, out=path,
                     seed=budget.eval_seed, max_steps=budget.eval_max_steps, image_size=budget.image_size,
                     progress=False, robot_pipeline=robot)
        with open(path) as f:
            res = json.load(f)
        out["steps"].append({"step": step, "successes": res["overall"]["successes"],
                             "episodes": res["overall"]["episodes"],
                             "tasks": {t["task"]: [t["successes"], t["episodes"]] for t in res["tasks"]},
                             # per task, each episode's success in scene order: what the paired statistics pair
                             "outcomes": {t["task"]: [bool(e["success"]) for e in t["episodes_detail"]]
                                          for t in res["tasks"]}})
    return out


# --------------------------------------------------------------------------------------------- statistics
def episode_outcomes(run: dict, index: int, seed: int) -> dict[tuple, bool]:
    """``{(training seed, task, scene index): success}`` of the closed-loop step ``index`` of a run's results (the
    scenes are the same for every run of a study, so these keys pair episodes across variants)."""
    step = run["steps"][index]
    return {(seed, task, i): bool(ok) for task, oks in step.get("outcomes", {}).items() for i, ok in enumerate(oks)}


# --------------------------------------------------------------------------------------------- summary
def summarize(out: str, budget: Budget) -> dict:
    """Collect every finished run into curves, final success, steps-to-baseline and the scaling axis."""

    largest = max(budget.stage1_sizes)
    summary = {"budget": dataclasses.asdict(budget), "demos": {}, "scaling": {}, "priors": {}}
    for size in budget.stage1_sizes:
        path = os.path.join(prior_dir(out, budget, size), "final", "eval_results.json")
        if os.path.isfile(path):
            with open(path) as f:
                res = json.load(f)
            ev = res["evaluation"]
            summary["priors"][str(size)] = {
                "episodes_per_task": size,
                "frames": int(sum(d["frames"] for d in res["corpus"]["datasets"])),
                "episodes": int(sum(d["episodes"] for d in res["corpus"]["datasets"])),
                "embodiments": len(ev),
                "prior_mse": float(np.mean([r["prior_mse"] for r in ev.values()])),
                "repeat_last_mse": float(np.mean([r["repeat_last_mse"] for r in ev.values()])),
            }

    def load(demos, variant, size, seed):
        path = os.path.join(out, "stage2", stage2_name(demos, variant, size, seed, largest), "closed_loop.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    for demos in budget.demos:
        per_variant = {}
        for variant in budget.variants:
            runs = {s: load(demos, variant, largest, s) for s in budget.seeds}
            runs = {s: r for s, r in runs.items() if r}
            if not runs:
                continue
            curve = []
            # Steps every seed evaluated (runs rolled out at their last step only have one).
            steps = sorted(set.intersection(*[{x["step"] for x in r["steps"]} for r in runs.values()]))
            for step in steps:
                at = [next(x for x in r["steps"] if x["step"] == step) for r in runs.values()]
                k = sum(x["successes"] for x in at)
                n = sum(x["episodes"] for x in at)
                rates = [x["successes"] / x["episodes"] for x in at]
                lo, hi = wilson_interval(k, n)
                curve.append({"step": step, "successes": k, "episodes": n, "success_rate": k / n if n else 0.0,
                              "ci95_low": lo, "ci95_high": hi, "seed_rates": rates,
                              "seed_std": float(np.std(rates, ddof=1)) if len(rates) > 1 else 0.0})
            tasks = {}
            for t in budget.tasks:
                k = sum(r["steps"][-1]["tasks"][t][0] for r in runs.values())
                n = sum(r["steps"][-1]["tasks"][t][1] for r in runs.values())
                tasks[t] = {"success_rate": k / n if n else 0.0, "ci95": list(wilson_interval(k, n))}
            final_outcomes = {}
            for seed_, r in runs.items():
                final_outcomes.update(episode_outcomes(r, -1, seed_))
            per_variant[variant] = {"seeds": sorted(runs), "curve": curve, "final": curve[-1], "tasks": tasks,
                                    "_outcomes": final_outcomes}
            sens = []
            for seed in runs:
                path = os.path.join(out, "stage2", stage2_name(demos, variant, largest, seed, largest), "sensitivity.json")
                if os.path.isfile(path):
                    with open(path) as f:
                        sens.append(json.load(f))
            if sens:
                per_variant[variant]["sensitivity"] = {k: float(np.mean([x[k] for x in sens])) for k in
                                                       ("mse_to_truth", "change_when_image_swapped",
                                                        "change_when_history_swapped")}
        base = per_variant.get(BASELINE)
        for v in per_variant.values():
            target = base["final"]["success_rate"] if base else None
            reach = next((c["step"] for c in v["curve"] if target is not None and c["success_rate"] >= target
                          and c["successes"] > 0), None)
            v["steps_to_baseline_final"] = reach
            v["steps_to_baseline_final_interpolated"] = (
                steps_to_reach(v["curve"], target) if target is not None and target > 0 else None)
        outcomes = {name: v.pop("_outcomes") for name, v in per_variant.items()}
        for name, v in per_variant.items():
            if base is not None and name != BASELINE:
                v["paired_vs_scratch"] = paired_difference(outcomes[name], outcomes[BASELINE])
        summary["demos"][str(demos)] = per_variant
    if budget.scaling_variant:
        demos = budget.demos[0]  # the main demonstration count (the scaling runs are planned there)
        for size in budget.stage1_sizes:
            runs = [load(demos, budget.scaling_variant, size, s) for s in budget.seeds]
            runs = [r for r in runs if r]
            if runs:
                k = sum(r["steps"][-1]["successes"] for r in runs)
                n = sum(r["steps"][-1]["episodes"] for r in runs)
                lo, hi = wilson_interval(k, n)
                prior = {f"prior_{k_}" if k_ == "episodes" else k_: v_
                         for k_, v_ in summary["priors"].get(str(size), {}).items()}
                summary["scaling"][str(size)] = {**prior, "successes": k, "episodes": n, "success_rate": k / n,
                                                 "ci95_low": lo, "ci95_high": hi, "seeds": len(runs)}
    return summary


# --------------------------------------------------------------------------------------------- entry
def run_study(out: str, budget: Budget, jobs: int | None = None, threads: int = 1, workers: int = 2,
              seed: int = 0) -> dict:
    """Run (or resume) the whole study into ``out``; returns the summary (also ``out/summary.json``)."""
    os.makedirs(out, exist_ok=True)
    jobs = jobs or max(1, (os.cpu_count() or 2) // threads)
    budget_path = os.path.join(out, "budget.json")
    if os.path.isfile(budget_path):
        with open(budget_path) as f:
            previous = json.load(f)
        if previous != json.loads(json.dumps(dataclasses.asdict(budget))):
            raise ValueError(f"{out} holds a study of another budget ({budget_path}); pick another --out or delete it.")
    write_json(budget_path, dataclasses.asdict(budget))
    # Seconds of each phase, kept from the run that did its work (a rerun that reuses it does not overwrite it).
    timings_path = os.path.join(out, "timings.json")
    timings = {}
    if os.path.isfile(timings_path):
        with open(timings_path) as f:
            timings = json.load(f)

    def timed(key, work_to_do, fn, *a):
        t = time.time()
        result = fn(*a)
        if work_to_do:
            timings[key] = time.time() - t
            write_json(timings_path, timings)
        return result

    pending = [os.path.join(out, "data", "stage1", sim) for sim, _ in stage1_corpus_plan(budget)]
    pending = any(not os.path.isdir(p) for p in [*pending, os.path.join(out, "data", "demos")])
    data = timed("generate_s", pending, generate_data, out, budget, workers, seed)
    stage1_jobs, stage2_jobs = plan_jobs(out, budget, data)
    failed = timed("stage1_s", any(not os.path.isfile(j.done) for j in stage1_jobs), run_jobs, stage1_jobs, jobs,
                   threads, "stage 1 priors")
    if failed:
        raise RuntimeError(f"Stage-1 jobs failed: {failed}; see their logs under {out}/logs/.")
    failed = timed("stage2_s", any(not os.path.isfile(j.done) for j in stage2_jobs), run_jobs, stage2_jobs, jobs,
                   threads, "stage 2 runs + closed loop")
    for job in stage2_jobs:
        run = os.path.dirname(job.done)
        if budget.closed_loop and os.path.isfile(job.done) and "--final-only" not in job.argv:
            sensitivity_file(run, data["demos"])
    summary = summarize(out, budget) if budget.closed_loop else {"runs": [os.path.dirname(j.done) for j in stage2_jobs]}
    summary["failed_jobs"] = failed
    summary["timings"] = timings
    summary["machine"] = {"cpus": os.cpu_count(), "jobs": jobs, "threads_per_job": threads}
    write_json(os.path.join(out, "summary.json"), summary)
    if failed:
        logger.error("%d Stage-2 jobs failed (%s); the summary covers the rest. Rerun to retry them.", len(failed),
                     ", ".join(failed))
    return summary


def _main_job(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser()
    for a in ("--out", "--budget-json", "--run", "--prior", "--variant"):
        p.add_argument(a, required=True)
    p.add_argument("--demos", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--final-only", action="store_true")
    return _stage2_job(p.parse_args(argv))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_stage2_job":
        sys.exit(_main_job(sys.argv[2:]))
    raise SystemExit("usage: python benchmarks/prior_vs_scratch.py --budget small (this module runs the study's jobs)")
