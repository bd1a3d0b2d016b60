"""Joint-space demonstrations in pybullet: an IK expert on the arms ``pybullet_data`` ships.

Robots (embodiment names): ``franka_joint`` (Franka Panda, ``franka_panda/panda.urdf``), ``kuka_iiwa``
(KUKA LBR iiwa with the two-finger gripper of ``kuka_iiwa/kuka_with_gripper2.sdf``) and ``xarm6``
(``xarm/xarm6_with_gripper.urdf``).

Actions: **absolute joint position targets** for the arm joints (7, 7, 6) followed by one gripper
command, sent to pybullet's position controllers at 20 Hz (12 physics steps of 1/240 s each):

- ``franka_joint``: gripper = target finger joint position in metres (0 closed ... 0.04 open, per finger),
- ``kuka_iiwa``: gripper = finger angle in radians (0 closed ... 0.3 open),
- ``xarm6``: gripper = drive joint angle in radians (0 open ... 0.85 closed).

The expert plans Cartesian waypoints for the tool centre point (between the fingertips), moves along
straight lines at a speed jittered per episode, and turns each intermediate pose into joint targets with
``calculateInverseKinematics`` (gripper pointing down). Tasks:

- ``reach``: bring the gripper to a random point in the workspace (success: TCP within 2 cm),
- ``pick``: grasp a 5 cm cube lying at a random pose on the floor and lift it (success: cube 10 cm up).

States: arm joint positions, the gripper joint position, TCP xyz.
Images (when ``image_size`` is given): a fixed camera facing the robot (TinyRenderer), as ``front``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from . import DEFAULT_MAX_ATTEMPTS, EpisodeResult, check_choices, collect_with_retries, iter_expert_episodes

SIM = "pybullet"
CONTROL_FREQ = 20
PHYSICS_HZ = 240
SUBSTEPS = PHYSICS_HZ // CONTROL_FREQ

TASKS: tuple[str, ...] = ("reach", "pick")
DEFAULT_TASKS: tuple[str, ...] = TASKS
INSTRUCTIONS: dict[str, str] = {
    "reach": "move the gripper to the target position",
    "pick": "pick up the cube and lift it",
}
MAX_STEPS = {"reach": 120, "pick": 220}


@dataclass(frozen=True)
class _Robot:
    file: str
    arm_joints: tuple[int, ...]          # joint indices of the arm, in action order
    ee_link: int                         # link used for IK
    finger_links: tuple[int, ...]        # the TCP is the mean of these links' positions (+ tcp_extra along the approach axis)
    home: tuple[float, ...]              # arm joint positions at reset
    grip_open: float
    grip_closed: float
    workspace: tuple[tuple[float, float], tuple[float, float]]  # x, y ranges for objects and goals
    tcp_extra: float = 0.0
    grasp_z: float = 0.025               # TCP height above the floor when grasping the cube


ROBOT_DEFS: dict[str, _Robot] = {
    "franka_joint": _Robot("franka_panda/panda.urdf", tuple(range(7)), 11, (9, 10),
                           (0.0, -0.3, 0.0, -2.2, 0.0, 1.9, 0.785), 0.04, 0.0, ((0.4, 0.6), (-0.15, 0.15))),
    "kuka_iiwa": _Robot("kuka_iiwa/kuka_with_gripper2.sdf", tuple(range(7)), 6, (10, 13),
                        (0.006, 0.413, -0.011, -1.589, 0.005, 1.138, -0.006), 0.3, 0.0,
                        ((0.5, 0.65), (-0.15, 0.15)), tcp_extra=0.0, grasp_z=0.03),
    "xarm6": _Robot("xarm/xarm6_with_gripper.urdf", (1, 2, 3, 4, 5, 6), 6, (9, 12),
                    (0.0, -0.4, -0.6, 0.0, 1.0, 0.0), 0.0, 0.85, ((0.3, 0.45), (-0.15, 0.15))),
}
ROBOTS: tuple[str, ...] = tuple(ROBOT_DEFS)
DEFAULT_ROBOTS: tuple[str, ...] = ROBOTS


def embodiment(robot: str):
    from modeling_actprior.action_space import get_embodiment

    check_choices("robot", [robot], ROBOTS, DEFAULT_ROBOTS, SIM)
    return get_embodiment(robot)


def instruction(task: str) -> str:
    check_choices("task", [task], TASKS, DEFAULT_TASKS, SIM)
    return INSTRUCTIONS[task]


def state_names(robot: str) -> list[str]:
    n = len(ROBOT_DEFS[robot].arm_joints)
    return [f"joint_{i}" for i in range(n)] + ["gripper", "tcp_x", "tcp_y", "tcp_z"]


class _Scene:
    """One pybullet DIRECT client with a robot on the floor; rebuilt from scratch for every attempt."""

    def __init__(self, robot: str):
        import pybullet as p
        import pybullet_data

        self.p = p
        self.name = robot
        self.r = ROBOT_DEFS[robot]
        self.cid = p.connect(p.DIRECT)
        p.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=self.cid)

    def close(self):
        try:
            self.p.disconnect(physicsClientId=self.cid)
        except Exception:  # noqa: BLE001
            pass

    def reset(self, task: str, rng: np.random.Generator):
        p, c, r = self.p, self.cid, self.r
        p.resetSimulation(physicsClientId=c)
        p.setGravity(0, 0, -9.81, physicsClientId=c)
        p.setTimeStep(1.0 / PHYSICS_HZ, physicsClientId=c)
        p.loadURDF("plane.urdf", physicsClientId=c)
        if r.file.endswith(".sdf"):
            self.body = p.loadSDF(r.file, physicsClientId=c)[0]
            p.resetBasePositionAndOrientation(self.body, [0, 0, 0], [0, 0, 0, 1], physicsClientId=c)
        else:
            self.body = p.loadURDF(r.file, [0, 0, 0], useFixedBase=True, physicsClientId=c)
        self.n_joints = p.getNumJoints(self.body, physicsClientId=c)
        self.movable = [j for j in range(self.n_joints)
                        if p.getJointInfo(self.body, j, physicsClientId=c)[2] != p.JOINT_FIXED]
        self.lower = [p.getJointInfo(self.body, j, physicsClientId=c)[8] for j in self.movable]
        self.upper = [p.getJointInfo(self.body, j, physicsClientId=c)[9] for j in self.movable]
        home = np.asarray(r.home) + rng.normal(0.0, 0.03, len(r.home))
        for j, q in zip(r.arm_joints, home):
            p.resetJointState(self.body, j, q, physicsClientId=c)
        self.set_gripper(r.grip_open, reset=True)
        self.rest = [p.getJointState(self.body, j, physicsClientId=c)[0] for j in self.movable]
        # the tool's downward orientation: the IK link's orientation at the (noise-free) home pose
        saved = [p.getJointState(self.body, j, physicsClientId=c)[0] for j in r.arm_joints]
        for j, q in zip(r.arm_joints, r.home):
            p.resetJointState(self.body, j, q, physicsClientId=c)
        ls = p.getLinkState(self.body, r.ee_link, computeForwardKinematics=True, physicsClientId=c)
        self.down = ls[5]
        rot = np.array(p.getMatrixFromQuaternion(ls[5])).reshape(3, 3)
        self.tcp_local = rot.T @ (self._finger_mid() - np.array(ls[4]))
        self.tcp_local = self.tcp_local + rot.T @ (rot @ np.array([0, 0, 1.0])) * r.tcp_extra
        for j, q in zip(r.arm_joints, saved):
            p.resetJointState(self.body, j, q, physicsClientId=c)
        for j, q in zip(r.arm_joints, saved):
            p.setJointMotorControl2(self.body, j, p.POSITION_CONTROL, targetPosition=q, force=500,
                                    physicsClientId=c)
        self.cube = None
        (x0, x1), (y0, y1) = r.workspace
        if task == "pick":
            pos = [rng.uniform(x0, x1), rng.uniform(y0, y1), 0.025]
            orn = p.getQuaternionFromEuler([0, 0, rng.uniform(-math.pi / 4, math.pi / 4)])
            self.cube = p.loadURDF("cube_small.urdf", pos, orn, physicsClientId=c)
            p.changeDynamics(self.cube, -1, lateralFriction=1.5, spinningFriction=0.01, physicsClientId=c)
            self.goal = None
        else:
            self.goal = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1), rng.uniform(0.1, 0.35)])
        for f in r.finger_links:
            p.changeDynamics(self.body, f, lateralFriction=1.5, physicsClientId=c)
        for _ in range(24):
            p.stepSimulation(physicsClientId=c)

    # ------------------------------------------------------------------------------------ gripper
    def _gripper_targets(self, g: float) -> dict[int, float]:
        if self.name == "franka_joint":
            return {9: g, 10: g}
        if self.name == "kuka_iiwa":
            return {7: 0.0, 8: -g, 11: g, 10: 0.0, 13: 0.0}
        return {j: g for j in (8, 9, 10, 11, 12, 13)}

    def set_gripper(self, g: float, reset: bool = False):
        p, c = self.p, self.cid
        forces = {"franka_joint": 40.0, "kuka_iiwa": 10.0, "xarm6": 20.0}[self.name]
        for j, q in self._gripper_targets(g).items():
            if reset:
                p.resetJointState(self.body, j, q, physicsClientId=c)
            p.setJointMotorControl2(self.body, j, p.POSITION_CONTROL, targetPosition=q, force=forces,
                                    physicsClientId=c)

    def gripper_state(self) -> float:
        j = {"franka_joint": 9, "kuka_iiwa": 11, "xarm6": 8}[self.name]
        return float(self.p.getJointState(self.body, j, physicsClientId=self.cid)[0])

    # ------------------------------------------------------------------------------------ kinematics
    def _finger_mid(self) -> np.ndarray:
        p, c = self.p, self.cid
        return np.mean([p.getLinkState(self.body, f, computeForwardKinematics=True, physicsClientId=c)[4]
                        for f in self.r.finger_links], axis=0)

    def tcp(self) -> np.ndarray:
        p, c = self.p, self.cid
        ls = p.getLinkState(self.body, self.r.ee_link, computeForwardKinematics=True, physicsClientId=c)
        rot = np.array(p.getMatrixFromQuaternion(ls[5])).reshape(3, 3)
        return np.array(ls[4]) + rot @ self.tcp_local

    def ik(self, tcp_target: np.ndarray) -> np.ndarray:
        """Arm joint targets putting the TCP at ``tcp_target`` with the gripper pointing down."""
        p, c = self.p, self.cid
        rot = np.array(p.getMatrixFromQuaternion(self.down)).reshape(3, 3)
        ee_target = np.asarray(tcp_target) - rot @ self.tcp_local
        ranges = [max(u - lo, 1e-3) if u > lo else 6.28 for lo, u in zip(self.lower, self.upper)]
        sol = p.calculateInverseKinematics(
            self.body, self.r.ee_link, ee_target.tolist(), self.down,
            lowerLimits=[lo if u > lo else -6.28 for lo, u in zip(self.lower, self.upper)],
            upperLimits=[u if u > lo else 6.28 for lo, u in zip(self.lower, self.upper)],
            jointRanges=ranges, restPoses=self.rest, maxNumIterations=100, residualThreshold=1e-5,
            physicsClientId=c)
        by_joint = dict(zip(self.movable, sol))
        return np.array([by_joint[j] for j in self.r.arm_joints])

    def arm_q(self) -> np.ndarray:
        p, c = self.p, self.cid
        return np.array([p.getJointState(self.body, j, physicsClientId=c)[0] for j in self.r.arm_joints])

    def apply(self, q: np.ndarray, g: float):
        p, c = self.p, self.cid
        for j, qi in zip(self.r.arm_joints, q):
            p.setJointMotorControl2(self.body, j, p.POSITION_CONTROL, targetPosition=float(qi), force=500,
                                    maxVelocity=2.0, physicsClientId=c)
        self.set_gripper(g)
        for _ in range(SUBSTEPS):
            p.stepSimulation(physicsClientId=c)

    def state(self) -> np.ndarray:
        return np.concatenate([self.arm_q(), [self.gripper_state()], self.tcp()]).astype(np.float32)

    def cube_pos(self) -> np.ndarray:
        return np.array(self.p.getBasePositionAndOrientation(self.cube, physicsClientId=self.cid)[0])

    def render(self, size: int) -> np.ndarray:
        p, c = self.p, self.cid
        cx = float(np.mean(self.r.workspace[0]))
        view = p.computeViewMatrix([cx + 0.9, 0.0, 0.6], [cx - 0.1, 0.0, 0.15], [0, 0, 1], physicsClientId=c)
        proj = p.computeProjectionMatrixFOV(50, 1.0, 0.05, 5.0, physicsClientId=c)
        img = p.getCameraImage(size, size, view, proj, renderer=p.ER_TINY_RENDERER, physicsClientId=c)[2]
        return np.asarray(img, dtype=np.uint8).reshape(size, size, 4)[..., :3].copy()


_SCENES: dict[str, _Scene] = {}


def _scene(robot: str) -> _Scene:
    if robot not in _SCENES:
        _SCENES[robot] = _Scene(robot)
    return _SCENES[robot]


def _waypoints(scene: _Scene, task: str, rng: np.random.Generator):
    """List of (tcp target xyz, gripper command, dwell steps after arrival)."""
    r = scene.r
    if task == "reach":
        return [(scene.goal, r.grip_open, 3)]
    cube = scene.cube_pos()
    hover = rng.uniform(0.08, 0.14)
    grasp = np.r_[cube[:2], r.grasp_z]
    return [
        (grasp + [0, 0, hover], r.grip_open, 0),
        (grasp, r.grip_open, 2),
        (grasp, r.grip_closed, 12),
        (grasp + [0, 0, rng.uniform(0.18, 0.25)], r.grip_closed, 5),
    ]


def _rollout(task: str, robot: str, seed: int, image_size: int | None):
    rng = np.random.default_rng(seed)
    scene = _scene(robot)
    scene.reset(task, rng)
    speed = rng.uniform(0.15, 0.3) / CONTROL_FREQ  # metres per control step
    actions, states, frames = [], [], []
    tcp_cmd = scene.tcp()
    steps = 0
    success = False
    for target, grip, dwell in _waypoints(scene, task, rng):
        target = np.asarray(target, dtype=np.float64)
        dist = np.linalg.norm(target - tcp_cmd)
        n_move = max(1, int(math.ceil(dist / speed)))
        start = tcp_cmd.copy()
        for k in range(n_move + dwell):
            if steps >= MAX_STEPS[task]:
                break
            s = min(1.0, (k + 1) / n_move)
            s = 0.5 - 0.5 * math.cos(math.pi * s)  # smooth start and stop
            tcp_cmd = start + s * (target - start)
            q = scene.ik(tcp_cmd)
            states.append(scene.state())
            if image_size is not None:
                frames.append(scene.render(image_size))
            actions.append(np.r_[q, grip].astype(np.float32))
            scene.apply(q, grip)
            steps += 1
    if task == "reach":
        success = bool(np.linalg.norm(scene.tcp() - scene.goal) < 0.02)
    else:
        success = bool(scene.cube_pos()[2] > 0.10)
    return success, np.stack(actions), np.stack(states), (np.stack(frames) if frames else None), steps


def collect_episode(task: str, robot: str, episode_index: int, seed: int = 0, image_size: int | None = None,
                    max_attempts: int = DEFAULT_MAX_ATTEMPTS, action_noise: float = 0.0) -> EpisodeResult:
    """One successful, seeded episode of ``task`` on ``robot`` (up to ``max_attempts`` seeds).

    ``action_noise`` must be 0: this expert plays a fixed waypoint plan through IK and never reacts to the state, so a
    perturbed execution would not give corrective labels."""
    if action_noise:
        raise ValueError(f"{SIM}: action_noise={action_noise} is not supported: its IK expert follows a fixed waypoint "
                         "plan and cannot correct a perturbation (no corrective labels). Use metaworld or robosuite.")
    check_choices("task", [task], TASKS, DEFAULT_TASKS, SIM)
    check_choices("robot", [robot], ROBOTS, DEFAULT_ROBOTS, SIM)
    return collect_with_retries(SIM, task, robot, episode_index, seed, max_attempts,
                                lambda s: _rollout(task, robot, s, image_size), INSTRUCTIONS[task])


def iter_episodes(tasks: Sequence[str] | None = None, robots: Sequence[str] | None = None, episodes: int = 1,
                  image_size: int | None = None, seed: int = 0, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                  results: list | None = None) -> Iterator[tuple]:
    """Yield ``(EmbodimentSpec, Episode)`` for every robot x task x episode, successful episodes only."""
    return iter_expert_episodes(sys.modules[__name__], tasks, robots, episodes, image_size, seed, max_attempts,
                                results)
