"""Meta-World v3 demonstrations from the scripted expert policies Meta-World ships (``metaworld.policies``).

Robot: Rethink Sawyer (embodiment ``sawyer``). Action: 4-D ``(dx, dy, dz, gripper)`` in ``[-1, 1]``
(mocap delta of ``action * 1 cm`` per step; gripper effort, +1 closes), recorded after the clip to
``[-1, 1]`` the environment itself applies. Control rate: 80 Hz (``frame_skip 5 x timestep 2.5 ms =
12.5 ms``; ``env.metadata["render_fps"] == 80``).

State (``observation.state``): the 39-D goal-observable Meta-World observation: hand xyz, gripper
opening, two object poses (pos + quaternion), the same 18 numbers from the previous step, goal xyz.

Each episode: the task's goal-observable environment is reset with the episode's seed (object and goal
positions are drawn from it), the expert runs until the environment reports success (plus
``TAIL_STEPS`` steps) or ``max_path_length`` (500) steps pass.

Images (when ``image_size`` is given): camera ``corner2`` rendered with shadows and multisampling off
(~7x faster on CPU), returned upright as camera ``front``.
"""

from __future__ import annotations

import atexit
import sys
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from . import (
    DEFAULT_MAX_ATTEMPTS,
    NOISE_STREAM,
    EpisodeResult,
    check_choices,
    collect_with_retries,
    iter_expert_episodes,
)

SIM = "metaworld"
ROBOTS: tuple[str, ...] = ("sawyer",)
DEFAULT_ROBOTS: tuple[str, ...] = ROBOTS
RENDER_CAMERA = "corner2"
TAIL_STEPS = 5  # steps recorded after the first success, so episodes end settled rather than mid-motion

# Natural-language instructions for all 50 Meta-World v3 tasks (the order of metaworld.env_dict.ALL_V3_ENVIRONMENTS).
INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the ring and put it on the peg",
    "basketball-v3": "pick up the ball and dunk it into the basket",
    "bin-picking-v3": "pick up the puck and place it in the other bin",
    "box-close-v3": "pick up the lid and close the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top behind the wall",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug out from under the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "pick the ring off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by turning the lock",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by turning the lock",
    "hand-insert-v3": "insert the gripper into the hole",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-open-v3": "turn the faucet on by rotating it left",
    "faucet-close-v3": "turn the faucet off by rotating it right",
    "hammer-v3": "hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the puck out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-back-v3": "slide the plate out of the cabinet",
    "plate-slide-back-side-v3": "slide the plate sideways out of the cabinet",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "grasp the stick and push the box with it",
    "stick-pull-v3": "grasp the stick and pull the box with it",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "pull the puck back to the goal",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach the goal position behind the wall",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
TASKS: tuple[str, ...] = tuple(INSTRUCTIONS)
MT10_TASKS: tuple[str, ...] = (
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3",
    "drawer-close-v3", "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
)
DEFAULT_TASKS: tuple[str, ...] = MT10_TASKS

_OBS18 = (["hand_x", "hand_y", "hand_z", "gripper_opening"]
          + [f"obj0_{k}" for k in ("x", "y", "z", "q0", "q1", "q2", "q3")]
          + [f"obj1_{k}" for k in ("x", "y", "z", "q0", "q1", "q2", "q3")])
STATE_NAMES: tuple[str, ...] = tuple(_OBS18 + [f"prev_{n}" for n in _OBS18] + ["goal_x", "goal_y", "goal_z"])

_ENV_CACHE: dict[str, object] = {}
_RENDERERS: dict[tuple, object] = {}


def embodiment(robot: str = "sawyer"):
    from modeling_actprior.action_space import get_embodiment

    check_choices("robot", [robot], ROBOTS, DEFAULT_ROBOTS, SIM)
    return get_embodiment(robot)


def instruction(task: str) -> str:
    check_choices("task", [task], TASKS, DEFAULT_TASKS, SIM)
    return INSTRUCTIONS[task]


def state_names(robot: str = "sawyer") -> list[str]:
    return list(STATE_NAMES)


