import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hub_server import HubServer
from huggingface_hub import DatasetCard, HfApi, ModelCard
from huggingface_hub import constants as hf_constants
from synthetic import make_corpus, random_prior

import modeling_actprior as ap
from modeling_actprior.cli import main as cli_main
from modeling_actprior.hub import CUSTOM_PIPELINES, export_for_hub, push_dataset, push_model
from modeling_actprior.rollout import plot_success, wilson_interval, write_video

TOKEN = "hf_test_token"


@pytest.fixture(scope="module")
def hub():
    """The local Hub on 127.0.0.1; the suite runs offline (conftest), so the client is let online for it only."""
    offline = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = False
    try:
        with HubServer() as server:
            yield server
    finally:
        hf_constants.HF_HUB_OFFLINE = offline


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    prior = random_prior(history_length=4, second_robot="xarm6")
    vla = ap.VLAWithPriorForAction.from_prior(prior, "tiny").eval()
    proc = ap.ActionPriorProcessor.from_config(vla.config, vla.normalizer, instructions=["reach the goal"])
    return str(export_for_hub(vla, proc, tmp_path_factory.mktemp("vla") / "final"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """An `actprior evaluate` results file (made up numbers) with its chart and one GIF."""
    root = tmp_path_factory.mktemp("eval")
    rows = []
    for task, k, n in (("reach-v3", 7, 10), ("push-v3", 2, 10)):
        lo, hi = wilson_interval(k, n)
        rows.append({"task": task, "instruction": task, "episodes": n, "successes": k, "success_rate": k / n,
                     "ci95_low": lo, "ci95_high": hi, "mean_steps_to_success": 40.0, "episodes_detail": []})
    lo, hi = wilson_interval(9, 20)
    res = {"model": "local", "sim": "metaworld", "robot": "sawyer", "embodiment": "sawyer", "tasks": rows,
           "overall": {"episodes": 20, "successes": 9, "success_rate": 0.45, "ci95_low": lo, "ci95_high": hi,
                       "mean_steps_to_success": 40.0},
           "settings": {"episodes_per_task": 10, "seed": 0, "seed_namespace": "metaworld/eval", "execute_steps": 8,
                        "max_steps": None, "image_size": 64, "num_inference_steps": None}}
    res["chart"] = os.path.basename(plot_success(res, str(root / "results_success.png")))
    res["videos"] = [write_video([np.full((8, 8, 3), 40 * i, np.uint8) for i in range(3)], str(root / "v.gif"), 10)]
    (root / "results.json").write_text(json.dumps(res))
    return str(root / "results.json")


def test_push_uploads_a_self_contained_repo_and_a_second_push_is_a_no_op(hub, checkpoint, results):
    first = push_model(checkpoint, "org/tiny-vla", results_path=results, dataset_repo_id="org/demos",
                       base_model="org/tiny-prior", token=TOKEN, endpoint=hub.url)
    files = hub.files("org/tiny-vla")
    assert first["changed"] and {
        "model.safetensors", "config.json", "modeling_actprior_vla.py", "configuration_actprior_vla.py",
        "processing_actprior.py", "action_space.py", "scheduling_flow_matching.py", "robot_action.py",
        "processor_config.json", "tokenizer.json", "scheduler/scheduler_config.json", "action_normalizer.json",
        "README.md", "eval/results.json", "eval/success.png", "eval/rollout.gif"} <= set(files)
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    config = json.loads(files["config.json"])
    assert config["custom_pipelines"] == CUSTOM_PIPELINES and config["auto_map"]["AutoModel"].endswith(
        "VLAWithPriorForAction")
    n_commits = len(hub.commits("org/tiny-vla"))
    again = push_model(checkpoint, "org/tiny-vla", results_path=results, dataset_repo_id="org/demos",
                       base_model="org/tiny-prior", token=TOKEN, endpoint=hub.url)
    assert not again["changed"] and again["commit"] == first["commit"]
    assert len(hub.commits("org/tiny-vla")) == n_commits
    # The local folder is untouched by staging (no README, no pipeline edits written through links).
    assert json.load(open(os.path.join(checkpoint, "config.json"))) == config


def test_model_card_metadata_validates_and_holds_the_success_rates(hub, checkpoint, results):
    push_model(checkpoint, "org/tiny-vla", results_path=results, dataset_repo_id="org/demos",
               base_model="org/tiny-prior", token=TOKEN, endpoint=hub.url)
    card = ModelCard(hub.files("org/tiny-vla")["README.md"].decode())
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "robotics", "apache-2.0")
    assert data.datasets == ["org/demos"] and data.base_model == "org/tiny-prior"
    assert {"robotics", "actprior", "sawyer", "xarm6"} <= set(data.tags)
    rates = {r.dataset_config: r.metric_value for r in data.eval_results}
    assert rates == {"reach-v3": 0.7, "push-v3": 0.2, "all tasks": 0.45}
    assert all(r.metric_type == "success_rate" and r.task_type == "robotics" for r in data.eval_results)
    assert "95% CI [0.397, 0.892]" in data.eval_results[0].metric_name  # Wilson 7/10
    assert "![success rate per task](eval/success.png)" in card.text and "![a rollout](eval/rollout.gif)" in card.text
    assert "| reach-v3 | 10 | 7 | 0.700 | [0.397, 0.892] |" in card.text
    assert 'pipeline("robot-action"' in card.text


def test_model_pulled_back_from_the_hub_gives_the_local_actions(hub, checkpoint, tmp_path):
    push_model(checkpoint, "org/pull-vla", token=TOKEN, endpoint=hub.url)
    model = ap.VLAWithPriorForAction.from_pretrained(checkpoint)
    proc = ap.ActionPriorProcessor.from_pretrained(checkpoint)
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    hist = np.random.default_rng(1).normal(size=(3, 7))
    local = model.predict_raw_actions(proc, img, "reach the goal", hist, "xarm6",
                                      generator=torch.Generator().manual_seed(0)).numpy()
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "hist.npy", hist)
    script = textwrap.dedent(f"""
        import numpy as np, torch
        import modeling_actprior
        from transformers import AutoModel, AutoProcessor, pipeline
        img, hist = np.load({str(tmp_path / 'img.npy')!r}), np.load({str(tmp_path / 'hist.npy')!r})
        model = AutoModel.from_pretrained("org/pull-vla")
        proc = AutoProcessor.from_pretrained("org/pull-vla")
        a = model.predict_raw_actions(proc, img, "reach the goal", hist, "xarm6",
                                      generator=torch.Generator().manual_seed(0)).numpy()
        robot = pipeline("robot-action", model="org/pull-vla", device="cpu")
        b = robot(img, instruction="reach the goal", history=hist, embodiment="xarm6",
                  generator=torch.Generator().manual_seed(0))["actions"]
        np.save({str(tmp_path / 'a.npy')!r}, a)
        np.save({str(tmp_path / 'b.npy')!r}, b)
    """)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
           "HF_TOKEN": TOKEN, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    proc_run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
    assert proc_run.returncode == 0, proc_run.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), local)
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), local)
    assert any(path.startswith("/org/pull-vla/resolve/") for _, path in hub.state.requests)


