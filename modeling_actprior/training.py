"""What both training stages share: options from the command line and YAML, crash-safe checkpoints,
preemption handling, the data order that survives a restart, and the loss-curve plot.

Checkpoint layout under ``output_dir``::

    checkpoints/step-000200/      accelerator.save_state(...) + trainer_state.json
    checkpoints/step-000400/
    final/                         save_pretrained(...) of the trained model, card, plots

A checkpoint is written into ``checkpoints/.tmp-step-XXXXXX``, fsynced, then renamed: a run killed at
any moment leaves only complete ``step-*`` folders, and ``--resume_from_checkpoint latest`` picks the
newest of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("actprior.training")

CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# --------------------------------------------------------------------------------------------- options
def parse_with_yaml(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config FILE.yaml`` act as defaults that the command line overrides.

    Unknown keys in the YAML file are an error naming them, so a typo never silently trains something else.
    """
    pre, _ = parser.parse_known_args(argv)
    if getattr(pre, "config", None):
        import yaml

        with open(pre.config) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            parser.error(f"{pre.config} must hold a mapping of option: value; got {type(values).__name__}.")
        known = {a.dest for a in parser._actions}
        unknown = sorted(k for k in values if k.replace("-", "_") not in known)
        if unknown:
            parser.error(f"{pre.config}: unknown option(s) {unknown}. Valid options: {sorted(known - {'help', 'config'})}.")
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})
    return parser.parse_args(argv)


def add_training_arguments(parser: argparse.ArgumentParser, *, batch_size: int, learning_rate: float,
                           warmup_steps: int, eval_windows: int, val_loss: str) -> None:
    """The options both training stages share: resume/overwrite, optimization, precision, evaluation and
    checkpoint intervals, logging. Stage-specific defaults are passed in."""
    p = parser
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="start afresh even if --output_dir holds checkpoints of an earlier run (they are deleted)")
    p.add_argument("--batch_size", type=int, default=batch_size, help="windows per process per optimizer step")
    p.add_argument("--learning_rate", type=float, default=learning_rate)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--lr_scheduler", default="cosine", choices=["cosine", "linear", "constant", "constant_with_warmup"])
    p.add_argument("--warmup_steps", type=int, default=warmup_steps)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default=None,
                   help="default: what `accelerate config` says (fp32 is fastest on CPU)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of episodes held out, per dataset")
    p.add_argument("--eval_every", type=int, default=250, help=f"validation {val_loss} every N steps (0: off)")
    p.add_argument("--checkpoint_every", type=int, default=500, help="save a resumable checkpoint every N steps")
    p.add_argument("--keep_last", type=int, default=3, help="checkpoints kept on disk")
    p.add_argument("--eval_windows", type=int, default=eval_windows,
                   help="held-out windows per embodiment in the final evaluation")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--report_to", default="none", help="none, tensorboard, wandb, ... (accelerate trackers)")
    p.add_argument("--no_progress", action="store_true")


def add_config_field_arguments(parser: argparse.ArgumentParser, config_cls, group_title: str) -> list[str]:
    """One ``--<field>`` option per field of a dataclass-style transformers config (default: keep the preset's)."""
    group = parser.add_argument_group(group_title)
    names = []
    base_fields = {f.name for f in dataclasses.fields(config_cls.__mro__[1])} if dataclasses.is_dataclass(config_cls.__mro__[1]) else set()
    for f in dataclasses.fields(config_cls):
        if f.name in base_fields or f.name.startswith("_") or f.name.endswith("_config_version") or f.type not in ("int", "float", "str", "bool", int, float, str, bool):
            continue
        typ = {"int": int, "float": float, "str": str, "bool": _str2bool}.get(f.type, f.type if f.type is not bool else _str2bool)
        group.add_argument(f"--{f.name}", type=typ, default=None, help=f"override {config_cls.__name__}.{f.name}")
        names.append(f.name)
    return names