def _env(task: str):
    env = _ENV_CACHE.get(task)
    if env is None:
        from . import setup_rendering_env

        setup_rendering_env()
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

        env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-goal-observable"](seed=0)
        # every reset draws fresh object/goal positions from env.np_random, which we seed per episode
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        _ENV_CACHE[task] = env
    return env


def _renderer(env, task: str, size: int):
    key = (task, size)
    r = _RENDERERS.get(key)
    if r is None:
        import mujoco

        env.model.light_castshadow[:] = 0
        env.model.vis.quality.offsamples = 0
        r = mujoco.Renderer(env.model, height=size, width=size)
        if not _RENDERERS:
            atexit.register(_close_renderers)
        _RENDERERS[key] = r
    return r


def _close_renderers() -> None:
    """Free GL contexts while the GL module still exists (at interpreter teardown it may not)."""
    while _RENDERERS:
        _, r = _RENDERERS.popitem()
        try:
            r.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _render(env, task: str, size: int) -> np.ndarray:
    r = _renderer(env, task, size)
    r.update_scene(env.data, camera=RENDER_CAMERA)
    # Meta-World's corner cameras look at the table upside down; flip both axes (a 180 degree turn)
    return np.ascontiguousarray(r.render()[::-1, ::-1])


def _policy(task: str):
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[task]()


def _rollout(task: str, seed: int, image_size: int | None, action_noise: float = 0.0):
    env = _env(task)
    noise_rng = np.random.default_rng([seed, NOISE_STREAM])
    env.seed(seed)
    obs, _ = env.reset()
    policy = _policy(task)
    warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high", category=UserWarning)
    actions, states, frames = [], [], []
    success_at = None
    for t in range(env.max_path_length):
        a = np.clip(np.asarray(policy.get_action(obs), dtype=np.float64), -1.0, 1.0)
        states.append(obs.astype(np.float32))
        if image_size is not None:
            frames.append(_render(env, task, image_size))
        actions.append(a.astype(np.float32))
        if action_noise > 0:  # DART: execute a perturbed action, keep the expert's clean one as the label
            a = np.clip(a + action_noise * noise_rng.standard_normal(a.shape), -1.0, 1.0)
        obs, _, terminated, truncated, info = env.step(a)
        if success_at is None and info.get("success", 0.0) > 0.5:
            success_at = t
        if success_at is not None and t - success_at >= TAIL_STEPS or terminated or truncated:
            break
    return (success_at is not None, np.stack(actions), np.stack(states),
            (np.stack(frames) if frames else None), len(actions))


def collect_episode(task: str, robot: str = "sawyer", episode_index: int = 0, seed: int = 0,
                    image_size: int | None = None, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                    action_noise: float = 0.0) -> EpisodeResult:
    """One successful, seeded episode of ``task`` (up to ``max_attempts`` seeds).

    ``action_noise``: standard deviation of Gaussian noise, in action units (the ``[-1, 1]`` mocap delta and
    gripper effort), added to every executed action (then clipped to ``[-1, 1]``); the recorded action is the
    expert's clean one for the perturbed state (corrective demonstrations, DART). The noise is drawn from the
    attempt's seed, so episodes are reproducible."""
    check_choices("task", [task], TASKS, DEFAULT_TASKS, SIM)
    check_choices("robot", [robot], ROBOTS, DEFAULT_ROBOTS, SIM)
    return collect_with_retries(SIM, task, robot, episode_index, seed, max_attempts,
                                lambda s: _rollout(task, s, image_size, action_noise), INSTRUCTIONS[task])


def iter_episodes(tasks: Sequence[str] | None = None, robots: Sequence[str] | None = None, episodes: int = 1,
                  image_size: int | None = None, seed: int = 0, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                  results: list | None = None) -> Iterator[tuple]:
    """Yield ``(EmbodimentSpec, Episode)`` for every task x episode (MT10 by default), successful ones only."""
    return iter_expert_episodes(sys.modules[__name__], tasks, robots, episodes, image_size, seed, max_attempts,
                                results)
