"""Generate LeRobot datasets of scripted-expert demonstrations: ``actprior generate --sim ...``.

One call writes one LeRobot dataset per embodiment (a LeRobot dataset has a single ``robot_type``):
with one robot the dataset is written at ``out``; with several, at ``out/<embodiment>/``.

Every (robot, task, episode number) is one job whose random seed is derived from
``(seed, sim, task, robot, episode number, attempt)``, so reruns reproduce the same data, with any
number of workers: jobs run in a ``spawn`` process pool and their results are written in job order.
Only successful episodes are written; a job whose expert failed ``max_attempts`` seeds in a row is
dropped and counted in the provenance block of ``meta/info.json`` (``actprior.generator``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import multiprocessing as mp
import os
import platform
import time
from collections.abc import Sequence

from ..argtypes import MAX_IMAGE_SIZE, MAX_SEED, MIN_IMAGE_SIZE, float_in, int_at_least
from . import CAMERA_NAME, DEFAULT_MAX_ATTEMPTS, EpisodeResult, check_choices

logger = logging.getLogger(__name__)

SIMULATORS = ("metaworld", "robosuite", "pybullet")
#: File in the parent folder of a several-robot corpus while ``generate`` is still writing it.
INCOMPLETE_MARKER = ".actprior-generate-incomplete.json"
_MODULES = {
    "metaworld": "modeling_actprior.sim.metaworld_expert",
    "robosuite": "modeling_actprior.sim.robosuite_expert",
    "pybullet": "modeling_actprior.sim.pybullet_expert",
}
_SIM_PACKAGES = {"metaworld": ("metaworld", "mujoco"), "robosuite": ("robosuite", "mujoco"), "pybullet": ("pybullet",)}


def sim_module(sim: str):
    """The expert module of ``sim`` (a ValueError listing the simulators for an unknown name)."""
    if sim not in SIMULATORS:
        raise ValueError(f"Unknown simulator {sim!r}. Valid simulators: {', '.join(SIMULATORS)}.")
    return importlib.import_module(_MODULES[sim])


def resolve(sim: str, tasks: Sequence[str] | None = None, robots: Sequence[str] | None = None):
    """Validate names; returns ``(module, tasks, robots)`` with defaults filled in. No simulator is imported."""
    mod = sim_module(sim)
    tasks = check_choices("task", tasks, mod.TASKS, mod.DEFAULT_TASKS, sim)
    robots = check_choices("robot", robots, mod.ROBOTS, mod.DEFAULT_ROBOTS, sim)
    return mod, tasks, robots


def _run_job(job: tuple) -> EpisodeResult:
    sim, task, robot, episode, seed, image_size, max_attempts, action_noise = job
    kw = {"action_noise": action_noise} if action_noise else {}
    return sim_module(sim).collect_episode(task, robot, episode, seed, image_size, max_attempts, **kw)


def _versions(sim: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in _SIM_PACKAGES[sim]:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _check_installed(sim: str) -> None:
    import importlib.util

    missing = [p for p in _SIM_PACKAGES[sim] if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(
            f"Simulator {sim!r} needs {', '.join(missing)}, which is not installed. "
            'Install the simulators with: pip install "actprior[sim]" '
            "(mujoco==3.3.0, metaworld, robosuite==1.5.2, pybullet)."
        )


def generate(
    sim: str,
    out: str,
    episodes: int,
    tasks: Sequence[str] | None = None,
    robots: Sequence[str] | None = None,
    image_size: int | None = None,
    workers: int = 1,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    action_noise: float = 0.0,
    video: str | None = None,
) -> list[str]:
    """Generate expert demonstrations in ``sim`` and write them as LeRobot v3 dataset(s).

    Args:
        sim: one of ``SIMULATORS``.
        out: dataset folder (one robot) or parent folder of ``<embodiment>/`` datasets (several robots).
        episodes: successful episodes per task per robot.
        tasks / robots: names from the simulator module's ``TASKS`` / ``ROBOTS`` (defaults: its
            ``DEFAULT_TASKS`` / ``DEFAULT_ROBOTS``); a comma-separated string is accepted too.
        image_size: record one ``image_size`` x ``image_size`` RGB camera (``observation.images.front``);
            ``None`` records states and actions only.
        workers: processes; ``> 1`` uses a ``spawn`` pool. The output does not depend on it.
        seed: base seed of every episode.
        overwrite: replace existing dataset folders. Without it, datasets that an earlier (interrupted) run of
            the same request completed are kept and only the missing robots are generated; any other existing
            folder is an error.
        progress: show a tqdm bar.
        max_attempts: seeds tried per episode before it is dropped.
        action_noise: corrective demonstrations (DART): the standard deviation of Gaussian noise, in the action's own
            units, added to every *executed* action while the *recorded* action stays the expert's clean one for the
            state the perturbation led to. Training histories then look like the imperfect ones a policy sees in
            closed loop, and the labels show how to recover. Meta-World and robosuite (whose experts react to the
            state); 0 (default) records the expert as is. Recorded in the provenance (``action_noise``).
        video: store the camera as MP4 the way ``lerobot-record`` does (``"av1"``, LeRobot's default, or ``"h264"``;
            ``videos/observation.images.front/chunk-XXX/file-XXX.mp4``) instead of PNG frames in the parquet files.

    Returns:
        The dataset roots, one per robot, in the order of ``robots`` (those kept from an earlier run included).
    """
    mod, tasks, robots = resolve(sim, tasks, robots)
    if int(episodes) <= 0:
        raise ValueError(f"episodes must be a positive number of episodes per task per robot; got {episodes}.")
    if image_size is not None and not MIN_IMAGE_SIZE <= int(image_size) <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be a number of pixels in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] (the "
                         f"simulators' offscreen framebuffers) or None; got {image_size}.")
    if int(workers) <= 0:
        raise ValueError(f"workers must be >= 1; got {workers}.")
    action_noise = float(action_noise)
    if not (math.isfinite(action_noise) and 0.0 <= action_noise <= 1.0):
        raise ValueError(f"action_noise must be a standard deviation in [0, 1] action units; got {action_noise}.")
    if action_noise and sim == "pybullet":
        raise ValueError("action_noise is not supported for pybullet: its IK expert follows a fixed waypoint plan and "
                         "cannot correct a perturbation. Use --sim metaworld or robosuite.")
    if video is not None and image_size is None:
        raise ValueError("video needs a camera: pass image_size (--image-size) too.")
    _check_installed(sim)
    from modeling_actprior.data.lerobot import LeRobotDatasetWriter, check_replaceable, undo_interrupted_writes

    image_size = int(image_size) if image_size is not None else None
    out = os.path.abspath(os.fspath(out))
    roots = {r: (out if len(robots) == 1 else os.path.join(out, r)) for r in robots}
    for root in roots.values():
        undo_interrupted_writes(root)  # what a killed earlier run left beside each dataset
    if overwrite:
        for root in roots.values():
            if os.path.lexists(root):
                check_replaceable(root)  # before any episode is simulated: never a user's folder
    done: set[str] = set()
    if not overwrite:
        # A rerun after an interruption keeps the robots already written by the same request (generation is
        # deterministic, so they are what it would write again) and does the rest.
        existing = [r for r in robots if os.path.exists(roots[r])]
        request = dict(sim=sim, tasks=list(tasks), episodes_per_task=int(episodes), seed=int(seed),
                       image_size=image_size, max_attempts=int(max_attempts), action_noise=action_noise, video=video)
        done = {r for r in existing if _written_by(roots[r], dict(request, robot=r))}
        other = [roots[r] for r in existing if r not in done]
        if other:
            raise FileExistsError(
                f"{', '.join(other)} already exist(s) and were not generated by this request (other sim, tasks, "
                "episodes, seed, image size or max attempts); pass overwrite=True (--overwrite) to replace them, or "
                "choose another --out.")
        if done:
            logger.info("keeping the complete dataset(s) of an earlier run of this request: %s",
                        ", ".join(roots[r] for r in robots if r in done))
    jobs = [(sim, t, r, i, int(seed), image_size, int(max_attempts), action_noise)
            for r in robots if r not in done for t in tasks for i in range(int(episodes))]
    marker = os.path.join(out, INCOMPLETE_MARKER) if len(robots) > 1 else None
    if not jobs:
        if marker and os.path.exists(marker):
            os.remove(marker)
        return [roots[r] for r in robots]
    if marker:
        # A corpus of several robots is complete only when every robot is: until then the parent folder says so, and
        # training refuses it (``training.parse_dataset_specs``).
        from modeling_actprior.training import write_json

        os.makedirs(out, exist_ok=True)
        write_json(marker, {"generator": "modeling_actprior.sim.generate", "sim": sim, "robots": list(robots),
                            "complete": sorted(done), "command": _command(sim, out, episodes, tasks, robots, seed,
                                                                          image_size, action_noise, video)})

    pool = None
    if int(workers) > 1:
        pool = mp.get_context("spawn").Pool(min(int(workers), len(jobs)))
        results = pool.imap(_run_job, jobs, chunksize=1)  # ordered: output is independent of scheduling
    else:
        results = map(_run_job, jobs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=f"{sim} episodes", unit="ep")

    writer, current, stats = None, None, {}
    t0 = time.perf_counter()
    try:
        for res in results:
            if res.robot != current:
                if writer is not None:
                    _finish(writer, stats, t0)
                current = res.robot
                spec = mod.embodiment(current)
                stats = {"attempts": 0, "successes": 0, "failed_jobs": [], "steps": 0}
                provenance = {
                    "generator": "modeling_actprior.sim.generate",
                    "sim": sim, "robot": current, "tasks": list(tasks), "episodes_per_task": int(episodes),
                    "seed": int(seed), "image_size": image_size, "max_attempts": int(max_attempts),
                    "action_noise": action_noise, "video": video,
                    "instructions": {t: mod.INSTRUCTIONS[t] for t in tasks},
                    "versions": _versions(sim), "python": platform.python_version(),
                    "command": _command(sim, out, episodes, tasks, robots, seed, image_size, action_noise, video),
                }
                writer = LeRobotDatasetWriter(
                    roots[current], spec, fps=spec.fps, state_names=mod.state_names(current),
                    camera_names=(CAMERA_NAME,) if image_size else (), image_size=image_size,
                    provenance=provenance, overwrite=overwrite, video_codec=video)
            stats["attempts"] += res.attempts
            stats["steps"] += res.steps
            if res.episode is not None:
                stats["successes"] += 1
                writer.add_episode(res.episode)
            else:
                stats["failed_jobs"].append({"task": res.task, "episode": res.episode_index, "seeds": res.seeds})
                logger.warning("%s: expert failed %s/%s episode %d in %d attempts; episode dropped.",
                               sim, res.robot, res.task, res.episode_index, res.attempts)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(robot=res.robot, task=res.task, success=f"{stats['successes']}/{stats['attempts']}")
        if writer is not None:
            _finish(writer, stats, t0)
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    if marker:
        os.remove(marker)
    return [roots[r] for r in robots]


def _command(sim, out, episodes, tasks, robots, seed, image_size, action_noise, video=None) -> str:
    """The ``actprior generate`` command line of a request."""
    return (f"actprior generate --sim {sim} --out {out} --episodes {episodes} --tasks {','.join(tasks)} "
            f"--robots {','.join(robots)} --seed {seed}" + (f" --image-size {image_size}" if image_size else "")
            + (f" --action-noise {action_noise:g}" if action_noise else "")
            + (f" --video {video}" if video else ""))


def _written_by(root: str, request: dict) -> bool:
    """True if ``root`` is a complete, self-consistent dataset that ``generate`` wrote for ``request`` (the
    ``actprior.generator`` block of its meta/info.json holds the same sim, robot, tasks, episodes, seed, image size
    and max attempts). The writer renames a dataset into place only once it is complete."""
    from modeling_actprior.data.lerobot import DatasetFormatError, LeRobotDatasetMeta

    try:
        meta = LeRobotDatasetMeta(root)
    except (OSError, ValueError, DatasetFormatError):
        return False
    generator = (meta.info.get("actprior") or {}).get("generator") or {}
    defaults = {"action_noise": 0.0, "video": None}  # datasets written before the option existed recorded the expert as is
    return all(generator.get(k, defaults.get(k)) == v for k, v in request.items())


def _finish(writer, stats: dict, t0: float) -> str:
    if writer.num_episodes == 0:
        writer.abort()
        raise RuntimeError(
            f"No successful episode for {writer.spec.name}: the expert failed every attempt "
            f"({stats['attempts']} attempts). Nothing was written at {writer.root}."
        )
    writer.provenance.update({
        "attempts": stats["attempts"],
        "successful_episodes": stats["successes"],
        "expert_success_rate": stats["successes"] / max(stats["attempts"], 1),
        "failed_jobs": stats["failed_jobs"],
        "simulator_steps": stats["steps"],
    })
    return writer.finalize()


# ------------------------------------------------------------------------------------------------ CLI
def _csv(s: str) -> list[str]:
    return [p for p in (x.strip() for x in s.split(",")) if p]


def add_generate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``actprior generate``."""
    parser.add_argument("--sim", required=True, choices=SIMULATORS, help="simulator to generate in")
    parser.add_argument("--out", required=True, help="dataset folder (one robot) or parent of <embodiment>/ folders")
    parser.add_argument("--episodes", type=int_at_least(1), required=True, help="successful episodes per task per robot")
    parser.add_argument("--tasks", type=_csv, default=None,
                        help="comma-separated task names (default: Meta-World MT10; all robosuite/pybullet tasks)")
    parser.add_argument("--robots", type=_csv, default=None,
                        help="comma-separated embodiment names (default: sawyer / panda / all pybullet arms)")
    parser.add_argument("--image-size", type=int_at_least(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), default=None,
                        help="record one square RGB camera of this size (pixels)")
    parser.add_argument("--workers", type=int_at_least(1), default=1, help="worker processes (spawn pool)")
    parser.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0, help="base seed of every episode")
    parser.add_argument("--max-attempts", type=int_at_least(1), default=DEFAULT_MAX_ATTEMPTS,
                        help="seeds tried per episode before it is dropped")
    parser.add_argument("--action-noise", type=float_in(0, 1), default=0.0, metavar="SIGMA",
                        help="corrective demonstrations (DART): Gaussian noise of this standard deviation, in action "
                             "units, on every executed action; the recorded label stays the expert's clean action "
                             "(metaworld, robosuite; default 0)")
    parser.add_argument("--video", nargs="?", const="av1", default=None, choices=("av1", "h264"),
                        help="store the camera as LeRobot-style MP4 (AV1 by default, as lerobot-record writes; or "
                             "h264) instead of PNG frames in the parquet files; needs --image-size")
    parser.add_argument("--overwrite", action="store_true", help="replace existing dataset folders")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_generate(args: argparse.Namespace) -> list[str]:
    roots = generate(
        args.sim, args.out, args.episodes, tasks=args.tasks, robots=args.robots,
        image_size=args.image_size, workers=args.workers, seed=args.seed, overwrite=args.overwrite,
        progress=not getattr(args, "no_progress", False),
        max_attempts=getattr(args, "max_attempts", DEFAULT_MAX_ATTEMPTS),
        action_noise=getattr(args, "action_noise", 0.0), video=getattr(args, "video", None),
    )
    for root in roots:
        print(root)
    return roots


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = add_generate_arguments(argparse.ArgumentParser(prog="actprior generate", description=__doc__.splitlines()[0]))
    return run_generate(parser.parse_args(argv))


if __name__ == "__main__":
    main()
