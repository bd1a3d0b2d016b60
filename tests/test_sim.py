"""Simulator data generators: name validation and instructions (fast), generated datasets (slow)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from modeling_actprior.action_space import get_embodiment
from modeling_actprior.sim import episode_seed, metaworld_expert, pybullet_expert, robosuite_expert
from modeling_actprior.sim.generate import SIMULATORS, add_generate_arguments, generate, resolve

MODULES = {"metaworld": metaworld_expert, "robosuite": robosuite_expert, "pybullet": pybullet_expert}


# ------------------------------------------------------------------------------------------ fast
def test_metaworld_instructions_cover_all_50_tasks():
    assert len(metaworld_expert.TASKS) == 50
    assert len(set(metaworld_expert.INSTRUCTIONS.values())) == 50  # no two tasks share an instruction
    assert set(metaworld_expert.MT10_TASKS) <= set(metaworld_expert.TASKS)
    assert metaworld_expert.DEFAULT_TASKS == metaworld_expert.MT10_TASKS
    assert metaworld_expert.INSTRUCTIONS["button-press-topdown-v3"] == "press the button from the top"
    for text in metaworld_expert.INSTRUCTIONS.values():
        assert text and text == text.strip() and "-v3" not in text


def test_metaworld_instruction_table_matches_installed_metaworld():
    env_dict = pytest.importorskip("metaworld.env_dict")
    assert set(metaworld_expert.TASKS) == set(env_dict.ALL_V3_ENVIRONMENTS)
    assert set(metaworld_expert.MT10_TASKS) == set(env_dict.MT10_V3)


@pytest.mark.parametrize("sim", SIMULATORS)
def test_every_task_has_an_instruction_and_every_robot_an_embodiment(sim):
    mod = MODULES[sim]
    assert set(mod.INSTRUCTIONS) == set(mod.TASKS)
    assert set(mod.DEFAULT_TASKS) <= set(mod.TASKS) and set(mod.DEFAULT_ROBOTS) <= set(mod.ROBOTS)
    for robot in mod.ROBOTS:
        assert get_embodiment(robot).name == robot


def test_pybullet_action_width_matches_registry():
    for robot, r in pybullet_expert.ROBOT_DEFS.items():
        assert get_embodiment(robot).action_dim == len(r.arm_joints) + 1
        assert len(pybullet_expert.state_names(robot)) == len(r.arm_joints) + 4


def test_unknown_names_are_errors_listing_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="Valid simulators: metaworld, robosuite, pybullet"):
        generate("gazebo", str(tmp_path / "x"), 1)
    with pytest.raises(ValueError, match=r"Unknown task 'push-v2'.*reach-v3"):
        generate("metaworld", str(tmp_path / "x"), 1, tasks=["push-v2"])
    with pytest.raises(ValueError, match=r"Unknown robot 'panda'.*sawyer"):
        generate("metaworld", str(tmp_path / "x"), 1, robots=["panda"])
    with pytest.raises(ValueError, match=r"Unknown robot 'franka'.*panda, robosuite_sawyer"):
        resolve("robosuite", robots="panda,franka")
    with pytest.raises(ValueError, match=r"Unknown task 'lift'.*Lift, Stack, PickPlaceCan"):
        resolve("robosuite", tasks=["lift"])
    with pytest.raises(ValueError, match="episodes must be a positive"):
        generate("pybullet", str(tmp_path / "x"), 0)
    assert not (tmp_path / "x").exists()


def test_defaults_and_comma_separated_names():
    _, tasks, robots = resolve("metaworld")
    assert tasks == list(metaworld_expert.MT10_TASKS) and robots == ["sawyer"]
    _, tasks, robots = resolve("pybullet", tasks="pick,reach,pick", robots=["xarm6"])
    assert tasks == ["pick", "reach"] and robots == ["xarm6"]


def test_episode_seed_is_stable_and_distinct():
    s = episode_seed(0, "robosuite", "Lift", "panda", 3)
    assert s == episode_seed(0, "robosuite", "Lift", "panda", 3)  # no per-process hash salt
    others = {episode_seed(0, "robosuite", "Lift", "panda", 4), episode_seed(1, "robosuite", "Lift", "panda", 3),
              episode_seed(0, "robosuite", "Stack", "panda", 3), episode_seed(0, "robosuite", "Lift", "iiwa", 3),
              episode_seed(0, "robosuite", "Lift", "panda", 3, attempt=1)}
    assert s not in others and len(others) == 5
    assert 0 <= s < 2**31


def test_cli_arguments_parse():
    parser = add_generate_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--sim", "robosuite", "--out", "d", "--episodes", "2", "--tasks", "Lift,Stack",
                              "--robots", "panda,iiwa", "--image-size", "64", "--workers", "2", "--seed", "5",
                              "--overwrite"])
    assert args.tasks == ["Lift", "Stack"] and args.robots == ["panda", "iiwa"]
    assert (args.image_size, args.workers, args.seed, args.overwrite) == (64, 2, 5, True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--sim", "isaac", "--out", "d", "--episodes", "1"])


# ------------------------------------------------------------------------------------------ slow
def _load(root):
    data = pytest.importorskip("modeling_actprior.data")
    ds = data.load_lerobot_dataset(root)
    return ds, ds.meta


def _check_dataset(root, robot, n_episodes, tasks_text, image_size=None):
    ds, meta = _load(root)
    spec = get_embodiment(robot)
    assert meta.robot_type == robot and meta.num_episodes == n_episodes
    assert meta.action_dim == spec.action_dim and meta.fps == spec.fps
    assert meta.success == [True] * n_episodes
    assert (np.asarray(meta.episode_lengths) > 0).all()
    col = ds.column("action")
    acts = np.asarray(col.rows(0, len(col)), dtype=np.float32)
    assert acts.shape == (meta.num_frames, spec.action_dim) and np.isfinite(acts).all()
    assert set(tasks_text) <= set(meta.tasks)
    assert meta.provenance["sim"] and meta.provenance["expert_success_rate"] > 0
    if image_size:
        assert any(k.endswith(".front") for k in meta.camera_keys)
    return acts


@pytest.mark.slow
def test_metaworld_dataset_and_reproducibility(tmp_path):
    pytest.importorskip("metaworld")
    kw = dict(tasks=["reach-v3", "button-press-topdown-v3"], progress=False)
    (root,) = generate("metaworld", str(tmp_path / "mw"), 1, **kw)
    assert root == str(tmp_path / "mw")
    a = _check_dataset(root, "sawyer", 2, ["reach the goal position", "press the button from the top"])
    assert np.abs(a).max() <= 1.0
    (root2,) = generate("metaworld", str(tmp_path / "mw2"), 1, **kw)
    np.testing.assert_array_equal(a, _check_dataset(root2, "sawyer", 2, []))


@pytest.mark.slow
def test_metaworld_images_are_upright_uint8(tmp_path):
    pytest.importorskip("metaworld")
    res = metaworld_expert.collect_episode("reach-v3", "sawyer", 0, seed=0, image_size=32)
    assert res.success
    frames = res.episode.images["front"]
    assert frames.dtype == np.uint8 and frames.shape[1:] == (32, 32, 3)
    assert frames.shape[0] == res.episode.actions.shape[0] == res.episode.states.shape[0]
    # upright: the (grey) floor fills the bottom rows, the brighter table/robot are above it
    assert frames[0].std() > 5


@pytest.mark.slow
def test_robosuite_two_robots_one_dataset_each(tmp_path):
    pytest.importorskip("robosuite")
    roots = generate("robosuite", str(tmp_path / "rs"), 1, tasks=["Lift"], robots=["panda", "kinova3"],
                     progress=False, workers=2)
    assert roots == [str(tmp_path / "rs" / "panda"), str(tmp_path / "rs" / "kinova3")]
    for root, robot in zip(roots, ["panda", "kinova3"]):
        a = _check_dataset(root, robot, 1, ["lift the red cube"])
        assert np.abs(a).max() <= 1.0
    # workers=2 and workers=1 write the same data
    (again,) = generate("robosuite", str(tmp_path / "rs1"), 1, tasks=["Lift"], robots=["kinova3"], progress=False)
    np.testing.assert_array_equal(_check_dataset(again, "kinova3", 1, []), _check_dataset(roots[1], "kinova3", 1, []))


@pytest.mark.slow
def test_pybullet_joint_space_dataset(tmp_path):
    pytest.importorskip("pybullet")
    roots = generate("pybullet", str(tmp_path / "pb"), 1, robots=["franka_joint", "xarm6"], progress=False)
    widths = {}
    for root, robot in zip(roots, ["franka_joint", "xarm6"]):
        widths[robot] = _check_dataset(root, robot, 2, list(pybullet_expert.INSTRUCTIONS.values())).shape[1]
    assert widths == {"franka_joint": 8, "xarm6": 7}
    res1 = pybullet_expert.collect_episode("pick", "xarm6", 0, seed=7)
    res2 = pybullet_expert.collect_episode("pick", "xarm6", 0, seed=7)
    np.testing.assert_array_equal(res1.episode.actions, res2.episode.actions)
