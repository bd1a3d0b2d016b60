import ast
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

import modeling_actprior as ap
from modeling_actprior.hub import CUSTOM_PIPELINES, export_for_hub
from pipelines.robot_action import RobotActionPipeline

INSTRUCTIONS = ["reach the goal", "push the puck to the goal", "open the drawer"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random VLA (chunk 8, history 4) for a 4-D and an 8-D robot, exported with its pipeline."""
    torch.manual_seed(0)
    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=8, history_length=4))
    rng = np.random.default_rng(0)
    norm = ap.ActionNormalizer(prior.config.max_action_dim)
    norm.add_embodiment(ap.get_embodiment("sawyer"), rng.normal(size=(200, 4)) * [0.5, 0.5, 0.3, 1.0])
    norm.add_embodiment(ap.get_embodiment("kuka_iiwa"), rng.uniform(-2, 2, size=(200, 8)) + 3.0)
    prior.normalizer = norm
    vla = ap.VLAWithPriorForAction.from_prior(prior, "tiny").eval()
    processor = ap.ActionPriorProcessor.from_config(vla.config, vla.normalizer, instructions=INSTRUCTIONS)
    return export_for_hub(vla, processor, tmp_path_factory.mktemp("vla") / "export")


@pytest.fixture(scope="module")
def robot(checkpoint):
    return pipeline("robot-action", model=checkpoint, device="cpu")


def _image(seed=0, size=40):
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def _hist(steps, width, seed=0):
    return np.random.default_rng(seed).normal(size=(steps, width)).astype(np.float32)


def test_pipeline_is_registered_and_exported_as_custom_code(checkpoint, robot):
    assert isinstance(robot, RobotActionPipeline)
    config = json.loads(open(os.path.join(checkpoint, "config.json")).read())
    assert config["custom_pipelines"] == CUSTOM_PIPELINES
    assert config["custom_pipelines"]["robot-action"] == {
        "impl": "robot_action.RobotActionPipeline", "pt": ["AutoModel"], "type": "multimodal"}
    assert "AutoModel" in config["auto_map"] and os.path.isfile(os.path.join(checkpoint, "robot_action.py"))
    # The copied file must run where actprior is not installed: it imports only these.
    tree = ast.parse(open(os.path.join(checkpoint, "robot_action.py")).read())
    roots = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
             for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in (n.names if isinstance(n, ast.Import) else [n])}
    assert roots <= {"__future__", "os", "numpy", "torch", "transformers", "PIL"}


@pytest.mark.parametrize("embodiment, width", [("sawyer", 4), ("kuka_iiwa", 8)])
def test_actions_come_in_each_robots_own_width_and_units(checkpoint, robot, embodiment, width):
    out = robot(_image(), instruction=INSTRUCTIONS[0], history=_hist(3, width), embodiment=embodiment,
                generator=torch.Generator().manual_seed(5))
    spec = ap.get_embodiment(embodiment)
    assert out["actions"].shape == (8, width) and out["actions"].dtype == np.float32
    assert (out["embodiment"], out["action_names"], out["fps"], out["chunk_size"], out["control_mode"]) == (
        embodiment, list(spec.action_names), spec.fps, 8, spec.control_mode)
    # Raw units: exactly the model's own raw path (normalized sample -> the checkpoint's statistics).
    ref = robot.model.predict_raw_actions(robot.processor, _image(), INSTRUCTIONS[0], _hist(3, width), embodiment,
                                          generator=torch.Generator().manual_seed(5))
    np.testing.assert_allclose(out["actions"], ref.numpy(), rtol=0, atol=1e-6)


def test_single_and_batched_calls_agree_under_fixed_seeds(robot):
    names = ["sawyer", "kuka_iiwa", "sawyer"]
    hists = [_hist(3, 4, 1), _hist(0, 8), _hist(4, 4, 2)]
    images = [_image(i) for i in range(3)]
    batch = robot(images, instruction=INSTRUCTIONS, history=hists, embodiment=names, seed=[11, 12, 13])
    assert isinstance(batch, list) and [b["actions"].shape for b in batch] == [(8, 4), (8, 8), (8, 4)]
    for i in range(3):
        single = robot(images[i], instruction=INSTRUCTIONS[i], history=hists[i], embodiment=names[i], seed=11 + i)
        np.testing.assert_allclose(batch[i]["actions"], single["actions"], rtol=0, atol=1e-5)
    # One seed for the whole batch: every sample draws from its own generator seeded with it.
    shared = robot(images[:2], instruction=INSTRUCTIONS[:2], history=hists[:2], embodiment=names[:2], seed=7)
    alone = robot(images[1], instruction=INSTRUCTIONS[1], history=hists[1], embodiment=names[1], seed=7)
    np.testing.assert_allclose(shared[1]["actions"], alone["actions"], rtol=0, atol=1e-5)
    other = robot(images[0], instruction=INSTRUCTIONS[0], history=hists[0], embodiment="sawyer", seed=8)
    assert not np.allclose(other["actions"], batch[0]["actions"])


def test_numpy_pil_path_and_single_camera_dict_images_agree(robot, tmp_path):
    img = _image(3)
    path = tmp_path / "frame.png"
    Image.fromarray(img).save(path)
    kw = dict(instruction=INSTRUCTIONS[1], history=_hist(2, 4), embodiment="sawyer", seed=0)
    ref = robot(img, **kw)["actions"]
    for variant in (Image.fromarray(img), str(path), {"front": img}):
        np.testing.assert_array_equal(robot(variant, **kw)["actions"], ref)
    two = {"front": img, "wrist": _image(4)}
    np.testing.assert_array_equal(robot(two, camera="front", **kw)["actions"], ref)
    with pytest.raises(ValueError, match=r"2 cameras \['front', 'wrist'\].*camera='NAME'"):
        robot(two, **kw)


def test_empty_and_too_long_histories_are_accepted(robot):
    kw = dict(instruction=INSTRUCTIONS[0], embodiment="sawyer", seed=3)
    np.testing.assert_array_equal(robot(_image(), history=None, **kw)["actions"],
                                  robot(_image(), history=np.zeros((0, 4)), **kw)["actions"])
    long = _hist(9, 4)  # K = 4: the last 4 steps are what the model reads
    np.testing.assert_array_equal(robot(_image(), history=long, **kw)["actions"],
                                  robot(_image(), history=long[-4:], **kw)["actions"])


def test_errors_say_what_was_expected_and_how_to_fix_it(checkpoint, robot):
    kw = dict(instruction="reach the goal", history=_hist(2, 4))
    with pytest.raises(ap.UnknownEmbodimentError, match=r"'spot'.*statistics for: kuka_iiwa, sawyer"):
        robot(_image(), embodiment="spot", **kw)
    with pytest.raises(ap.UnknownEmbodimentError, match=r"known robot, but this checkpoint has no normalization"):
        robot(_image(), embodiment="panda", instruction="x", history=_hist(1, 7))
    with pytest.raises(ValueError, match=r"uint8 RGB array; got ndarray of shape \(40, 40, 3\) and dtype float64.*\* 255"):
        robot(_image() / 255.0, embodiment="sawyer", **kw)
    with pytest.raises(ValueError, match=r"transpose\(1, 2, 0\)"):
        robot(np.zeros((3, 40, 40), np.uint8), embodiment="sawyer", **kw)
    with pytest.raises(TypeError, match=r"torch tensor"):
        robot(torch.zeros(3, 40, 40), embodiment="sawyer", **kw)
    with pytest.raises(ValueError, match=r"history for 'sawyer' must be \(steps, 4\) raw actions \(x, y, z, gripper\)"):
        robot(_image(), embodiment="sawyer", instruction="x", history=_hist(2, 7))
    with pytest.raises(FileNotFoundError, match="no file at"):
        robot("/nonexistent/frame.png", embodiment="sawyer", **kw)
    bare = RobotActionPipeline(model=robot.model, processor=robot.processor, device="cpu")
    stats = (bare.model.normalizer, bare.processor.action_normalizer)
    try:
        bare.model.normalizer = bare.processor.action_normalizer = None
        with pytest.raises(ValueError, match=r"no action normalization statistics"):
            bare(_image(), embodiment="sawyer", **kw)
    finally:
        bare.model.normalizer, bare.processor.action_normalizer = stats


def test_concurrent_calls_from_threads_equal_sequential_calls(robot):
    jobs = [(i % 3, ["sawyer", "kuka_iiwa"][i % 2], 100 + i, (i % 5) + 3) for i in range(8)]

    def call(job):
        img, emb, seed, steps = job
        width = 4 if emb == "sawyer" else 8
        return robot(_image(img), instruction=INSTRUCTIONS[img], history=_hist(img, width), embodiment=emb,
                     seed=seed, num_inference_steps=steps)["actions"]

    sequential = [call(j) for j in jobs]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(call, jobs))
    for a, b in zip(sequential, concurrent):
        np.testing.assert_array_equal(a, b)


def test_remote_code_pipeline_runs_without_the_package(checkpoint, robot, tmp_path):
    ref = robot(_image(), instruction="reach the goal", history=_hist(2, 4), embodiment="sawyer", seed=4)["actions"]
    script = textwrap.dedent(f"""
        import sys
        sys.modules["modeling_actprior"] = None  # the installed package (and its pipelines) cannot be imported
        sys.modules["pipelines"] = None
        import numpy as np
        from transformers import pipeline
        robot = pipeline("robot-action", model={str(checkpoint)!r}, trust_remote_code=True, device="cpu")
        assert type(robot).__module__.startswith("transformers_modules"), type(robot).__module__
        img = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        hist = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
        out = robot(img, instruction="reach the goal", history=hist, embodiment="sawyer", seed=4)
        np.save({str(tmp_path / "out.npy")!r}, out["actions"])
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), ref)