def test_dataset_push_renders_a_card_from_info_json_and_is_idempotent(hub, tmp_path):
    make_corpus(tmp_path / "demos", embodiments=("sawyer", "xarm6"), n_episodes=2, length=10)
    first = push_dataset(str(tmp_path / "demos"), "org/demos", token=TOKEN, endpoint=hub.url)
    files = hub.files("org/demos", "dataset")
    assert first["changed"] and {"sawyer/meta/info.json", "xarm6/meta/info.json", "README.md"} <= set(files)
    card = DatasetCard(files["README.md"].decode())
    assert card.data.task_categories == ["robotics"] and {"LeRobot", "sawyer", "xarm6"} <= set(card.data.tags)
    assert "| sawyer | sawyer | 4 | x, y, z, gripper | ee_delta | 80 | 2 | 20 |" in card.text
    assert "| xarm6 | xarm6 | 7 |" in card.text and "| frames | 40 |" in card.text
    n = len(hub.commits("org/demos", "dataset"))
    assert not push_dataset(str(tmp_path / "demos"), "org/demos", token=TOKEN, endpoint=hub.url)["changed"]
    assert len(hub.commits("org/demos", "dataset")) == n


def test_push_command_line(hub, checkpoint, tmp_path, capsys):
    make_corpus(tmp_path / "one", embodiments=("sawyer",), n_episodes=1, length=8)
    rc = cli_main(["push", "--model", checkpoint, "--repo-id", "org/cli-vla", "--private", "--dataset",
                   str(tmp_path / "one" / "sawyer"), "--dataset-repo-id", "org/cli-demos", "--token", TOKEN,
                   "--endpoint", hub.url])
    assert rc == 0
    out = capsys.readouterr().out
    assert "model org/cli-vla: new commit" in out and "dataset org/cli-demos: new commit" in out
    info = HfApi(endpoint=hub.url, token=TOKEN).repo_info("org/cli-vla")
    assert info.private and "robot_action.py" in {s.rfilename for s in info.siblings}
    with pytest.raises(SystemExit, match="--dataset needs --dataset-repo-id"):
        cli_main(["push", "--dataset", str(tmp_path / "one"), "--token", TOKEN, "--endpoint", hub.url])