def _str2bool(v: str) -> bool:
    if str(v).lower() in ("1", "true", "yes", "on"):
        return True
    if str(v).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def parse_dataset_specs(specs: Sequence[str]) -> list[tuple]:
    """``["path", "path2:3.0"]`` -> ``[(path, 1.0), (path2, 3.0)]``. A folder holding several datasets
    (one per robot, as ``actprior generate`` writes) expands to each of them with the same weight."""
    out = []
    for spec in specs:
        path, weight = spec, 1.0
        m = re.match(r"^(.*):([0-9]*\.?[0-9]+)$", spec)
        if m and not os.path.exists(spec):
            path, weight = m.group(1), float(m.group(2))
        if weight <= 0:
            raise ValueError(f"Dataset weight must be positive; got {weight} in {spec!r}.")
        if os.path.isfile(os.path.join(path, "meta", "info.json")):
            out.append((path, weight))
            continue
        subs = sorted(os.path.join(path, d) for d in (os.listdir(path) if os.path.isdir(path) else [])
                      if os.path.isfile(os.path.join(path, d, "meta", "info.json")))
        if not subs:
            raise FileNotFoundError(
                f"--dataset {spec!r}: no LeRobot dataset there (expected {path}/meta/info.json, or sub-folders that "
                "have one). Generate one with `actprior generate --sim metaworld --out DIR --episodes 5`."
            )
        out.extend((s, weight) for s in subs)
    return out


# --------------------------------------------------------------------------------------------- data order
def endless_batches(mixture, batch_size: int, consumed: int, rank: int = 0, world: int = 1,
                    collate=None, num_workers: int = 0) -> Iterator[dict]:
    """Batches from a ``MixtureDataset`` forever, epoch after epoch, resumable.

    ``consumed`` counts draws already used by all processes together; the mixture's draw ``k`` of epoch
    ``e`` is a fixed function of ``(seed, e, k)``, so a resumed run sees exactly the batches an uninterrupted
    one would. Rank ``r`` of ``world`` takes draws ``r, r + world, ...``. ``mixture.num_samples`` must be a
    multiple of ``batch_size * world`` so no draw is dropped at an epoch's end.
    """
    per_step = batch_size * world
    if mixture.num_samples % per_step:
        raise ValueError(f"mixture.num_samples={mixture.num_samples} must be a multiple of batch_size x processes={per_step}.")
    epoch, start = divmod(int(consumed), mixture.num_samples)
    while True:
        mixture.set_epoch(epoch)
        mixture.set_start(start)
        loader = torch.utils.data.DataLoader(
            mixture, batch_size=batch_size, sampler=list(range(rank, len(mixture), world)),
            collate_fn=collate, num_workers=num_workers, persistent_workers=False,
            # Its own generator: a new iterator must not draw from the global RNG, or a resumed run
            # (which creates its iterator at a different step) would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(epoch),
        )
        yield from loader
        epoch, start = epoch + 1, 0


# --------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: str) -> list[str]:
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    steps = sorted((int(m.group(1)), d) for d in os.listdir(root) if (m := _STEP_DIR.match(d))
                   and os.path.isfile(os.path.join(root, d, TRAINER_STATE)))
    return [os.path.join(root, d) for _, d in steps]


def resolve_resume(output_dir: str, resume: str | None) -> str | None:
    """``None`` -> None; ``"latest"`` -> newest complete checkpoint or None (fresh start); a path -> that path."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    if not os.path.isfile(os.path.join(resume, TRAINER_STATE)):
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume}: not a complete checkpoint (no {TRAINER_STATE}). Use 'latest' or a "
            f"folder under {os.path.join(output_dir, CHECKPOINT_DIR)}."
        )
    return resume


def _fsync_tree(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _discard(checkpoint: str) -> None:
    """Delete a checkpoint folder so that no half-deleted one is ever visible: rename it out of sight first
    (atomic), then remove it. A kill during the removal leaves only a ``.trash-*`` folder, swept later."""
    parent, name = os.path.split(checkpoint.rstrip(os.sep))
    trash = os.path.join(parent, f".trash-{name}-{os.getpid()}")
    os.replace(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(accelerator, output_dir: str, step: int, trainer_state: dict[str, Any], keep_last: int = 3) -> str:
    """Atomically write ``checkpoints/step-XXXXXX`` (call on every rank; rank 0 renames and prunes)."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = os.path.join(root, f".tmp-step-{step:06d}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        for stale in os.listdir(root):  # left by a run killed while writing or deleting
            if stale.startswith((".tmp-step-", ".trash-")):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
            json.dump({**trainer_state, "step": step}, f, indent=2)
        _fsync_tree(tmp)
        if os.path.isdir(final):
            _discard(final)
        os.replace(tmp, final)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            _discard(old)
    accelerator.wait_for_everyone()
    return final


