"""Closed-loop evaluation: roll a VLA checkpoint out in a simulator through the ``robot-action`` pipeline.

``actprior evaluate --model PATH --sim metaworld --tasks reach-v3,push-v3 --episodes 20 --out results.json``

Each episode resets the task's environment with an evaluation seed, then repeats: render the camera the
demonstrations were recorded with (same camera, same size), ask the pipeline for a chunk given the instruction and
the last ``K`` executed actions, execute the first ``execute_steps`` actions of the chunk (action chunking), until the
environment reports success or ``max_steps`` pass. Environments are built once per task and reused.

Evaluation seeds: ``episode_seed(seed, "<sim>/eval", task, robot, episode)``. The demonstration generators derive
theirs from ``episode_seed(seed, "<sim>", ...)``; the different namespace gives a different SHA-256 stream, so
evaluation scenes are not the training scenes (``evaluation_seeds`` checks a run against a generator's seeds).

Results (JSON): per task the success rate with a 95% Wilson score interval, the mean steps to success, and each
episode's seed, success and length; the same overall. A PNG bar chart (success per task with interval whiskers) and,
with ``video_dir``, MP4 rollout videos (H.264 through PyAV; ``video_format="gif"`` for GIFs) are written beside it.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .argtypes import MAX_IMAGE_SIZE, MAX_SEED, MIN_IMAGE_SIZE, int_at_least
from .success_stats import wilson_interval

logger = logging.getLogger(__name__)

EVAL_SIMULATORS = ("metaworld", "robosuite")
DEFAULT_EXECUTE_STEPS = 8
DEFAULT_IMAGE_SIZE = 64  # the demonstration generators' default camera size


def eval_namespace(sim: str) -> str:
    """The ``sim`` field of ``episode_seed`` for evaluation episodes (the generators use ``sim`` itself)."""
    return f"{sim}/eval"


def evaluation_seeds(seed: int, sim: str, task: str, robot: str, episodes: int) -> list[int]:
    """Environment seeds of evaluation episodes ``0..episodes-1``."""
    from modeling_actprior.sim import episode_seed

    return [episode_seed(seed, eval_namespace(sim), task, robot, i) for i in range(int(episodes))]


# ------------------------------------------------------------------------------------------ simulators
class _MetaWorldTask:
    """One Meta-World task, with the generator's environment and camera (``corner2``, upright, shadows off)."""

    robot = "sawyer"

    def __init__(self, task: str, image_size: int):
        from modeling_actprior.sim import metaworld_expert as mw

        self.mw, self.task, self.size = mw, task, image_size
        self.instruction = mw.instruction(task)
        self.env = mw._env(task)  # cached per task: reused across episodes (and with the generator)
        self.max_steps = int(self.env.max_path_length)

    def reset(self, seed: int) -> None:
        self.env.seed(seed)
        self.env.reset()

    def image(self) -> np.ndarray:
        return self.mw._render(self.env, self.task, self.size)

    def step(self, action: np.ndarray) -> tuple[bool, bool]:
        """``(success, episode over)``."""
        _, _, terminated, truncated, info = self.env.step(np.clip(action, -1.0, 1.0))
        return info.get("success", 0.0) > 0.5, bool(terminated or truncated)


class _RobosuiteTask:
    """One robosuite task on one arm, camera ``agentview`` upright, as the generator records it."""

    def __init__(self, task: str, image_size: int, robot: str = "panda"):
        from modeling_actprior.sim import robosuite_expert as rs

        self.rs, self.task, self.robot, self.size = rs, task, robot, image_size
        self.instruction = rs.instruction(task)
        self.env = rs._make_env(task, robot, image_size)
        self.max_steps = int(rs.MAX_STEPS[task])
        self._obs = None

    def reset(self, seed: int) -> None:
        self.rs._reseed(self.env, seed)
        self._obs = self.env.reset()

    def image(self) -> np.ndarray:
        return np.ascontiguousarray(self._obs["agentview_image"][::-1])

    def step(self, action: np.ndarray) -> tuple[bool, bool]:
        self._obs, _, done, _ = self.env.step(np.asarray(action, dtype=np.float64))
        return bool(self.env._check_success()), bool(done)


def _make_task(sim: str, task: str, image_size: int, robot: str | None):
    if sim == "metaworld":
        return _MetaWorldTask(task, image_size)
    if sim == "robosuite":
        return _RobosuiteTask(task, image_size, robot or "panda")
    raise ValueError(f"Closed-loop evaluation supports {', '.join(EVAL_SIMULATORS)}; got {sim!r}.")


