import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

import modeling_actprior as ap
from modeling_actprior.cli import main as cli_main
from modeling_actprior.hub import export_for_hub
from modeling_actprior.rollout import evaluation_seeds, plot_success, wilson_interval, write_video
from modeling_actprior.sim import episode_seed


@pytest.mark.parametrize("k, n, low, high", [
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (1, 1, 0.2065, 1.0),
    (81, 263, 0.2553, 0.3662),
])
def test_wilson_interval_matches_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_interval_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes must be in"):
        wilson_interval(3, 2)


def test_evaluation_seeds_are_disjoint_from_the_generators_seeds():
    for task in ("reach-v3", "push-v3", "drawer-open-v3"):
        train = {episode_seed(0, "metaworld", task, "sawyer", e, a) for e in range(200) for a in range(10)}
        evals = evaluation_seeds(0, "metaworld", task, "sawyer", 200)
        assert len(set(evals)) == 200 and not train & set(evals)
        assert evals == evaluation_seeds(0, "metaworld", task, "sawyer", 200)  # stable across calls


def test_gif_writer_and_success_chart(tmp_path):
    frames = [np.full((16, 16, 3), i * 20, np.uint8) for i in range(5)]
    path = write_video(frames, str(tmp_path / "v" / "ep.gif"), fps=10)
    with Image.open(path) as gif:
        assert gif.n_frames == 5 and gif.size == (16, 16)
    summary = {"sim": "metaworld", "model": "m", "overall": {"episodes": 4, "success_rate": 0.5, "ci95_low": 0.15,
                                                             "ci95_high": 0.85},
               "tasks": [{"task": "reach-v3", "success_rate": 0.5, "ci95_low": 0.15, "ci95_high": 0.85}]}
    png = plot_success(summary, str(tmp_path / "chart.png"))
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100


@pytest.fixture(scope="module")
def tiny_vla_dir(tmp_path_factory):
    torch.manual_seed(0)
    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=8, history_length=4))
    norm = ap.ActionNormalizer(prior.config.max_action_dim)
    norm.add_embodiment(ap.get_embodiment("sawyer"), np.random.default_rng(0).uniform(-1, 1, size=(200, 4)))
    prior.normalizer = norm
    vla = ap.VLAWithPriorForAction.from_prior(prior, "tiny").eval()
    proc = ap.ActionPriorProcessor.from_config(vla.config, vla.normalizer, instructions=["reach the goal position"])
    return export_for_hub(vla, proc, tmp_path_factory.mktemp("vla") / "ckpt")


def test_evaluate_metaworld_writes_results_chart_and_gif(tiny_vla_dir, tmp_path):
    if importlib.util.find_spec("metaworld") is None:  # not imported here: MuJoCo must load after its GL choice
        pytest.skip("metaworld is not installed")
    out = tmp_path / "eval" / "results.json"
    rc = cli_main(["evaluate", "--model", str(tiny_vla_dir), "--sim", "metaworld", "--tasks", "reach-v3",
                   "--episodes", "2", "--max-steps", "12", "--execute-steps", "4", "--out", str(out),
                   "--video-dir", str(tmp_path / "videos"), "--video-format", "gif", "--num-inference-steps", "2",
                   "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    task = res["tasks"][0]
    assert task["task"] == "reach-v3" and task["episodes"] == 2 and task["instruction"] == "reach the goal position"
    assert 0.0 <= task["ci95_low"] <= task["success_rate"] <= task["ci95_high"] <= 1.0
    assert res["overall"]["episodes"] == 2 and res["settings"]["seed_namespace"] == "metaworld/eval"
    for ep in task["episodes_detail"]:
        assert 1 <= ep["steps"] <= 12 and ep["plans"] == -(-ep["steps"] // 4)  # re-plans every 4 executed steps
    assert [ep["seed"] for ep in task["episodes_detail"]] == evaluation_seeds(0, "metaworld", "reach-v3", "sawyer", 2)
    assert (tmp_path / "eval" / res["chart"]).is_file()
    assert len(res["videos"]) == 1 and res["videos"][0].endswith("reach-v3_ep0.gif")  # first episode per task
    with Image.open(res["videos"][0]) as gif:
        assert gif.n_frames == task["episodes_detail"][0]["steps"] and gif.size == (64, 64)


@pytest.mark.slow
def test_evaluate_robosuite_lift_runs_closed_loop(tmp_path):
    if importlib.util.find_spec("robosuite") is None:
        pytest.skip("robosuite is not installed")
    torch.manual_seed(0)
    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=8, history_length=4))
    norm = ap.ActionNormalizer(prior.config.max_action_dim)
    norm.add_embodiment(ap.get_embodiment("panda"), np.random.default_rng(0).uniform(-1, 1, size=(200, 7)))
    prior.normalizer = norm
    vla = ap.VLAWithPriorForAction.from_prior(prior, "tiny").eval()
    proc = ap.ActionPriorProcessor.from_config(vla.config, vla.normalizer, instructions=["lift the cube"])
    ckpt = export_for_hub(vla, proc, tmp_path / "ckpt")
    out = tmp_path / "results.json"
    assert cli_main(["evaluate", "--model", str(ckpt), "--sim", "robosuite", "--tasks", "Lift", "--robot", "panda",
                     "--episodes", "1", "--max-steps", "10", "--out", str(out), "--video-dir", str(tmp_path / "v"),
                     "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["tasks"][0]["episodes_detail"][0]["steps"] == 10 and res["embodiment"] == "panda"
    from modeling_actprior.data.video import decode_span

    assert res["videos"][0].endswith(".mp4")  # MP4 as users share them (GIF only where no encoder is available)
    _, frames = decode_span(res["videos"][0], 0.0, 1e9)
    assert len(frames) == 10
