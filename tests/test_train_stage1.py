import json
import os
import signal
import subprocess
import sys
import time

import evaluate
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from synthetic import make_corpus
from transformers import AutoModel

import modeling_actprior as ap
from modeling_actprior.evaluation import repeat_last_action
from modeling_actprior.metrics import ACTION_ERROR_METRIC
from modeling_actprior.training import stage1 as train_stage1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "training_scripts", "train_stage1.py")

TINY = ["--model_preset", "tiny", "--chunk_size", "8", "--history_length", "4", "--batch_size", "16",
        "--log_every", "2", "--eval_every", "4", "--no_progress", "--eval_windows", "64", "--seed", "3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, n_episodes=6, length=30)
    return str(root)


def test_tiny_run_goes_from_script_to_a_loadable_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    result = train_stage1.main(["--dataset", corpus, "--output_dir", str(out), "--max_steps", "6",
                                "--checkpoint_every", "3", *TINY])
    final = out / "final"
    assert result["step"] == 6 and not result["interrupted"]
    assert {"model.safetensors", "config.json", "action_normalizer.json", "README.md", "loss_curve.png",
            "eval_results.json", "modeling_actprior.py"} <= set(os.listdir(final))
    model = AutoModel.from_pretrained(final)
    assert model.normalizer.embodiment_names == ["sawyer", "xarm6"]
    assert model.config.chunk_size == 8 and model.config.history_length == 4
    chunk = model.predict_actions(np.zeros((4, 7)), "xarm6", generator=torch.Generator().manual_seed(0))
    assert chunk.shape == (8, 7)
    ev = json.loads((final / "eval_results.json").read_text())["evaluation"]
    assert set(ev) == {"sawyer", "xarm6"}
    for row in ev.values():
        assert {"prior_mse", "repeat_last_mse", "mean_chunk_mse", "active_dims", "kl"} <= set(row)
    card = (final / "README.md").read_text()
    assert "pipeline_tag: robotics" in card and "repeat_last_mse" in card and "| sawyer |" in card
    # keep_last=3 and only complete checkpoints
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000003", "step-000006"]


def test_resume_after_sigterm_reaches_the_same_weights_as_an_uninterrupted_run(corpus, tmp_path):
    args = ["--dataset", corpus, "--max_steps", "40", "--checkpoint_every", "5", *TINY]
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "tests")}
    full = tmp_path / "full"
    subprocess.run([sys.executable, SCRIPT, *args, "--output_dir", str(full)], check=True, env=env,
                   capture_output=True, timeout=600)

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, SCRIPT, *args, "--output_dir", str(cut)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "checkpoints" / "step-000005").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    summary = json.loads((cut / "run_summary.json").read_text())
    assert summary["interrupted"] and summary["step"] < 40, summary
    assert not (cut / "final").exists()

    subprocess.run([sys.executable, SCRIPT, *args, "--output_dir", str(cut), "--resume_from_checkpoint", "latest"],
                   check=True, env=env, capture_output=True, timeout=600)
    a, b = load_file(full / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    hist_a = json.loads((full / "final" / "eval_results.json").read_text())["history"]
    hist_b = json.loads((cut / "final" / "eval_results.json").read_text())["history"]
    assert [h["lr"] for h in hist_a] == [h["lr"] for h in hist_b]


def test_action_error_metric_on_hand_made_cases():
    metric = evaluate.load(ACTION_ERROR_METRIC)
    r = metric.compute(predictions=[[1.0, 2.0, 3.0], [0.0, 0.0]], references=[[1.0, 0.0, 0.0], [1.0, 1.0]],
                       masks=[[1, 1, 0], [1, 0]])
    assert r == {"mse": pytest.approx((0 + 4 + 1) / 3), "l1": pytest.approx((0 + 2 + 1) / 3), "count": 3}
    with pytest.raises(ValueError, match="every mask is 0"):
        metric.compute(predictions=[[1.0]], references=[[0.0]], masks=[[0]])


def test_repeat_last_baseline_holds_the_last_real_action():
    hist = torch.tensor([[[1.0], [2.0], [3.0]], [[5.0], [6.0], [0.0]], [[9.0], [9.0], [9.0]]])
    mask = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    out = repeat_last_action(hist, mask, chunk_size=2)
    assert out[:, :, 0].tolist() == [[3.0, 3.0], [6.0, 6.0], [0.0, 0.0]]


def test_missing_dataset_fails_early_with_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="actprior generate"):
        train_stage1.main(["--dataset", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o"), *TINY])


def test_batch_larger_than_the_corpus_fails_before_training(corpus, tmp_path):
    with pytest.raises(ValueError, match="exceeds the .* training windows"):
        train_stage1.main(["--dataset", corpus, "--output_dir", str(tmp_path / "o"), *TINY, "--batch_size", "100000"])
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_dataset_without_action_statistics_fails_with_the_file_named(corpus, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(os.path.join(corpus, "sawyer"), broken)
    stats = json.loads((broken / "meta" / "stats.json").read_text())
    del stats["action"]
    (broken / "meta" / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(Exception, match="stats.json"):
        train_stage1.main(["--dataset", str(broken), "--output_dir", str(tmp_path / "o"), *TINY])


def test_unknown_yaml_option_is_refused_with_the_valid_ones(corpus, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: [{corpus}]\nlearning_rat: 0.1\n")
    with pytest.raises(SystemExit):
        train_stage1.main(["--config", str(cfg), "--output_dir", str(tmp_path / "o")])


def test_yaml_values_are_defaults_the_command_line_overrides(corpus, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: [{corpus}]\nmax_steps: 2\nlatent_dim: 6\nmodel_preset: tiny\n")
    result = train_stage1.main(["--config", str(cfg), "--output_dir", str(tmp_path / "o"), "--max_steps", "3",
                                "--chunk_size", "8", "--history_length", "4", "--batch_size", "8", "--no_progress"])
    assert result["step"] == 3
    assert ap.ActionPriorConfig.from_pretrained(tmp_path / "o" / "final").latent_dim == 6


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd, env, timeout_s: float) -> tuple[int, str]:
    """Run a launcher; on a hang, SIGABRT its whole process group so every rank's faulthandler prints where
    it stopped (the failure then says which call hung instead of only that it timed out)."""
    proc = subprocess.Popen(cmd, env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"launcher did not finish within {timeout_s:.0f} s; the ranks' stacks:\n{out[-12000:]}")
    return proc.returncode, out


def test_two_process_ddp_keeps_identical_weights(corpus, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "tests"), "OMP_NUM_THREADS": "1"}
    returncode, log = _launch(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         os.path.join(ROOT, "training_scripts", "configs", "cpu_ddp.yaml"), "--main_process_port", str(_free_port()),
         SCRIPT, "--dataset", corpus, "--output_dir", str(out), "--max_steps", "4", "--checkpoint_every", "4", *TINY],
        env, timeout_s=300)
    assert returncode == 0, log[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["ranks_identical"] is True


def test_a_teardown_that_never_returns_ends_the_process_instead_of_hanging(monkeypatch):
    """destroy_process_group() now and then hangs on gloo (pytorch#75097): the run is saved by then, so after the
    watchdog the process ends with status 0 rather than holding the launcher forever."""
    import threading
    import types

    from modeling_actprior.training import loop

    never = threading.Event()
    accelerator = types.SimpleNamespace(wait_for_everyone=lambda: None, trackers=[], process_index=0,
                                        state=types.SimpleNamespace(destroy_process_group=never.wait))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)

    def exit_(code):
        raise SystemExit(code)

    monkeypatch.setattr(loop.os, "_exit", exit_)
    with pytest.raises(SystemExit) as ended:
        loop.close_distributed(accelerator, destroy_timeout_s=0.2)
    assert ended.value.code == 0
    never.set()
