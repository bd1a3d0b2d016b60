"""Fault injection shared by ``tests/test_faults.py`` and ``benchmarks/faults.py``: run a training stage as a real
process, SIGKILL it at a chosen moment, resume it, and check that nothing it left on disk is corrupt or a pickle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from synthetic import make_corpus

from modeling_actprior.training import CHECKPOINT_DIR, MODEL_WEIGHTS, list_checkpoints, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {1: ROOT / "training_scripts" / "train_stage1.py", 2: ROOT / "training_scripts" / "train_stage2.py"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}

#: Tiny runs: a checkpoint every 3 (Stage 1) / 2 (Stage 2) steps, the two newest kept.
STAGE_ARGS = {
    1: ["--max_steps", "24", "--checkpoint_every", "3", "--keep_last", "2", "--model_preset", "tiny", "--chunk_size",
        "8", "--history_length", "4", "--batch_size", "16", "--log_every", "3", "--eval_every", "6", "--no_progress",
        "--eval_windows", "32", "--seed", "5"],
    2: ["--max_steps", "8", "--checkpoint_every", "2", "--keep_last", "2", "--model_preset", "tiny", "--batch_size",
        "4", "--log_every", "2", "--eval_every", "0", "--val_fraction", "0", "--no_progress", "--seed", "3",
        "--distill_hold_steps", "2", "--distill_decay_steps", "4"],
}
#: A checkpoint at or after this step is "late" in the run.
LATE_STEP = {1: 15, 2: 6}

PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: a zip holding a pickle


def stage1_inputs(root: Path) -> list[str]:
    """Two robots, 6 episodes of 30 frames: the Stage-1 corpus (dataset folders)."""
    return ["--dataset", *make_corpus(root / "corpus", n_episodes=6, length=30)]


def stage2_inputs(root: Path) -> list[str]:
    """Two robots, 4 episodes of 20 frames with 16-px images, and a tiny prior with their statistics."""
    import modeling_actprior as ap
    from modeling_actprior.data import fit_normalizer, load_lerobot_dataset

    corpus = make_corpus(root / "demos", n_episodes=4, length=20, images=16)
    torch.manual_seed(0)
    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=8, history_length=4))
    prior.normalizer = fit_normalizer([load_lerobot_dataset(d) for d in corpus], prior.config.max_action_dim)
    prior.save_pretrained(root / "prior")
    return ["--dataset", *corpus, "--prior", str(root / "prior")]


def command(stage: int, inputs: list[str], out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPTS[stage]), *inputs, "--output_dir", str(out), *STAGE_ARGS[stage], *extra]


def run(cmd: list[str], timeout: float = 600) -> None:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / MODEL_WEIGHTS)


# ------------------------------------------------------------------------------------------------ kill points
def _steps(ckpt: Path) -> list[int]:
    return [int(p.name[5:]) for p in ckpt.glob("step-*")]


def kill_points(stage: int) -> dict[str, Callable[[Path], bool]]:
    """Moments to SIGKILL a run at, as predicates on its ``checkpoints/`` folder (polled every 2 ms)."""
    return {
        # just after the first checkpoint became visible
        "after_first_checkpoint": lambda ckpt: bool(_steps(ckpt)),
        # while a checkpoint is being written (its temporary folder exists) and an earlier one is complete
        "mid_checkpoint_write": lambda ckpt: bool(_steps(ckpt)) and any(ckpt.glob(".tmp-step-*")),
        # late in the run, between checkpoints (older ones are pruned, so any late one counts)
        "late_between_checkpoints": lambda ckpt: any(s >= LATE_STEP[stage] for s in _steps(ckpt)),
    }


def after_seconds(seconds: float) -> Callable[[Path], bool]:
    """A kill point at a wall-clock moment (``seconds`` after the process started)."""
    deadline = time.monotonic() + seconds
    return lambda ckpt: time.monotonic() >= deadline


def run_and_kill(cmd: list[str], watch: Path, predicate: Callable[[Path], bool], timeout: float = 600) -> bool:
    """Start ``cmd``, SIGKILL it as soon as ``predicate(watch)`` holds (``watch``: e.g. a run's ``checkpoints/``
    folder); True if it was killed there (False: it finished first)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    hit = False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if predicate(watch):
                hit = True
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    return hit and proc.returncode == -signal.SIGKILL


# ------------------------------------------------------------------------------------------------ disk checks
def pickle_files(folder: Path) -> list[str]:
    """Files under ``folder`` that are (or may be) pickles: by name, or by their first bytes unless they parse as
    safetensors. A checkpoint must have none."""
    found = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        if path.suffix in (".pkl", ".pickle", ".bin", ".pt", ".pth"):
            found.append(str(path))
            continue
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(PICKLE_MAGIC) or head == ZIP_MAGIC:
            if path.suffix == ".safetensors":
                try:
                    with safe_open(str(path), "pt"):
                        continue
                except Exception:  # noqa: BLE001 - not a safetensors file after all
                    pass
            found.append(str(path))
    return found