def start_or_resume(accelerator, output_dir: str, resume_from: str | None, overwrite: bool) -> tuple[int, list]:
    """Resume from ``resume_from`` ("latest" or a folder) and return ``(step, history)``; or start at step 0.

    Starting afresh in a folder that holds an earlier run's checkpoints is refused unless ``overwrite`` (then
    they are deleted), so two runs never mix. Call on every rank, after ``accelerator.prepare`` and after
    registering every object whose state the checkpoints carry.
    """
    resume = resolve_resume(output_dir, resume_from)
    earlier = list_checkpoints(output_dir)
    if earlier and not resume:
        if not overwrite:
            raise FileExistsError(
                f"--output_dir {output_dir} already holds checkpoints ({os.path.basename(earlier[-1])}). Resume "
                "with --resume_from_checkpoint latest, or pass --overwrite_output_dir to start afresh."
            )
        if accelerator.is_main_process:
            for old in earlier:
                _discard(old)
        accelerator.wait_for_everyone()
    if not resume:
        return 0, []
    accelerator.load_state(resume)
    state = load_trainer_state(resume)
    logger.info("resumed from %s at step %d", resume, state["step"])
    return state["step"], state.get("history", [])


def load_trainer_state(checkpoint: str) -> dict[str, Any]:
    with open(os.path.join(checkpoint, TRAINER_STATE)) as f:
        return json.load(f)


def check_output_dir_writable(output_dir: str, min_free_mb: float = 50.0) -> None:
    """Fail before training if ``output_dir`` can't be written or its disk is (nearly) full."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"--output_dir {output_dir} is not writable ({e}). Choose a folder you can write to.") from None
    free_mb = shutil.disk_usage(output_dir).free / 2**20
    if free_mb < min_free_mb:
        raise OSError(f"--output_dir {output_dir}: only {free_mb:.0f} MiB free; checkpoints need at least {min_free_mb:.0f} MiB.")


def close_distributed(accelerator) -> None:
    """Wait for every rank (rank 0 may still be evaluating and saving), then end the trackers and tear the
    process group down. Ending earlier on one rank leaves the other blocked on it. Call on every rank."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


class PreemptionGuard:
    """Turns SIGTERM (the usual preemption signal) into a flag the loop checks at step boundaries, so the
    run writes a last checkpoint and exits cleanly instead of dying mid-step."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# --------------------------------------------------------------------------------------------- validation
def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def fixed_val_batches(val_sets: dict, batch_size: int, collate, seed: int, max_per_embodiment: int = 2) -> list[dict]:
    """A few fixed held-out batches per embodiment for the running validation loss (same windows every time)."""
    out = []
    rng = np.random.default_rng(seed)
    for emb in sorted(val_sets):
        for ds in val_sets[emb][:max_per_embodiment]:
            idx = rng.choice(len(ds), size=min(batch_size, len(ds)), replace=False)
            out.append(collate([ds[int(i)] for i in idx]))
    return out


@torch.no_grad()
def validation_loss(model, batches: list[dict], device, seed: int, loss_key: str) -> float:
    """Mean of ``output.<loss_key>`` over ``batches`` in eval mode, with noise and times from a fixed seed."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    total = sum(getattr(model(**to_device(b, device), generator=gen), loss_key).item() for b in batches)
    model.train()
    return total / len(batches)


def ranks_agree(accelerator, model) -> bool:
    """True when every process holds bit-identical weights (DDP must keep them so). Call on every rank."""
    flat = torch.cat([p.detach().float().flatten() for p in accelerator.unwrap_model(model).parameters()])
    weights = (torch.arange(flat.numel(), device=flat.device) % 9973).float()
    digest = torch.stack([flat.sum(), (flat * weights).sum()])
    gathered = accelerator.gather(digest[None]).reshape(-1, 2)
    return bool(torch.all(gathered == gathered[0]))


def jsonable(d: dict) -> dict:
    """The JSON-serializable plain values of ``d`` (e.g. parsed options for a trainer state)."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, list, type(None)))}


# --------------------------------------------------------------------------------------------- reporting
def plot_curves(history: list[dict[str, float]], keys: Sequence[str], path: str, title: str) -> str | None:
    """Loss curves against step, one line per key found in ``history``; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    drawn = False
    for key in keys:
        pts = [(h["step"], h[key]) for h in history if key in h and h[key] is not None and math.isfinite(h[key])]
        if pts:
            ax.plot(*zip(*pts), label=key)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def model_card_template(name: str) -> str:
    """Path of a card template in the repository's ``model_cards/`` folder."""
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.path.join(here, "..", "model_cards"), os.path.join(here, "model_cards")):
        path = os.path.normpath(os.path.join(root, name))
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"Model card template {name} not found next to the package (model_cards/{name}).")


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str], fmt: Callable[[Any], str] = None) -> str:
    fmt = fmt or (lambda v: f"{v:.4f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
