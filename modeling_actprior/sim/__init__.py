"""Scripted-expert demonstration generators for the simulators the default corpus comes from.

Three simulators, all installed from PyPI (``pip install "actprior[sim]"``), each with a module exposing
the same contract:

==============  ==================================  ======================================================
module          robots (embodiment names)           tasks
==============  ==================================  ======================================================
metaworld       ``sawyer`` (4-D ee delta + grip)    the 50 Meta-World v3 tasks (MT10 by default); the
                                                    experts are the scripted policies Meta-World ships
robosuite       panda, robosuite_sawyer, iiwa,      Lift, Stack, PickPlaceCan with waypoint experts
                ur5e, jaco, kinova3, xarm7          (7-D OSC_POSE deltas)
pybullet        franka_joint, kuka_iiwa, xarm6      reach, pick with an IK expert (absolute joint targets
                                                    + gripper)
==============  ==================================  ======================================================

Each module has ``TASKS``, ``DEFAULT_TASKS``, ``ROBOTS``, ``DEFAULT_ROBOTS``, ``INSTRUCTIONS``,
``embodiment(robot)``, ``state_names(robot)``, ``collect_episode(...)`` (one seeded, successful episode)
and ``iter_episodes(tasks, robots, episodes, image_size, seed)`` yielding ``(EmbodimentSpec, Episode)``.
``modeling_actprior.sim.generate.generate`` writes them to LeRobot datasets.

This package imports no simulator at import time; the simulator modules import theirs lazily.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CAMERA_NAME = "front"
"""The one camera every generator records when ``image_size`` is given (``observation.images.front``)."""

DEFAULT_MAX_ATTEMPTS = 10
"""Seeds tried per requested episode before the episode is given up (the expert failed every time)."""

NOISE_STREAM = 7
"""Second entropy word of the random stream of executed-action noise (``generate --action-noise``), so the noise of
an attempt is reproducible and independent of the expert's own draws from the same seed."""


def episode_seed(seed: int, sim: str, task: str, robot: str, episode: int, attempt: int = 0) -> int:
    """A 31-bit seed derived from (seed, sim, task, robot, episode, attempt), stable across processes and runs.

    Python's ``hash`` is salted per process, so the seed comes from SHA-256 of the joined fields.
    """
    key = f"{int(seed)}/{sim}/{task}/{robot}/{int(episode)}/{int(attempt)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF


@dataclass
class EpisodeResult:
    """What one generation job returns: the episode (``None`` when every attempt failed) and its bookkeeping."""

    sim: str
    task: str
    robot: str
    episode_index: int
    episode: Any = None  # modeling_actprior.data.Episode or None
    attempts: int = 0
    seeds: list[int] = field(default_factory=list)
    steps: int = 0  # simulator steps taken over all attempts
    seconds: float = 0.0

    @property
    def success(self) -> bool:
        return self.episode is not None


@dataclass
class _StandaloneEpisode:
    """Same fields as ``modeling_actprior.data.lerobot.Episode``; used only where that is not installed."""

    actions: Any
    states: Any
    task: str
    images: dict[str, Any] | None = None
    success: bool = True


def make_episode(actions, states, task: str, images: dict[str, Any] | None = None, success: bool = True):
    """Build the data layer's ``Episode`` (imported lazily: the data layer and simulators are optional here)."""
    import numpy as np

    try:
        from modeling_actprior.data.lerobot import Episode
    except ModuleNotFoundError as e:  # the data layer is optional for running the experts alone
        if e.name not in ("modeling_actprior.data", "modeling_actprior.data.lerobot"):
            raise
        Episode = _StandaloneEpisode

    return Episode(
        actions=np.asarray(actions, dtype=np.float32),
        states=np.asarray(states, dtype=np.float32),
        task=task,
        images=images,
        success=bool(success),
    )


def check_choices(kind: str, requested: Sequence[str] | None, valid: Sequence[str],
                  default: Sequence[str], sim: str) -> list[str]:
    """Validate ``requested`` names against ``valid``; ``None`` or empty means ``default``.

    Raises ValueError naming the bad entries and listing the valid ones.
    """
    if requested is None or (not isinstance(requested, str) and len(requested) == 0):
        return list(default)
    if isinstance(requested, str):
        requested = [s for s in (p.strip() for p in requested.split(",")) if s]
    bad = [r for r in requested if r not in valid]
    if bad:
        raise ValueError(
            f"Unknown {kind} {', '.join(repr(b) for b in bad)} for simulator {sim!r}. "
            f"Valid {kind}s: {', '.join(valid)}."
        )
    # keep the user's order, drop duplicates
    return list(dict.fromkeys(requested))


def setup_rendering_env() -> None:
    """Pick a headless OpenGL backend for MuJoCo before it is imported (EGL unless the user chose one)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])


__all__ = [
    "CAMERA_NAME",
    "DEFAULT_MAX_ATTEMPTS",
    "EpisodeResult",
    "check_choices",
    "episode_seed",
    "make_episode",
    "setup_rendering_env",
]


def collect_with_retries(sim: str, task: str, robot: str, episode_index: int, seed: int, max_attempts: int,
                         rollout, instruction: str) -> EpisodeResult:
    """Roll out ``rollout(seed)`` on the episode's deterministic seeds until one succeeds (at most
    ``max_attempts``). ``rollout`` returns ``(success, actions, states, frames or None, steps)``."""
    res = EpisodeResult(sim, task, robot, episode_index)
    t0 = time.perf_counter()
    for attempt in range(max_attempts):
        s = episode_seed(seed, sim, task, robot, episode_index, attempt)
        res.attempts += 1
        res.seeds.append(s)
        ok, actions, states, frames, n = rollout(s)
        res.steps += n
        if ok:
            images = {CAMERA_NAME: frames} if frames is not None else None
            res.episode = make_episode(actions, states, instruction, images, True)
            break
    res.seconds = time.perf_counter() - t0
    return res


def iter_expert_episodes(expert, tasks, robots, episodes: int, image_size, seed: int, max_attempts: int,
                         results: list | None):
    """``(EmbodimentSpec, Episode)`` for every robot x task x episode of an expert module (``TASKS``,
    ``ROBOTS``, ``embodiment``, ``collect_episode``), successful episodes only; every ``EpisodeResult`` is
    appended to ``results`` when given."""
    tasks = check_choices("task", tasks, expert.TASKS, expert.DEFAULT_TASKS, expert.SIM)
    robots = check_choices("robot", robots, expert.ROBOTS, expert.DEFAULT_ROBOTS, expert.SIM)
    for robot in robots:
        spec = expert.embodiment(robot)
        for task in tasks:
            for i in range(int(episodes)):
                res = expert.collect_episode(task, robot, i, seed, image_size, max_attempts)
                if results is not None:
                    results.append(res)
                if res.episode is not None:
                    yield spec, res.episode
