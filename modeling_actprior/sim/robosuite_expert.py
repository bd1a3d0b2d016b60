"""Scripted waypoint experts for robosuite 1.5 (Lift, Stack, PickPlaceCan) on seven arms.

Actions are robosuite's default single-arm controller: OSC_POSE with delta input in the robot base
frame, 7-D ``(dx, dy, dz, droll, dpitch, dyaw, gripper)`` in ``[-1, 1]`` (scaled by robosuite to at most
5 cm and 0.5 rad per step; gripper -1 open, +1 closed), at 20 Hz (``control_freq=20``).

The expert is a state machine over waypoints (approach above the object, descend, close the gripper,
lift, carry, release, retreat) with a proportional position controller and an orientation hold on the
initial gripper orientation. Speed, approach height and grasp depth are jittered per episode from the
episode's seed so the corpus is not one trajectory repeated.

States (``observation.state``): end-effector position (3), quaternion xyzw (4), arm joint positions
(the arm's DoF: 6 for UR5e, 7 otherwise) and gripper joint positions (robot dependent): constant per
robot, so one dataset per embodiment has one state width.

Images (when ``image_size`` is given): robosuite's ``agentview`` camera, flipped upright, as camera
``front``.
"""

from __future__ import annotations

import sys
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

SIM = "robosuite"

# embodiment name -> robosuite robot class name
ROBOTS_TO_ROBOSUITE: dict[str, str] = {
    "panda": "Panda",
    "robosuite_sawyer": "Sawyer",
    "iiwa": "IIWA",
    "ur5e": "UR5e",
    "kinova3": "Kinova3",
    "xarm7": "XArm7",
}
# Jaco is left out: robosuite 1.5.2's Jaco gripper is reversed and slow, and with this expert its long
# fingers meet the table above the cube's centre, so every grasp slipped (0/9 over the three tasks).
ROBOTS: tuple[str, ...] = tuple(ROBOTS_TO_ROBOSUITE)
DEFAULT_ROBOTS: tuple[str, ...] = ("panda",)

TASKS: tuple[str, ...] = ("Lift", "Stack", "PickPlaceCan")
DEFAULT_TASKS: tuple[str, ...] = TASKS

INSTRUCTIONS: dict[str, str] = {
    "Lift": "lift the red cube",
    "Stack": "stack the red cube on the green cube",
    "PickPlaceCan": "pick up the can and place it in its bin",
}

CONTROL_FREQ = 20
# Orientation feedback (action units per radian). 0: OSC's own orientation hold only. An active hold on
# the initial/vertical orientation made robosuite's Sawyer stall centimetres from its goals.
ROT_GAIN = 0.0
# Simulator steps before the expert gives up on an attempt (robosuite's own horizon is 1000).
MAX_STEPS = {"Lift": 200, "Stack": 400, "PickPlaceCan": 450}
# Steps the gripper is given to close.
DEFAULT_GRASP_STEPS = 15

_ENV_CACHE: dict[tuple, object] = {}


def embodiment(robot: str):
    from modeling_actprior.action_space import get_embodiment

    check_choices("robot", [robot], ROBOTS, DEFAULT_ROBOTS, SIM)
    return get_embodiment(robot)


def instruction(task: str) -> str:
    check_choices("task", [task], TASKS, DEFAULT_TASKS, SIM)
    return INSTRUCTIONS[task]


