"""Nothing trusted blindly: each kind of bad input is refused with an error that names the file / episode / field
and what was expected, and leaves everything on disk as it was.

``CASES`` is also run by ``benchmarks/faults.py``. A case writes its bad input under a fresh folder (``setup``),
then the operation that must refuse it runs (``act``); the folder is fingerprinted (names, sizes, mtimes, sha256)
before and after. Loaders may fill the Hugging Face datasets cache, which lies outside that folder.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from synthetic import make_corpus

import modeling_actprior as ap
from modeling_actprior.data import (
    DatasetFormatError,
    Episode,
    VLAWindowDataset,
    fit_normalizer,
    load_lerobot_dataset,
    write_lerobot_dataset,
)
from modeling_actprior.training import stage1 as train_stage1
from modeling_actprior.training import stage2 as train_stage2

ROOT = Path(__file__).resolve().parents[1]

STAGE1 = ["--model_preset", "tiny", "--chunk_size", "8", "--history_length", "4", "--batch_size", "8",
          "--eval_every", "0", "--val_fraction", "0", "--no_progress", "--eval_windows", "8"]
DATA_FILE = "data/chunk-000/file-000.parquet"


@dataclass
class Case:
    """One kind of bad input: ``setup(root)`` writes it (returns what ``act`` needs); ``act(root, ctx)`` must raise
    ``error`` whose message matches every regex in ``says``."""

    name: str
    setup: Callable[[Path], Any]
    act: Callable[[Path, Any], Any]
    error: type[BaseException]
    says: tuple[str, ...]


# ------------------------------------------------------------------------------------------------ helpers
def fingerprint(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: folders by name, files by size, mtime and sha256."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            out[rel] = ("dir",)
        else:
            st = path.stat()
            out[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def run_case(case: Case, root: Path) -> tuple[bool, str]:
    """Set up and run ``case`` in the empty folder ``root``: ``(refused cleanly, what happened)``. Refused cleanly
    means: the expected error type, a message naming what the case requires, and nothing under ``root`` changed."""
    root.mkdir(parents=True, exist_ok=True)
    ctx = case.setup(root)
    before = fingerprint(root)
    try:
        case.act(root, ctx)
    except case.error as e:
        message = str(e)
        missing = [s for s in case.says if not _search(s, message)]
        if missing:
            return False, f"{type(e).__name__} without {missing}: {message}"
        after = fingerprint(root)
        if after != before:
            changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            return False, f"disk changed: {changed[:5]}"
        return True, f"{type(e).__name__}: {message}"
    except Exception as e:  # noqa: BLE001 - reported: the wrong kind of error
        return False, f"expected {case.error.__name__}, got {type(e).__name__}: {e}"
    return False, "no error was raised"


def _search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text, re.S) is not None


def _corpus(root: Path, **kw) -> list[str]:
    return make_corpus(root / "corpus", n_episodes=3, length=30, **kw)


def _rewrite(path: Path, fn: Callable) -> None:
    table = pq.read_table(path)
    df = table.to_pandas()
    fn(df)
    pq.write_table(pa.Table.from_pandas(df, schema=table.schema, preserve_index=False), path)


def _edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _prior(root: Path, **config) -> Path:
    torch.manual_seed(0)
    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=8, history_length=4, **config))
    rng = np.random.default_rng(0)
    norm = ap.ActionNormalizer(prior.config.max_action_dim)
    norm.add_embodiment(ap.get_embodiment("sawyer"), rng.normal(size=(100, 4)))
    prior.normalizer = norm
    prior.save_pretrained(root / "prior")
    return root / "prior"


@functools.lru_cache(maxsize=1)
def _robot():
    """A tiny VLA that reads 3-D states, for a 4-D robot (sawyer), exported with its pipeline (built once)."""
    from transformers import pipeline

    from modeling_actprior.hub import export_for_hub

    torch.manual_seed(0)
    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=8, history_length=4,
                                                                 max_state_dim=3))
    norm = ap.ActionNormalizer(prior.config.max_action_dim)
    norm.add_embodiment(ap.get_embodiment("sawyer"), np.random.default_rng(0).normal(size=(100, 4)))
    prior.normalizer = norm
    vla = ap.VLAWithPriorForAction.from_prior(prior, "tiny").eval()
    processor = ap.ActionPriorProcessor.from_config(vla.config, vla.normalizer, instructions=["reach the goal"])
    folder = export_for_hub(vla, processor, tempfile.mkdtemp(prefix="actprior-bad-input-vla-"))
    return pipeline("robot-action", model=folder, device="cpu")


def _observation(**kw) -> dict:
    return {"images": np.zeros((24, 24, 3), np.uint8), "instruction": "reach the goal", "embodiment": "sawyer",
            "history": np.zeros((2, 4), np.float32), **kw}


def _checkpointed_run(root: Path) -> list[str]:
    """A one-step Stage-1 run with its checkpoint; returns the arguments that resume it."""
    args = ["--dataset", *_corpus(root), "--output_dir", str(root / "run"), "--max_steps", "1", *STAGE1]
    train_stage1.main(args)
    return [*args[:-len(STAGE1) - 2], "--max_steps", "2", *STAGE1, "--resume_from_checkpoint", "latest"]


# ------------------------------------------------------------------------------------------------ the cases
def _nan_state_in_dataset(root):
    ds = Path(_corpus(root)[0])

    def poison(df):
        states = np.stack(df["observation.state"].to_numpy())
        states[30 + 2, 1] = np.nan  # episode 1, frame 2
        df["observation.state"] = list(states)

    _rewrite(ds / DATA_FILE, poison)
    return ds


def _inf_state_in_new_episode(root):
    rng = np.random.default_rng(0)
    states = rng.normal(size=(6, 2)).astype(np.float32)
    states[3, 0] = np.inf
    return [Episode(rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 2)).astype(np.float32), "reach"),
            Episode(rng.normal(size=(6, 4)).astype(np.float32), states, "reach")]


def _missing_state_stats(root):
    corpus = _corpus(root)
    for ds in corpus:
        _edit_json(Path(ds) / "meta" / "stats.json", lambda s: s.pop("observation.state"))
    return corpus


def _missing_stats_field(root):
    prior = _prior(root)
    _edit_json(prior / "action_normalizer.json", lambda d: d["stats"]["sawyer"].pop("q99"))
    return prior


def _stats_of_wrong_width(root):
    prior = _prior(root)
    _edit_json(prior / "action_normalizer.json", lambda d: d["stats"]["sawyer"].update(q01=[0.0, 0.0, 0.0]))
    return prior


def _dataset_of_another_robot_width(root):
    ds = Path(_corpus(root)[0])  # sawyer: 4-D actions

    def relabel(info):
        info["robot_type"] = "panda"  # a 7-D robot
        info["actprior"].pop("embodiment")

    _edit_json(ds / "meta" / "info.json", relabel)
    return ds


def _image_frame(root, frame: bytes):
    """A 16-px camera dataset in which episode 1, frame 3 is replaced by ``frame`` (encoded bytes)."""
    ds = Path(make_corpus(root / "demos", embodiments=("sawyer",), n_episodes=3, length=10, images=16)[0])

    def replace(df):
        col = "observation.images.front"
        cell = dict(df.at[10 + 3, col])
        cell["bytes"] = frame
        df.at[10 + 3, col] = cell

    _rewrite(ds / DATA_FILE, replace)
    return ds


def _read_all_windows(root, ds):
    data = load_lerobot_dataset(str(ds))
    windows = VLAWindowDataset(data, fit_normalizer([data], 32), history=4, chunk=8, cameras=["front"])
    for i in range(len(windows)):
        windows[i]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _damaged_checkpoint(damage: Callable[[Path], None], name: str):
    def setup(root):
        args = _checkpointed_run(root)
        damage(root / "run" / "checkpoints" / "step-000001" / name)
        return args

    return setup


def _damaged_weights(damage):
    def setup(root):
        prior = _prior(root)
        damage(prior / "model.safetensors")
        return prior

    return setup


def _newer_config(root):
    prior = _prior(root)
    _edit_json(prior / "config.json", lambda c: c.update(actprior_config_version=99))
    return prior


def _demos_and_long_chunk_prior(root):
    demos = make_corpus(root / "demos", embodiments=("sawyer",), n_episodes=3, length=10, images=16)
    torch.manual_seed(0)
    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=32, history_length=4))
    prior.normalizer = fit_normalizer([load_lerobot_dataset(d) for d in demos], prior.config.max_action_dim)
    prior.save_pretrained(root / "prior")
    return ["--dataset", *demos, "--prior", str(root / "prior"), "--output_dir", str(root / "run"), "--max_steps",
            "1", "--model_preset", "tiny", "--no_progress"]


def _load(root, path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path)


def _stage1(*extra):
    def act(root, corpus):
        train_stage1.main(["--dataset", *corpus, "--output_dir", str(root / "run"), "--max_steps", "1", *STAGE1,
                           *extra])

    return act


CASES = [
    # NaN / inf in states
    Case("nan_state_in_dataset", _nan_state_in_dataset, lambda r, ds: load_lerobot_dataset(str(ds)),
         DatasetFormatError, (DATA_FILE, r"episode 1, frame 2", r"observation\.state contains NaN or inf")),
    Case("inf_state_in_a_new_episode", _inf_state_in_new_episode,
         lambda r, eps: write_lerobot_dataset(r / "new", eps, ap.get_embodiment("sawyer"), fps=10),
         ValueError, (r"Episode 1 \(for .*new\)", r"states contain NaN or inf at frame 3, dimension 0")),
    Case("nan_state_at_inference", lambda r: None,
         lambda r, _: _robot()(**_observation(state=np.array([0.1, np.nan, 0.0]))),
         ValueError, (r"state 0 contains NaN or inf \(dimension 1", r"finite")),
    # statistics missing for an embodiment or a feature
    Case("stats_missing_for_the_embodiment", lambda r: None,
         lambda r, _: _robot()(**_observation(embodiment="xarm6", history=np.zeros((2, 6)))),
         ap.UnknownEmbodimentError, (r"'xarm6'", r"sawyer")),
    Case("stats_missing_for_a_feature", _missing_state_stats, _stage1("--max_state_dim", "8"),
         DatasetFormatError, (r"sawyer/meta/stats\.json", r"no statistics for 'observation\.state'", r"Recompute")),
    Case("stats_missing_a_field", _missing_stats_field, _load,
         ValueError, (r"prior/action_normalizer\.json", r"'sawyer'", r"lack \['q99'\]", r"expected keys")),
    # action width not matching the embodiment
    Case("stats_of_the_wrong_width", _stats_of_wrong_width, _load,
         ValueError, (r"prior/action_normalizer\.json", r"'sawyer'", r"q01 has 3 values", r"action_dim=4")),
    Case("dataset_of_another_action_width", _dataset_of_another_robot_width, lambda r, ds: load_lerobot_dataset(str(ds)),
         DatasetFormatError, (r"sawyer/meta/info\.json", r"action_dim=7", r"4")),
    Case("history_of_another_action_width", lambda r: None,
         lambda r, _: _robot()(**_observation(history=np.zeros((2, 7)))),
         ValueError, (r"'sawyer' must be \(steps, 4\) raw actions", r"\(2, 7\)")),
    # images of the wrong shape or dtype
    Case("image_of_wrong_dtype_at_inference", lambda r: None,
         lambda r, _: _robot()(**_observation(images=np.zeros((24, 24, 3), np.uint16))),
         ValueError, (r"Image 0", r"\(H, W, 3\) uint8", r"uint16")),
    Case("image_of_wrong_shape_at_the_processor", lambda r: None,
         lambda r, _: _robot().processor(images=np.zeros((24, 24, 4), np.uint8), text="reach the goal"),
         TypeError, (r"Image 0", r"\(H, W, 3\) uint8", r"\(24, 24, 4\)")),
    Case("image_of_wrong_shape_in_a_dataset", lambda r: _image_frame(r, _png(np.zeros((20, 20, 3), np.uint8))),
         _read_all_windows, DatasetFormatError,
         (r"observation\.images\.front of episode 1, frame 3", r"20x20 pixels", r"declares 16x16")),
    Case("image_of_wrong_dtype_in_a_dataset", lambda r: _image_frame(r, _png(np.zeros((16, 16), np.uint16))),
         _read_all_windows, DatasetFormatError,
         (r"observation\.images\.front of episode 1, frame 3", r"'I;16' image", r"expected 8-bit RGB")),
    Case("image_that_is_not_an_image_in_a_dataset", lambda r: _image_frame(r, b"not a png"),
         _read_all_windows, DatasetFormatError,
         (r"observation\.images\.front of episode 1, frame 3", r"can't be decoded as an image", r"expected PNG or JPEG")),
    # configs with impossible values
    Case("chunk_longer_than_every_episode", _corpus, _stage1("--chunk_size", "64"),
         ValueError, (r"--chunk_size is 64 frames", r"sawyer", r"episode lengths: 30, 30, 30", r"at most 30")),
    Case("prior_chunk_longer_than_every_demonstration", _demos_and_long_chunk_prior,
         lambda r, args: train_stage2.main(args),
         ValueError, (r"prior's chunk_size \(from .*prior\) is 32 frames", r"episode lengths: 10, 10, 10", r"at most 10")),
    Case("latent_width_zero", _corpus, _stage1("--latent_dim", "0"),
         ValueError, (r"latent_dim must be a positive integer; got 0",)),
    # damaged files
    Case("truncated_checkpoint_file", _damaged_checkpoint(_truncate, "model.safetensors"),
         lambda r, args: train_stage1.main(args),
         ValueError, (r"step-000001/model\.safetensors does not match the sha256", r"truncated or modified")),
    Case("tampered_checkpoint_file", _damaged_checkpoint(_flip_last_byte, "optimizer.safetensors"),
         lambda r, args: train_stage1.main(args),
         ValueError, (r"step-000001/optimizer\.safetensors does not match the sha256",)),
    Case("truncated_weights", _damaged_weights(_truncate), _load,
         ValueError, (r"prior/model\.safetensors does not match the sha256",)),
    Case("tampered_weights", _damaged_weights(_flip_last_byte), _load,
         ValueError, (r"prior/model\.safetensors does not match the sha256", r"truncated or modified")),
    # a checkpoint from a newer release
    Case("config_from_a_newer_version", _newer_config, _load,
         ValueError, (r"config version 99", r"newer than this code understands \(1\)", r"Upgrade actprior")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing_on_disk(case, tmp_path):
    ok, detail = run_case(case, tmp_path / "case")
    assert ok, f"{case.name}: {detail}"


def test_every_case_of_the_issue_is_covered():
    names = {c.name for c in CASES}
    for needed in ("nan_state", "stats_missing_for_the_embodiment", "stats_missing_for_a_feature", "width",
                   "image_of_wrong_shape", "image_of_wrong_dtype", "chunk_longer", "latent_width_zero", "truncated",
                   "tampered", "newer_version"):
        assert any(needed in n for n in names), needed


if __name__ == "__main__":  # python tests/test_bad_input.py: each case and its message
    for c in CASES:
        with tempfile.TemporaryDirectory() as d:
            print(c.name, *run_case(c, Path(d) / "case"), sep="\n  ", flush=True)
    os._exit(0)