# ------------------------------------------------------------------------------------------ rollouts
@dataclass
class EpisodeOutcome:
    task: str
    episode: int
    seed: int
    success: bool
    steps: int  # environment steps taken (to success, or until the episode ended)
    plans: int  # pipeline calls
    seconds: float
    video: str | None = None
    # Mean squared change between consecutive executed actions (raw units): at chunk switches, and within chunks.
    boundary_jump: float | None = None
    boundaries: int = 0
    within_step: float | None = None
    within_steps: int = 0


@dataclass
class TaskSummary:
    task: str
    instruction: str
    episodes: int
    successes: int
    success_rate: float
    ci95_low: float
    ci95_high: float
    mean_steps_to_success: float | None
    # Pooled over every chunk switch (and every within-chunk step) of the episodes: see run_episode.
    mean_boundary_jump: float | None = None
    mean_within_step: float | None = None
    episodes_detail: list[dict] = field(default_factory=list)


def run_episode(robot_pipeline, sim_task, seed: int, execute_steps: int, max_steps: int, embodiment: str,
                num_inference_steps: int | None = None, record: bool = False, inference_delay: int = 0,
                rtc: bool = False, max_guidance_weight: float | None = None):
    """One closed-loop episode. Returns ``(success, steps, plans, frames or None, smoothness)``.

    Every ``execute_steps`` (``s``) environment steps the pipeline sees the current image and the last ``K`` executed
    actions (raw units) and returns a chunk. With ``inference_delay`` ``d = 0`` the chunk's first ``s`` actions are
    executed (action chunking). With ``d > 0`` the delay is simulated as a real robot lives it: computing the chunk
    takes ``d`` control steps, during which the robot keeps executing the previous chunk (its next ``d`` actions);
    then it switches to the new chunk at the step the new chunk's index ``d`` stands for, and executes until the
    next observation, ``s`` steps after this one. The first chunk of an episode is waited for (nothing is executing
    yet). Naive switching (``rtc=False``) samples the new chunk freely; ``rtc=True`` passes what is left of the
    executing chunk as ``previous_chunk`` (real-time chunking: the committed ``d`` actions are kept exactly and the
    overlap is guided toward it). Needs ``d <= s`` and ``s + d <= chunk_size``.

    ``smoothness``: ``{"boundary": [...], "within": [...]}``, the mean squared change between consecutive executed
    actions (raw units, mean over the action's dimensions), where the executed action switches from one chunk to
    the next, and between two actions of the same chunk.
    """
    from modeling_actprior.sim import episode_seed

    s, d = max(1, int(execute_steps)), int(inference_delay)
    chunk_size = int(robot_pipeline.model.config.prior_config.chunk_size)
    if d < 0 or d > s or s + d > chunk_size:
        raise ValueError(f"inference_delay={d} with execute_steps={s} and chunk_size={chunk_size}: the delay must be "
                         "at most execute_steps, and execute_steps + delay at most the chunk, so the robot never runs "
                         "out of actions while the next chunk is computed.")
    sim_task.reset(seed)
    history: list[np.ndarray] = []
    frames = [] if record else None
    queue: list[tuple[np.ndarray, int]] = []  # (action, index of the chunk it comes from)
    last_source = None
    executing = None  # the chunk the queue's tail comes from, and the index of its next unqueued action
    offset = 0
    plans = 0
    smooth = {"boundary": [], "within": []}
    k = robot_pipeline.processor.history_length
    width = robot_pipeline.normalizer.spec(embodiment).action_dim
    limit = min(int(max_steps), sim_task.max_steps)
    for t in range(limit):
        if not queue:
            leftover = None if executing is None else executing[offset:]
            extra = {}
            if rtc and leftover is not None:
                extra = {"previous_chunk": leftover, "inference_delay": d}
                if max_guidance_weight is not None:
                    extra["max_guidance_weight"] = max_guidance_weight
            out = robot_pipeline(sim_task.image(), instruction=sim_task.instruction,
                                 history=np.asarray(history[-k:], dtype=np.float32).reshape(-1, width),
                                 embodiment=embodiment, num_inference_steps=num_inference_steps,
                                 seed=episode_seed(seed, "plan", sim_task.task, embodiment, plans), **extra)
            chunk = np.asarray(out["actions"])
            if leftover is None:  # the episode's first chunk: the robot waited for it
                queue = [(a, plans) for a in chunk[:s]]
            else:  # the robot executes d more of the previous chunk while this one is computed
                queue = [(a, plans - 1) for a in leftover[:d]] + [(a, plans) for a in chunk[d:s]]
            executing, offset = chunk, s
            plans += 1
        if record:
            frames.append(sim_task.image())
        action, source = queue.pop(0)
        if history:
            switch = source != last_source
            smooth["boundary" if switch else "within"].append(float(np.mean((action - history[-1]) ** 2)))
        last_source = source
        success, over = sim_task.step(action)
        history.append(np.asarray(action, dtype=np.float32))
        if success:
            return True, t + 1, plans, frames, smooth
        if over:
            break
    return False, len(history), plans, frames, smooth