def _make_env(task: str, robot: str, image_size: int | None):
    key = (task, robot, image_size)
    env = _ENV_CACHE.get(key)
    if env is None:
        from . import setup_rendering_env

        setup_rendering_env()
        import robosuite as suite

        kwargs = dict(
            robots=ROBOTS_TO_ROBOSUITE[robot],
            has_renderer=False,
            has_offscreen_renderer=image_size is not None,
            use_camera_obs=image_size is not None,
            control_freq=CONTROL_FREQ,
            hard_reset=False,
            horizon=10_000,
            ignore_done=True,
            reward_shaping=False,
        )
        if image_size is not None:
            kwargs.update(camera_names="agentview", camera_heights=int(image_size), camera_widths=int(image_size))
        # Object sizes (Lift's cube, Stack's cubes) are drawn from the global NumPy RNG when the model is
        # built: fix it, so every process builds the same objects, then restore the caller's state.
        state = np.random.get_state()
        np.random.seed(0)
        try:
            env = suite.make(task, seed=0, **kwargs)
        finally:
            np.random.set_state(state)
        _ENV_CACHE[key] = env
    return env


def _reseed(env, seed: int) -> None:
    """Point every random generator robosuite uses at reset (robot init noise, object placement) at ``seed``."""
    rng = np.random.default_rng(seed)
    env.rng = rng
    sampler = getattr(env, "placement_initializer", None)
    stack = [sampler] if sampler is not None else []
    while stack:
        s = stack.pop()
        s.rng = rng
        stack.extend(getattr(s, "samplers", {}).values())


def state_names(robot: str) -> list[str]:
    """Names of the state vector's entries for ``robot`` (measured from the simulator once)."""
    env = _make_env("Lift", robot, None)
    obs = env.reset()
    n_joint = len(obs["robot0_joint_pos"])
    n_grip = len(obs["robot0_gripper_qpos"])
    return (["eef_x", "eef_y", "eef_z", "eef_qx", "eef_qy", "eef_qz", "eef_qw"]
            + [f"joint_{i}" for i in range(n_joint)] + [f"gripper_qpos_{i}" for i in range(n_grip)])


def _state(obs) -> np.ndarray:
    return np.concatenate([obs["robot0_eef_pos"], obs["robot0_eef_quat"], obs["robot0_joint_pos"],
                           obs["robot0_gripper_qpos"]]).astype(np.float32)


def _quat_err(q_target_xyzw: np.ndarray, q_xyzw: np.ndarray) -> np.ndarray:
    """Axis-angle (3,) rotating orientation ``q`` onto ``q_target`` (world frame)."""
    from scipy.spatial.transform import Rotation as R

    return (R.from_quat(q_target_xyzw) * R.from_quat(q_xyzw).inv()).as_rotvec()


def _vertical(q_xyzw: np.ndarray) -> np.ndarray:
    """``q`` turned by the smallest rotation that points the gripper's approach axis (local z) straight down."""
    from scipy.spatial.transform import Rotation as R

    r0 = R.from_quat(q_xyzw)
    z = r0.apply([0.0, 0.0, 1.0])
    down = np.array([0.0, 0.0, -1.0])
    axis = np.cross(z, down)
    s, c = np.linalg.norm(axis), float(np.dot(z, down))
    if s < 1e-8:
        return r0.as_quat()
    return (R.from_rotvec(axis / s * np.arctan2(s, c)) * r0).as_quat()


