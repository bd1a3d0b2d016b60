"""A training run killed with SIGKILL at any moment resumes to the same weights, and never leaves a half-written
checkpoint behind."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from synthetic import make_corpus

from modeling_actprior.training import TRAINER_STATE, list_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "training_scripts", "train_stage1.py")
ARGS = ["--max_steps", "24", "--checkpoint_every", "3", "--keep_last", "2", "--model_preset", "tiny", "--chunk_size",
        "8", "--history_length", "4", "--batch_size", "16", "--log_every", "3", "--eval_every", "6", "--no_progress",
        "--eval_windows", "32", "--seed", "5"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    corpus = make_corpus(root / "corpus", n_episodes=6, length=30)
    out = root / "reference"
    subprocess.run([sys.executable, SCRIPT, "--dataset", *corpus, "--output_dir", str(out), *ARGS], env=ENV,
                   check=True, capture_output=True, timeout=600)
    return corpus, load_file(out / "final" / "model.safetensors")


def _wait_for(predicate, proc, timeout=300.0):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.002)
    return False


KILL_POINTS = {
    # just after the first checkpoint became visible
    "after_first_checkpoint": lambda ckpt: (ckpt / "step-000003").is_dir(),
    # while a checkpoint is being written (its temporary folder exists)
    "mid_checkpoint_write": lambda ckpt: any(p.name.startswith(".tmp-step-") and p.name != ".tmp-step-000003"
                                             for p in ckpt.glob(".tmp-step-*")),
    # late in the run, between checkpoints (older ones are pruned, so any late one counts)
    "late_between_checkpoints": lambda ckpt: any(int(p.name[5:]) >= 15 for p in ckpt.glob("step-*")),
}


@pytest.mark.parametrize("kill_point", sorted(KILL_POINTS))
def test_sigkill_at_any_point_then_resume_reaches_the_uninterrupted_weights(reference, tmp_path, kill_point):
    corpus, expected = reference
    out = tmp_path / "run"
    cmd = [sys.executable, SCRIPT, "--dataset", *corpus, "--output_dir", str(out), *ARGS]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hit = _wait_for(lambda: KILL_POINTS[kill_point](out / "checkpoints"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert hit, f"the run ended before reaching the kill point {kill_point}"
    assert not (out / "final").exists()

    # Every visible checkpoint is complete: half-written ones only ever exist under a temporary name.
    for ckpt in (out / "checkpoints").glob("step-*"):
        assert (ckpt / TRAINER_STATE).is_file() and (ckpt / "model.safetensors").is_file(), ckpt
    assert list_checkpoints(str(out)), "no complete checkpoint survived"

    subprocess.run(cmd + ["--resume_from_checkpoint", "latest"], env=ENV, check=True, capture_output=True, timeout=600)
    got = load_file(out / "final" / "model.safetensors")
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert not list((out / "checkpoints").glob(".tmp-step-*")), "a stale temporary checkpoint was left behind"
    assert not list((out / "checkpoints").glob(".trash-*")), "a half-deleted checkpoint was left behind"