def write_video(frames: Sequence[np.ndarray], path: str, fps: float) -> str:
    """Write ``frames`` ``(H, W, 3)`` uint8 to ``path``: ``.mp4`` (H.264 through PyAV, which plays everywhere) or
    ``.gif``. Should the MP4 encoder fail (a PyAV build without x264), a GIF is written next to it; returns the path
    written."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".mp4"):
        from modeling_actprior.data.video import write_mp4

        try:
            return write_mp4(frames, path, fps, codec="h264")
        except (ImportError, ValueError, OSError) as e:
            logger.warning("MP4 could not be written (%s: %s); writing a GIF.", type(e).__name__, e)
            path = path[:-4] + ".gif"
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(20, int(1000 / fps)), loop=0)
    return path


def plot_success(summary: dict, path: str) -> str:
    """Bar chart of the success rate per task (and overall) with 95% Wilson whiskers, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [*summary["tasks"], {"task": "overall", **summary["overall"]}]
    names = [r["task"] for r in rows]
    rate = np.array([r["success_rate"] for r in rows])
    low = rate - np.array([r["ci95_low"] for r in rows])
    high = np.array([r["ci95_high"] for r in rows]) - rate
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 3.5))
    colors = ["tab:blue"] * (len(rows) - 1) + ["tab:gray"]
    ax.bar(range(len(rows)), rate, yerr=np.stack([low, high]), capsize=4, color=colors)
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (95% Wilson CI)")
    ax.set_title(f"{summary['sim']}: {summary['overall']['episodes']} episodes, {os.path.basename(summary['model'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluate(model: str, sim: str = "metaworld", tasks: Sequence[str] | None = None, episodes: int = 10,
             out: str = "results.json", video_dir: str | None = None, video_episodes: int = 1,
             video_format: str = "mp4", seed: int = 0, execute_steps: int = DEFAULT_EXECUTE_STEPS,
             max_steps: int | None = None, image_size: int = DEFAULT_IMAGE_SIZE, embodiment: str | None = None,
             robot: str | None = None, num_inference_steps: int | None = None, device: str | None = None,
             progress: bool = True, robot_pipeline=None, inference_delay: int = 0, rtc: bool = False,
             max_guidance_weight: float | None = None) -> dict:
    """Roll ``model`` out on ``tasks`` for ``episodes`` each; write ``out`` (JSON) and a success chart beside it.

    Args:
        model: a VLA checkpoint folder or Hub id (loaded with ``pipeline("robot-action", model=...)``).
        sim / tasks / robot: simulator, its task names (default: its default task set) and arm (robosuite).
        episodes: episodes per task.
        video_dir: write the first ``video_episodes`` episodes of each task as ``<task>_ep<i>.<video_format>``.
        seed: base of the evaluation seeds (see the module docstring).
        execute_steps: actions executed from each chunk before re-planning.
        max_steps: step limit per episode (default: the task's own limit).
        image_size: camera size in pixels; must match the demonstrations the model was trained on.
        embodiment: the robot name the checkpoint knows this arm by (default: the simulator's robot name).
        robot_pipeline: an already built ``robot-action`` pipeline to roll out instead of loading ``model`` (which
            then only names it in the results), e.g. a run's intermediate checkpoint loaded in memory.
        inference_delay / rtc / max_guidance_weight: the simulated delay of each chunk in control steps, during which
            the previous chunk keeps executing, and whether the new chunk is made with real-time chunking (see
            ``run_episode``).
    Returns:
        The results dict written to ``out``.
    """
    import torch
    from transformers import pipeline

    import modeling_actprior  # noqa: F401  (registers the robot-action task)
    from modeling_actprior.sim import setup_rendering_env
    from modeling_actprior.sim.generate import _check_installed, resolve

    if int(episodes) < 1 or int(execute_steps) < 1 or not MIN_IMAGE_SIZE <= int(image_size) <= MAX_IMAGE_SIZE:
        raise ValueError(f"evaluate needs episodes >= 1, execute_steps >= 1 and image_size in [{MIN_IMAGE_SIZE}, "
                         f"{MAX_IMAGE_SIZE}]; got {episodes}, {execute_steps}, {image_size}.")
    if int(inference_delay) < 0 or int(inference_delay) > int(execute_steps):
        raise ValueError(f"inference_delay must be between 0 and execute_steps={execute_steps} (the robot executes "
                         f"the previous chunk meanwhile); got {inference_delay}.")
    if sim not in EVAL_SIMULATORS:
        raise ValueError(f"Closed-loop evaluation supports {', '.join(EVAL_SIMULATORS)}; got {sim!r}.")
    if video_format not in ("gif", "mp4"):
        raise ValueError(f"video_format must be 'gif' or 'mp4'; got {video_format!r}.")
    _check_installed(sim)
    setup_rendering_env()  # before MuJoCo is imported anywhere
    _, tasks, robots = resolve(sim, tasks, [robot] if robot else None)
    robot = robots[0]
    embodiment = embodiment or robot
    if robot_pipeline is None:
        from .checkpoint_paths import resolve_model_path

        model = resolve_model_path(model, "--model", "actprior_vla", "train_stage2.py makes one")
        robot_pipeline = pipeline("robot-action", model=model, device=device or ("cuda" if torch.cuda.is_available()
                                                                               else "cpu"))
    robot_pipeline.normalizer.spec(embodiment)  # fail before any rollout if the checkpoint lacks this robot
    chunk_size = int(robot_pipeline.model.config.prior_config.chunk_size)
    if int(execute_steps) + int(inference_delay) > chunk_size:
        raise ValueError(f"execute_steps={execute_steps} + inference_delay={inference_delay} exceeds the checkpoint's "
                         f"chunk of {chunk_size}: the robot would run out of actions while the next chunk is computed.")

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks) * int(episodes), desc=f"{sim} rollouts", unit="ep")
    t_start = time.perf_counter()
    summaries, all_outcomes = [], []
    try:
        for task in tasks:
            sim_task = _make_task(sim, task, int(image_size), robot)
            outcomes = []
            for i, env_seed in enumerate(evaluation_seeds(seed, sim, task, robot, episodes)):
                record = video_dir is not None and i < int(video_episodes)
                t0 = time.perf_counter()
                ok, steps, plans, frames, smooth = run_episode(
                    robot_pipeline, sim_task, env_seed, execute_steps, max_steps or sim_task.max_steps, embodiment,
                    num_inference_steps, record, int(inference_delay), bool(rtc), max_guidance_weight)
                outcome = EpisodeOutcome(task, i, env_seed, ok, steps, plans, time.perf_counter() - t0,
                                         boundary_jump=_mean(smooth["boundary"]), boundaries=len(smooth["boundary"]),
                                         within_step=_mean(smooth["within"]), within_steps=len(smooth["within"]))
                if record and frames:
                    fps = min(30.0, robot_pipeline.normalizer.spec(embodiment).fps)
                    outcome.video = write_video(frames, os.path.join(video_dir, f"{task}_ep{i}.{video_format}"), fps)
                outcomes.append(outcome)
                if bar is not None:
                    bar.update(1)
                    done = all_outcomes + outcomes
                    bar.set_postfix(success=f"{sum(o.success for o in done)}/{len(done)}")
            summaries.append(_summarize(task, sim_task.instruction, outcomes))
            all_outcomes += outcomes
    finally:
        if bar is not None:
            bar.close()

    overall = _summarize("overall", "", all_outcomes)
    results = {
        "model": str(model),
        "sim": sim,
        "robot": robot,
        "embodiment": embodiment,
        "tasks": [{k: v for k, v in asdict(s).items()} for s in summaries],
        "overall": {k: v for k, v in asdict(overall).items() if k not in ("task", "instruction", "episodes_detail")},
        "settings": {"episodes_per_task": int(episodes), "seed": int(seed), "seed_namespace": eval_namespace(sim),
                     "execute_steps": int(execute_steps), "max_steps": max_steps, "image_size": int(image_size),
                     "num_inference_steps": num_inference_steps, "inference_delay": int(inference_delay),
                     "rtc": bool(rtc), "max_guidance_weight": max_guidance_weight, "confidence": 0.95,
                     "interval": "wilson"},
        "seconds": time.perf_counter() - t_start,
        "python": platform.python_version(),
    }
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    chart = os.path.splitext(os.path.abspath(out))[0] + "_success.png"
    results["chart"] = os.path.basename(plot_success(results, chart))
    results["videos"] = [os.path.abspath(o.video) for o in all_outcomes if o.video]
    from modeling_actprior.training import write_json

    write_json(out, results)
    return results


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _pooled(outcomes: list[EpisodeOutcome], mean: str, count: str) -> float | None:
    """The mean over every event of the episodes, from each episode's mean and count."""
    pairs = [(getattr(o, mean), getattr(o, count)) for o in outcomes if getattr(o, mean) is not None]
    total = sum(c for _, c in pairs)
    return float(sum(m * c for m, c in pairs) / total) if total else None