class _WaypointExpert:
    """Phases: list of (name, target_fn(obs) -> xyz, gripper, done_fn(obs, steps_in_phase) -> bool)."""

    def __init__(self, env, task: str, robot: str, rng: np.random.Generator):
        self.env, self.task, self.robot = env, task, robot
        self.gain = float(rng.uniform(8.0, 14.0))        # action units per metre of error
        self.hover = float(rng.uniform(0.08, 0.13))      # approach height above the object
        self.depth = float(rng.uniform(-0.006, 0.004))     # grasp point relative to the object's centre
        self.lift = float(rng.uniform(0.15, 0.25))       # Lift: lift height above the start
        self.grasp_steps = DEFAULT_GRASP_STEPS + int(rng.integers(0, 6))
        self.ki = 1.5
        self.integral = np.zeros(3)
        self.q0 = None
        self.phase = 0
        self.t_phase = 0
        self.phases = self._build_phases()

    # object positions ------------------------------------------------------------------------
    def _obj(self, obs):
        if self.task == "PickPlaceCan":
            return obs["Can_pos"]
        if self.task == "Stack":
            return obs["cubeA_pos"]
        return obs["cube_pos"]

    def _build_phases(self):
        env = self.env
        near = lambda tol: (lambda obs, tgt, t: np.linalg.norm(obs["robot0_eef_pos"] - tgt) < tol)
        OPEN, CLOSE = -1.0, 1.0
        phases = [
            ("approach", lambda o: self._obj(o) + [0, 0, self.hover], OPEN,
             near(0.015), 80),
            ("descend", lambda o: self._obj(o) + [0, 0, self.depth], OPEN, near(0.008), 60),
            ("grasp", None, CLOSE, lambda o, g, t: t >= self.grasp_steps, 200),
        ]
        if self.task == "Lift":
            z0 = {}
            phases.append(("lift", lambda o: z0.setdefault("p", self._obj(o) + [0, 0, self.lift]), CLOSE,
                           lambda o, g, t: env._check_success() and t > 10, 80))
        elif self.task == "Stack":
            def above_b(o, h):
                return o["cubeB_pos"] + [0, 0, h]
            # cubeA (half size 0.02) sits on cubeB (half size 0.025): its centre 0.045 above cubeB's
            place = lambda o: above_b(o, 0.045 + 0.008) + (o["robot0_eef_pos"] - o["cubeA_pos"])
            phases += [
                ("raise", lambda o: np.r_[o["robot0_eef_pos"][:2], o["cubeB_pos"][2] + self.hover + 0.05], CLOSE,
                 near(0.015), 60),
                ("carry", lambda o: above_b(o, self.hover + 0.05) + (o["robot0_eef_pos"] - o["cubeA_pos"]) * [1, 1, 0],
                 CLOSE, near(0.01), 100),
                ("lower", place, CLOSE, near(0.006), 60),
                ("release", None, OPEN, lambda o, g, t: t >= self.grasp_steps, 200),
                ("retreat", lambda o: o["cubeA_pos"] + [0, 0, self.hover + 0.05], OPEN,
                 lambda o, g, t: env._check_success() and t > 5, 60),
            ]
        else:  # PickPlaceCan
            target = lambda: env.target_bin_placements[env.object_to_id["can"]]
            carry_z = lambda: env.bin2_pos[2] + 0.25
            offset = {}
            phases += [
                ("raise", lambda o: np.r_[o["robot0_eef_pos"][:2], carry_z()], CLOSE, near(0.02), 60),
                ("carry", lambda o: np.r_[target()[:2] + offset.setdefault(
                    "d", (o["robot0_eef_pos"] - o["Can_pos"])[:2]), carry_z()], CLOSE, near(0.015), 120),
                ("lower", lambda o: np.r_[target()[:2] + offset["d"], env.bin2_pos[2] + 0.12], CLOSE,
                 near(0.012), 60),
                ("release", None, OPEN, lambda o, g, t: t >= self.grasp_steps, 200),
                ("retreat", lambda o: np.r_[o["robot0_eef_pos"][:2], carry_z()], OPEN,
                 lambda o, g, t: env._check_success() and t > 5, 60),
            ]
        return phases

    @property
    def finished(self) -> bool:
        return self.phase >= len(self.phases)

    def act(self, obs) -> np.ndarray:
        if self.q0 is None:
            self.q0 = _vertical(np.array(obs["robot0_eef_quat"]))
            self.hold = None
        name, target_fn, grip, done_fn, timeout = self.phases[self.phase]
        if target_fn is None:  # hold still where the phase began
            if self.hold is None:
                self.hold = np.array(obs["robot0_eef_pos"])
            target = self.hold
        else:
            target = np.asarray(target_fn(obs), dtype=np.float64)
        err = target - obs["robot0_eef_pos"]
        if name in ("descend", "lower") and err[2] < 0:
            # go down only once above the target: arms drift sideways when descending fast
            err[2] *= float(np.clip(1.0 - np.linalg.norm(err[:2]) / 0.02, 0.0, 1.0))
        # PI control: some arms (robosuite's Sawyer, Jaco) settle centimetres short of an OSC goal
        self.integral = np.clip(self.integral + err, -0.5, 0.5)
        pos = np.clip(err * self.gain + self.integral * self.ki, -1.0, 1.0)
        rot = np.clip(_quat_err(self.q0, obs["robot0_eef_quat"]) * ROT_GAIN, -0.5, 0.5)
        action = np.concatenate([pos, rot, [grip]])
        self.t_phase += 1
        if done_fn(obs, target, self.t_phase) or self.t_phase >= timeout:
            if self.t_phase >= timeout and name in ("lift", "retreat"):
                self.phase = len(self.phases) + 1  # give up: the attempt failed
            else:
                self.phase += 1
            self.t_phase = 0
            self.hold = None
            self.integral[:] = 0.0
        return action.astype(np.float32)


