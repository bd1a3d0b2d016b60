"""The GPU speed check stays runnable on machines that cannot run it for real.

``benchmarks/gpu_check.sh`` is meant for a machine with an NVIDIA GPU, which CI never has; these tests run its
Python section on the CPU at the tiny preset (``--device cpu --gpu-preset tiny``, the documented dry run) so that it
does not rot, and check that the shell script stops at once, with a message that says why, where there is no GPU.
"""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEED = os.path.join(ROOT, "benchmarks", "speed.py")
GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", **extra}
    env.pop("OUT", None)
    return env


def test_the_gpu_section_dry_runs_on_the_cpu_and_writes_its_report(tmp_path):
    out = tmp_path / "speed_gpu.json"
    r = subprocess.run([sys.executable, SPEED, "--gpu-7b", "--device", "cpu", "--gpu-preset", "tiny",
                        "--gpu-dtype", "bfloat16", "--gpu-batch", "2", "--threads", "1", "--out", str(out)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["preset"] == "tiny" and result["dtype"] == "bfloat16"  # the dtype the GPU runs in
    train, inf = result["training"], result["inference"]
    assert train["batch_size"] == 2 and train["step"]["median_ms"] > 0 and train["fwd_bwd_flops"] > 0
    assert train["peak_memory_gib"] is None  # no CUDA allocator on the CPU
    assert result["ours_params"]["trainable"] < result["ours_params"]["total"]  # LoRA: the VLM's base is frozen
    for name in ("ours_pipeline", "ours_predict_action", "ours_flow_steps", "pi0_end_to_end", "pi0_sample_actions"):
        assert inf["latency"][name]["median_ms"] > 0, name
    assert 0 < inf["ratio_pipeline_vs_pi0_end_to_end"]["median"] < 10
    assert 0 < inf["flow_share_of_pipeline"] < 1
    report = (tmp_path / "speed_gpu.md").read_text()
    assert "ours pipeline / PI0 end-to-end" in report and "flow steps share of pipeline" in report


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi: the check would run")
def test_gpu_check_stops_at_once_without_nvidia_smi():
    r = subprocess.run(["bash", GPU_CHECK], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 3
    assert "no NVIDIA GPU" in r.stderr and "Nothing was run" in r.stderr
    assert "[gpu]" not in r.stdout


def test_gpu_check_stops_when_torch_sees_no_cuda_device(tmp_path):
    """A driver that answers but a torch without CUDA (a CPU wheel): exit 3 before any benchmark starts."""
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here")
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    env = _env(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable)
    r = subprocess.run(["bash", GPU_CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "torch sees no CUDA device" in r.stderr
    assert "[gpu]" not in r.stdout  # the benchmark itself never started


def test_the_history_token_scaling_pairs_on_and_off_over_consecutive_prompt_lengths(monkeypatch):
    """Section 4's scaling rows: the instructions give consecutive prompt lengths (so one token count's luck in the
    kernels' row blocking cannot set the ratio), "on" and "off" read the same instruction in every repetition, each
    length counts as often, and every language-model size gets its figures."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # speed.py puts its folders on the path: undo that afterwards
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import speed

    import modeling_actprior as ap

    monkeypatch.setattr(speed, "PROBES", {})
    monkeypatch.setattr(speed, "HISTORY_VLM_SCALES", (
        ("preset", {}), ("width 128, 3 layers", dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4))))
    seen = {True: [], False: []}
    predict = ap.VLAWithPriorForAction.predict_action

    def recording(self, *args, **kwargs):
        seen[self.config.history_token].append(int(kwargs["input_ids"].shape[1]))
        return predict(self, *args, **kwargs)

    monkeypatch.setattr(ap.VLAWithPriorForAction, "predict_action", recording)
    args = speed.parse_args(["--reps", "2", "--warmup", "1"])
    rows = speed.history_token_vs_vlm_size(args, "tiny", reps=3, prompt_lengths=4)  # rounded up to 4
    assert [r["language_model"] for r in rows] == ["preset", "width 128, 3 layers"]
    assert rows[0]["params"]["vlm"] < rows[1]["params"]["vlm"]
    for r in rows:
        first = r["prompt_tokens"][0]
        assert r["prompt_tokens"] == list(range(first, first + 4))
        assert r["reps"] == 4 and r["warmup"] == 4
        assert r["latency"]["on"]["n"] == r["latency"]["off"]["n"] == 4
        assert r["ratio_on_off"]["median"] > 0 and r["latency"]["history_token_alone"]["median_ms"] > 0
    assert seen[True] == seen[False]  # same instruction on and off, call by call (warm-up included)
    per_size = len(seen[True]) // 2
    for size in range(2):
        calls = seen[True][size * per_size:(size + 1) * per_size]
        assert len(calls) == 8 and sorted(calls) == sorted(rows[size]["prompt_tokens"] * 2)


def test_docs_page_block_is_replaced_and_the_prose_around_it_kept(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from docs_page import replace_block

    page = tmp_path / "page.md"
    page.write_text("# Title\n\nprose\n<!-- x:start -->\nold\n<!-- x:end -->\ntail\n")
    replace_block(str(page), "<!-- x:start -->", "<!-- x:end -->", "new")
    assert page.read_text() == "# Title\n\nprose\n<!-- x:start -->\nnew\n<!-- x:end -->\ntail\n"
    page.write_text("# no markers\n")
    with pytest.raises(ValueError, match="no <!-- x:start --> ... <!-- x:end --> block"):
        replace_block(str(page), "<!-- x:start -->", "<!-- x:end -->", "new")
    assert page.read_text() == "# no markers\n"


def test_the_report_is_rewritten_from_saved_results_without_measuring(tmp_path):
    """``--report-from``: the committed CPU results give the same tables, their goals re-evaluated (with the
    zero-flow bound of the few-step ratio); a file that is not such a result is refused and left as it is."""
    saved = tmp_path / "speed.json"
    shutil.copy(os.path.join(ROOT, "benchmarks", "results", "speed.json"), saved)
    r = subprocess.run([sys.executable, SPEED, "--report-from", str(saved)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the report only; no measurement" in r.stdout
    result = json.loads(saved.read_text())
    few = [g for g in result["goals"] if "-step pipeline <=" in g["goal"]]
    assert few and all(0 < g["zero_flow_bound"] <= g["measured"] for g in few)
    report = (tmp_path / "speed.md").read_text()
    assert "with the flow at zero cost" in report and "### Goals" in report
    other = tmp_path / "other.json"
    other.write_text('{"preset": "tiny"}')
    r = subprocess.run([sys.executable, SPEED, "--report-from", str(other)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "not the results of a CPU run" in r.stderr
    assert other.read_text() == '{"preset": "tiny"}'


def test_the_few_step_flow_share_is_measured_as_the_language_model_grows(monkeypatch):
    """The 2-step flow's share of predict_action per language-model size: the same action head at every size (so
    its share can only fall as the VLM grows), a share between 0 and 1, and a table in the report."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import speed

    monkeypatch.setattr(speed, "PROBES", {})
    monkeypatch.setattr(speed, "HISTORY_VLM_SCALES", (
        ("preset", {}), ("width 128, 3 layers", dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4))))
    args = speed.parse_args(["--reps", "2", "--warmup", "1"])
    rows = speed.few_step_share_vs_vlm_size(args, "tiny", reps=3)
    assert [r["language_model"] for r in rows] == ["preset", "width 128, 3 layers"]
    assert rows[0]["params"]["vlm"] < rows[1]["params"]["vlm"]
    assert rows[0]["params"]["action_head"] == rows[1]["params"]["action_head"]
    for r in rows:
        assert r["steps"] == speed.FEW_STEPS and r["latency"]["predict_action"]["n"] == 3
        assert 0 < r["flow_share"] < 1
    with open(os.path.join(ROOT, "benchmarks", "results", "speed.json")) as f:
        result = json.load(f)
    result["few_step_share_vs_vlm_size"] = rows
    assert "flow's share as the language model grows" in speed.report_cpu(result)