def checkpoint_problems(out: Path) -> list[str]:
    """What is wrong with the checkpoints a (possibly killed) run left: every visible ``step-*`` must be complete
    (all files present, their sha256 matching), its weights loadable, and no file a pickle. Empty when sound."""
    problems = []
    ckpt = out / CHECKPOINT_DIR
    visible = sorted(ckpt.glob("step-*"))
    complete = {Path(p) for p in list_checkpoints(str(out))}
    for folder in visible:
        if folder not in complete:
            problems.append(f"{folder}: visible but incomplete (no trainer_state.json)")
            continue
        try:
            verify_checkpoint(str(folder))
            load_file(folder / MODEL_WEIGHTS)
            for name in os.listdir(folder):
                if name.endswith(".json"):
                    json.loads((folder / name).read_text())
        except Exception as e:  # noqa: BLE001 - reported, not raised
            problems.append(f"{folder}: {type(e).__name__}: {e}")
        problems += [f"{p}: a pickle" for p in pickle_files(folder)]
    return problems


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ (or exist in one only); empty when bit-identical."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))



# ------------------------------------------------------------------------------------------------ generation
class FakeSim:
    """A stand-in for a simulator module (the contract of ``modeling_actprior.sim``): deterministic smooth episodes
    from the episode seed, ``delay`` seconds each, so ``actprior generate`` can be interrupted without a simulator."""

    TASKS = DEFAULT_TASKS = ("reach", "push")
    ROBOTS = DEFAULT_ROBOTS = ("sawyer", "xarm6")
    INSTRUCTIONS = {"reach": "reach the goal", "push": "push the puck"}
    delay = 0.0

    @staticmethod
    def embodiment(robot):
        import modeling_actprior as ap

        return ap.get_embodiment(robot)

    @staticmethod
    def state_names(robot):
        return ["s0", "s1"]

    @classmethod
    def collect_episode(cls, task, robot, episode, seed, image_size, max_attempts):
        import numpy as np

        from modeling_actprior.sim import EpisodeResult, episode_seed, make_episode

        time.sleep(cls.delay)
        s = episode_seed(seed, "metaworld", task, robot, episode)
        rng = np.random.default_rng(s)
        width, length = cls.embodiment(robot).action_dim, 12 + episode % 3
        t = np.arange(length)[:, None]
        actions = np.sin(rng.uniform(0.05, 0.2, (1, width)) * t + rng.uniform(0, 6, (1, width)))
        images = ({"front": rng.integers(0, 255, (length, image_size, image_size, 3), dtype=np.uint8)}
                  if image_size else None)
        ep = make_episode(actions, np.cumsum(actions[:, :2], axis=0), cls.INSTRUCTIONS[task], images)
        return EpisodeResult("metaworld", task, robot, episode, ep, attempts=1, seeds=[s], steps=length)


def fake_generate(out: str, episodes: int = 3, delay: float = 0.0, **kw) -> list[str]:
    """``actprior generate --sim metaworld`` with ``FakeSim`` in place of Meta-World (same writer, same layout)."""
    from modeling_actprior.sim import generate as gen

    FakeSim.delay = delay
    fakes = {"sim_module": lambda sim: FakeSim, "_check_installed": lambda sim: None, "_versions": lambda sim: {}}
    real = {name: getattr(gen, name) for name in fakes}
    for name, fake in fakes.items():
        setattr(gen, name, fake)
    try:
        return gen.generate("metaworld", out, episodes, progress=False, **kw)
    finally:  # in-process callers (tests) get the real simulators back
        for name, fn in real.items():
            setattr(gen, name, fn)


def generate_command(out: Path, episodes: int = 3, delay: float = 0.0) -> list[str]:
    return [sys.executable, "-c", f"import fault_injection as f; f.fake_generate({str(out)!r}, {episodes}, {delay})"]


def dataset_problems(root: Path) -> list[str]:
    """What is wrong with a generated dataset folder: it must load with full validation (meta agrees with data);
    empty when sound."""
    import tempfile

    from modeling_actprior.data import load_lerobot_dataset

    with tempfile.TemporaryDirectory(prefix="actprior-check-") as cache:
        try:
            load_lerobot_dataset(str(root), validate=True, cache_dir=cache)
        except Exception as e:  # noqa: BLE001 - reported, not raised
            return [f"{root}: {type(e).__name__}: {e}"]
    return []