def _rollout(task: str, robot: str, seed: int, image_size: int | None, action_noise: float = 0.0):
    """Run one seeded attempt. Returns (success, actions (T,7), states (T,S), frames (T,H,W,3) or None, steps)."""
    noise_rng = np.random.default_rng([seed, NOISE_STREAM])
    env = _make_env(task, robot, image_size)
    _reseed(env, seed)
    obs = env.reset()
    expert = _WaypointExpert(env, task, robot, np.random.default_rng(seed))
    actions, states, frames = [], [], []
    success = False
    for _ in range(MAX_STEPS[task]):
        a = expert.act(obs)
        states.append(_state(obs))
        if image_size is not None:
            frames.append(np.ascontiguousarray(obs["agentview_image"][::-1]))
        actions.append(a)
        if action_noise > 0:  # DART: execute a perturbed action, keep the expert's clean one as the label
            a = np.clip(a + action_noise * noise_rng.standard_normal(a.shape), -1.0, 1.0).astype(np.float32)
        obs, _, _, _ = env.step(a)
        if expert.finished:
            success = bool(env._check_success()) and expert.phase == len(expert.phases)
            break
    return success, np.stack(actions), np.stack(states), (np.stack(frames) if frames else None), len(actions)


def collect_episode(task: str, robot: str, episode_index: int, seed: int = 0, image_size: int | None = None,
                    max_attempts: int = DEFAULT_MAX_ATTEMPTS, action_noise: float = 0.0) -> EpisodeResult:
    """One successful, seeded episode of ``task`` on ``robot`` (up to ``max_attempts`` seeds).

    ``action_noise``: standard deviation of Gaussian noise, in action units (the ``[-1, 1]`` OSC_POSE delta and
    gripper command), added to every executed action (then clipped); the recorded action is the expert's clean one
    (corrective demonstrations, DART). Drawn from the attempt's seed."""
    check_choices("task", [task], TASKS, DEFAULT_TASKS, SIM)
    check_choices("robot", [robot], ROBOTS, DEFAULT_ROBOTS, SIM)
    return collect_with_retries(SIM, task, robot, episode_index, seed, max_attempts,
                                lambda s: _rollout(task, robot, s, image_size, action_noise), INSTRUCTIONS[task])


def iter_episodes(tasks: Sequence[str] | None = None, robots: Sequence[str] | None = None, episodes: int = 1,
                  image_size: int | None = None, seed: int = 0, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                  results: list | None = None) -> Iterator[tuple]:
    """Yield ``(EmbodimentSpec, Episode)`` for every robot x task x episode, successful episodes only.

    ``results``, when given a list, receives every ``EpisodeResult`` (attempt counts, failures).
    """
    return iter_expert_episodes(sys.modules[__name__], tasks, robots, episodes, image_size, seed, max_attempts,
                                results)