def _summarize(task: str, instruction: str, outcomes: list[EpisodeOutcome]) -> TaskSummary:
    n, k = len(outcomes), sum(o.success for o in outcomes)
    low, high = wilson_interval(k, n)
    steps = [o.steps for o in outcomes if o.success]
    return TaskSummary(task, instruction, n, k, k / n if n else 0.0, low, high,
                       float(np.mean(steps)) if steps else None,
                       _pooled(outcomes, "boundary_jump", "boundaries"), _pooled(outcomes, "within_step", "within_steps"),
                       [{k_: v for k_, v in asdict(o).items() if k_ != "task"} for o in outcomes])


# ------------------------------------------------------------------------------------------ CLI
def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="VLA checkpoint folder or Hub id")
    parser.add_argument("--sim", default="metaworld", choices=EVAL_SIMULATORS)
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: the simulator's set)")
    parser.add_argument("--robot", default=None, help="arm (robosuite; default panda)")
    parser.add_argument("--embodiment", default=None, help="the checkpoint's name for the arm (default: --robot)")
    parser.add_argument("--episodes", type=int_at_least(1), default=10, help="episodes per task")
    parser.add_argument("--out", default="results.json", help="results JSON (the chart PNG is written beside it)")
    parser.add_argument("--video-dir", default=None, help="write rollout videos here")
    parser.add_argument("--video-episodes", type=int_at_least(0), default=1, help="episodes per task recorded with --video-dir")
    parser.add_argument("--video-format", default="mp4", choices=("mp4", "gif"),
                        help="rollout videos as MP4 (H.264, default) or GIF")
    parser.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0, help="base of the evaluation seeds")
    parser.add_argument("--execute-steps", type=int_at_least(1), default=DEFAULT_EXECUTE_STEPS,
                        help="actions executed from each chunk before re-planning")
    parser.add_argument("--max-steps", type=int_at_least(1), default=None, help="step limit per episode (default: the task's)")
    parser.add_argument("--image-size", type=int_at_least(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), default=DEFAULT_IMAGE_SIZE,
                        help="camera size of the training data")
    parser.add_argument("--num-inference-steps", type=int_at_least(1), default=None,
                        help="flow steps (default: the checkpoint's)")
    parser.add_argument("--inference-delay", type=int_at_least(0), default=0,
                        help="simulated chunk latency in control steps: the previous chunk keeps executing meanwhile")
    parser.add_argument("--rtc", action=argparse.BooleanOptionalAction, default=False,
                        help="real-time chunking: keep the committed actions and guide the overlap toward the "
                             "executing chunk (default: naive switching)")
    parser.add_argument("--max-guidance-weight", type=float, default=None,
                        help="real-time chunking's guidance cap (default 5)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run_evaluate(args: argparse.Namespace) -> int:
    results = evaluate(args.model, args.sim, args.tasks, args.episodes, args.out, args.video_dir, args.video_episodes,
                       args.video_format, args.seed, args.execute_steps, args.max_steps, args.image_size,
                       args.embodiment, args.robot, args.num_inference_steps, args.device, not args.no_progress,
                       inference_delay=args.inference_delay, rtc=args.rtc,
                       max_guidance_weight=args.max_guidance_weight)
    for row in results["tasks"]:
        print(f"{row['task']:<28} {row['successes']:>3}/{row['episodes']:<3} success "
              f"{row['success_rate']:.2f} [{row['ci95_low']:.2f}, {row['ci95_high']:.2f}]")
    o = results["overall"]
    print(f"{'overall':<28} {o['successes']:>3}/{o['episodes']:<3} success {o['success_rate']:.2f} "
          f"[{o['ci95_low']:.2f}, {o['ci95_high']:.2f}] -> {args.out}")
    if o.get("mean_boundary_jump") is not None:
        print(f"mean squared action change: {o['mean_boundary_jump']:.4g} at chunk switches, "
              f"{o['mean_within_step'] or 0:.4g} within chunks (delay {args.inference_delay}, "
              f"{'rtc' if args.rtc else 'naive switching'})")
    return 0


__all__ = ["EpisodeOutcome", "evaluate", "evaluation_seeds", "plot_success", "run_episode", "wilson_interval",
           "write_video"]
