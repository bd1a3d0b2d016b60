"""What both training stages share: options from the command line and YAML, crash-safe checkpoints,
preemption handling, the data order that survives a restart, and the loss-curve plot.

Checkpoint layout under ``output_dir``::

    checkpoints/step-000200/      model.safetensors, optimizer.{safetensors,json}, lr_scheduler.json,
                                  rng_state_<rank>.{safetensors,json}, trainer_state.json, sha256sums.json
    checkpoints/step-000400/
    final/                        save_pretrained(...) of the trained model, card, plots

Nothing is pickled: tensors are safetensors, everything else JSON, so resuming never runs code from a file
(DeepSpeed / FSDP runs are the exception: their sharded states use ``accelerator.save_state``'s own format).
A checkpoint is written into ``checkpoints/.tmp-step-XXXXXX``, fsynced, then renamed; ``final/`` is written
into a temporary sibling and swapped in. A run killed at any moment leaves only complete ``step-*`` folders,
``--resume_from_checkpoint latest`` picks the newest of them, and every file is checked against its sha256
before it is used.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .argtypes import float_in, int_at_least

logger = logging.getLogger("actprior.training")

CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
MODEL_WEIGHTS = "model.safetensors"
OPTIMIZER_STATE = "optimizer"
LR_SCHEDULER_STATE = "lr_scheduler"
GRAD_SCALER_STATE = "grad_scaler"
RNG_STATE = "rng_state"
CHECKSUMS = "sha256sums.json"
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
    p.add_argument("--batch_size", type=int_at_least(1), default=batch_size, help="windows per process per optimizer step")
    p.add_argument("--learning_rate", type=float_in(0, low_open=True), default=learning_rate)
    p.add_argument("--weight_decay", type=float_in(0), default=1e-4)
    p.add_argument("--lr_scheduler", default="cosine", choices=["cosine", "linear", "constant", "constant_with_warmup"])
    p.add_argument("--warmup_steps", type=int_at_least(0), default=warmup_steps)
    p.add_argument("--gradient_accumulation_steps", type=int_at_least(1), default=1)
    p.add_argument("--max_grad_norm", type=float_in(0), default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default=None,
                   help="default: what `accelerate config` says (fp32 is fastest on CPU)")
    p.add_argument("--val_fraction", type=float_in(0, 1, high_open=True), default=0.1,
                   help="share of episodes held out, per dataset")
    p.add_argument("--max_episodes_per_task", type=int_at_least(0), default=0,
                   help="use only the first N episodes of each task of each dataset (0: all); for data-size studies")
    p.add_argument("--eval_every", type=int_at_least(0), default=250, help=f"validation {val_loss} every N steps (0: off)")
    p.add_argument("--checkpoint_every", type=int_at_least(1), default=500, help="save a resumable checkpoint every N steps")
    p.add_argument("--keep_last", type=int_at_least(1), default=3, help="checkpoints kept on disk")
    p.add_argument("--eval_windows", type=int_at_least(1), default=eval_windows,
                   help="held-out windows per embodiment in the final evaluation")
    p.add_argument("--num_workers", type=int_at_least(0), default=0)
    p.add_argument("--log_every", type=int_at_least(1), default=10)
    p.add_argument("--report_to", default="none", help="none, tensorboard, wandb, ... (accelerate trackers)")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--allow_changed_options", default="", metavar="NAMES",
                   help="comma-separated options a resumed run may change on purpose (others are refused)")


def add_config_field_arguments(parser: argparse.ArgumentParser, config_cls, group_title: str,
                               skip: Sequence[str] = ()) -> list[str]:
    """One ``--<field>`` option per field of a dataclass-style transformers config (default: keep the preset's),
    except the fields named in ``skip`` (set by other options)."""
    group = parser.add_argument_group(group_title)
    names = []
    base_fields = {f.name for f in dataclasses.fields(config_cls.__mro__[1])} if dataclasses.is_dataclass(config_cls.__mro__[1]) else set()
    for f in dataclasses.fields(config_cls):
        # "float | None" (an optional number) takes a number on the command line like "float" does.
        ftype = f.type.removesuffix(" | None") if isinstance(f.type, str) else f.type
        if f.name in base_fields or f.name in skip or f.name.startswith("_") or f.name.endswith("_config_version") or ftype not in ("int", "float", "str", "bool", int, float, str, bool):
            continue
        typ = {"int": int, "float": float, "str": str, "bool": _str2bool}.get(ftype, ftype if ftype is not bool else _str2bool)
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
        from .sim.generate import INCOMPLETE_MARKER  # no simulator is imported with it

        marker = os.path.join(path, INCOMPLETE_MARKER)
        if os.path.isfile(marker):
            try:
                with open(marker) as f:
                    command = json.load(f).get("command", "the same `actprior generate` command")
            except (OSError, ValueError):
                command = "the same `actprior generate` command"
            raise ValueError(
                f"--dataset {spec!r}: this corpus is incomplete: the `actprior generate` run writing it was interrupted "
                f"before every robot was written ({marker}). Rerun the same generate command to finish it: {command}")
        # Hidden folders and a killed writer's leftovers (``<name>.tmp-<pid>``, ``<name>.old-<pid>``) are no datasets.
        subs = sorted(os.path.join(path, d) for d in (os.listdir(path) if os.path.isdir(path) else [])
                      if os.path.isfile(os.path.join(path, d, "meta", "info.json"))
                      and not d.startswith(".") and not re.search(r"\.(tmp|old)-\d+$", d))
        if not subs:
            raise FileNotFoundError(
                f"--dataset {spec!r}: no LeRobot dataset there (expected {path}/meta/info.json, or sub-folders that "
                "have one). Generate one with `actprior generate --sim metaworld --out DIR --episodes 5`."
            )
        out.extend((s, weight) for s in subs)
    return out


# --------------------------------------------------------------------------------------------- non-finite loss
class NonFiniteLossError(RuntimeError):
    """Training stopped because a batch gave a NaN or inf loss (before the optimizer stepped on it)."""


def check_finite_loss(loss: torch.Tensor, step: int, batch: dict, output_dir: str) -> None:
    """Stop training at once when ``loss`` is not finite, naming the step and the batch's windows (embodiment,
    episode, frame; those whose actions or history are themselves non-finite or huge first). Called before
    ``backward``, so no NaN reaches the weights and the checkpoints already on disk stay the latest good ones."""
    if bool(torch.isfinite(loss.detach()).all()):
        return
    emb = batch.get("embodiment") or []
    eps = batch.get("episode_index")
    frames = batch.get("frame_index")
    n = len(emb)
    suspects = []
    for key in ("actions", "history", "state"):
        x = batch.get(key)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim >= 2:
            flat = x.detach().reshape(x.shape[0], -1).float()
            bad = (~torch.isfinite(flat)).any(1) | (flat.abs().amax(1) > 1e6)
            suspects += [(key, int(i)) for i in torch.nonzero(bad).flatten().tolist()]

    def where(i):
        parts = [emb[i] if i < len(emb) else "?"]
        if isinstance(eps, torch.Tensor):
            parts.append(f"episode {int(eps[i])}")
        if isinstance(frames, torch.Tensor):
            parts.append(f"frame {int(frames[i])}")
        return " ".join(parts)

    if suspects:
        detail = "; ".join(f"{key} of {where(i)} is non-finite or beyond 1e6 in normalized units"
                           for key, i in suspects[:5])
    else:
        detail = "windows: " + ", ".join(where(i) for i in range(min(n, 8))) + (" ..." if n > 8 else "")
    ckpts = list_checkpoints(output_dir)
    latest = ckpts[-1] if ckpts else None
    raise NonFiniteLossError(
        f"Non-finite loss ({float(loss.detach()):g}) at step {step + 1}: {detail}. Training stopped before the optimizer "
        f"used it; {'the latest good checkpoint is ' + latest if latest else 'no checkpoint was written'}. Check those "
        "episodes with `actprior validate` (a value far outside the dataset's statistics), or lower --learning_rate.")


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
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first (temporary and trashed ones excluded)."""
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


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def _discard(checkpoint: str) -> None:
    """Delete a checkpoint folder so that no half-deleted one is ever visible: rename it out of sight first
    (atomic), then remove it. A kill during the removal leaves only a ``.trash-*`` folder, swept later."""
    parent, name = os.path.split(checkpoint.rstrip(os.sep))
    trash = os.path.join(parent, f".trash-{name}-{os.getpid()}")
    os.replace(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system can't."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_text(path: str, text: str) -> None:
    """Write ``text`` into ``path`` all or nothing: into a temporary sibling, fsynced, then renamed over ``path``. A
    run killed while writing leaves the previous file (or none), never half of one."""
    parent, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(parent, f".tmp-{name}-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Any, indent: int = 2) -> None:
    """``json.dump(obj)`` into ``path`` all or nothing (``write_text``), so a file whose presence means "this work is
    done" (a study's ``closed_loop.json``) is complete whenever it exists."""
    write_text(path, json.dumps(obj, indent=indent))


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """Write a folder (e.g. ``final/``) all or nothing: the body writes into a temporary sibling that is fsynced
    and then swapped in. An existing folder at ``path`` is replaced only once the new one is complete; a run killed
    while writing leaves the old folder (or none) and a ``.tmp-<name>-*`` sibling that the next call sweeps.

        with atomic_folder(os.path.join(output_dir, "final")) as tmp:
            model.save_pretrained(tmp)
    """
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    for stale in os.listdir(parent):  # left by a run killed while writing or swapping
        if stale.startswith((f".tmp-{name}-", f".trash-{name}-")):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    tmp = os.path.join(parent, f".tmp-{name}-{os.getpid()}")
    os.makedirs(tmp)
    try:
        try:
            yield tmp
            _fsync_tree(tmp)
        except Exception as e:
            # A full disk surfaces as OSError from our writers and as SafetensorError from safetensors'.
            if not (isinstance(e, OSError) or type(e).__name__ == "SafetensorError"):
                raise
            try:
                free = f"{shutil.disk_usage(parent).free / 2**20:.0f} MiB free"
            except OSError:
                free = "free space unknown"
            previous = "the previous one is kept" if os.path.isdir(path) else "nothing was left in its place"
            raise OSError(getattr(e, "errno", None),
                          f"Could not write {path}: {getattr(e, 'strerror', None) or e} ({free} on the disk of "
                          f"{parent}); {previous}. Free space (or choose another --output_dir) and rerun: "
                          "the checkpoints under checkpoints/ are intact.") from e
        if not os.path.isdir(path):
            os.replace(tmp, path)
        elif _exchange(tmp, path):  # tmp now holds the old folder
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _discard(path)
            os.replace(tmp, path)
        _fsync_path(parent)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# A checkpoint holds tensors (safetensors) and everything else as JSON: nothing is unpickled when resuming, so
# a checkpoint from elsewhere can't run code. Non-JSON structure is tagged: tensors by their safetensors key,
# tuples, numpy arrays, and dicts whose keys aren't plain strings (optimizer state is keyed by parameter index).
_TENSOR, _TUPLE, _NDARRAY, _ITEMS = "__tensor__", "__tuple__", "__ndarray__", "__items__"


def _encode(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    if isinstance(obj, torch.Tensor):
        # One copy on the CPU: safetensors refuses tensors that share memory (tied weights, views).
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        return {_NDARRAY: obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {_ITEMS: [[_encode(k, tensors, f"{key}.key{i}"), _encode(v, tensors, f"{key}.{k}")]
                         for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{key}: a {type(obj).__name__} can't be stored without pickle; expected tensors, numbers, "
                    "strings, lists, tuples or dicts of them.")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj:
        return tensors[obj[_TENSOR]]
    if _TUPLE in obj:
        return tuple(_decode(v, tensors) for v in obj[_TUPLE])
    if _NDARRAY in obj:
        return np.asarray(obj[_NDARRAY], dtype=obj["dtype"])
    if _ITEMS in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _save_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    try:
        save_file(tensors, path)
    except Exception as e:
        # safetensors reports a failed write (disk full, file too large) as its own error type; make it the
        # OSError it is, so callers handle every write failure in one place.
        m = re.search(r"os error (\d+)", str(e))
        if type(e).__name__ != "SafetensorError" or not m:
            raise
        raise OSError(int(m.group(1)), f"{os.strerror(int(m.group(1)))} while writing {path}") from e


def _save_json(obj: Any, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _save_state(obj: Any, folder: str, name: str) -> None:
    """``obj`` (a state dict) -> ``name.json`` and, if it holds tensors, ``name.safetensors``."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors, name)
    if tensors:
        _save_tensors(tensors, os.path.join(folder, f"{name}.safetensors"))
    _save_json(tree, os.path.join(folder, f"{name}.json"))


def _load_state(folder: str, name: str) -> Any:
    from safetensors.torch import load_file

    tensor_file = os.path.join(folder, f"{name}.safetensors")
    tensors = load_file(tensor_file) if os.path.isfile(tensor_file) else {}
    with open(os.path.join(folder, f"{name}.json")) as f:
        return _decode(json.load(f), tensors)


def _device_rng_modules() -> list[tuple[str, Any]]:
    return [(name, getattr(torch, name)) for name in ("cuda", "xpu")
            if hasattr(torch, name) and getattr(torch, name).is_available()]


def _rng_state() -> dict[str, Any]:
    """This process's random generators: Python's, NumPy's global one, torch's CPU one and one per accelerator."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    for name, module in _device_rng_modules():
        state[name] = module.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], source: str) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    for name, module in _device_rng_modules():
        if name in state:
            if len(state[name]) != module.device_count():
                logger.warning("%s: saved %d %s generator states, this machine has %d devices; resuming with the "
                               "first ones", source, len(state[name]), name, module.device_count())
            for i, s in enumerate(state[name][:module.device_count()]):
                module.set_rng_state(s, i)


def _is_sharded(accelerator) -> bool:
    """DeepSpeed / FSDP / Megatron shard model and optimizer states; those checkpoints are accelerate's own."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in {DistributedType.DEEPSPEED, DistributedType.FSDP,
                                            DistributedType.MEGATRON_LM}


def _register_for_sharded_checkpointing(accelerator, lr_scheduler) -> None:
    if lr_scheduler is not None and all(o is not lr_scheduler for o in accelerator._custom_objects):
        accelerator.register_for_checkpointing(lr_scheduler)


def _sha256_tree(folder: str, skip: str = CHECKSUMS) -> dict[str, str]:
    from modeling_actprior.modeling_actprior import _sha256

    sums = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), folder)
            if rel != skip:
                sums[rel] = _sha256(os.path.join(dirpath, name))
    return dict(sorted(sums.items()))


def verify_checkpoint(checkpoint: str) -> None:
    """Check every file of a checkpoint against the sha256 recorded when it was written (``sha256sums.json``).

    Raises ``ValueError`` naming the first file that is missing, truncated or altered.
    """
    manifest = os.path.join(checkpoint, CHECKSUMS)
    if not os.path.isfile(manifest):
        raise ValueError(f"{checkpoint} has no {CHECKSUMS}: it was not written by this version of actprior or is "
                         "incomplete. Resume from another checkpoint (pass its folder to --resume_from_checkpoint).")
    with open(manifest) as f:
        expected = json.load(f)
    found = _sha256_tree(checkpoint)
    for rel, digest in expected.items():
        path = os.path.join(checkpoint, rel)
        if rel not in found:
            raise ValueError(f"{path} is missing; {manifest} lists it. The checkpoint is incomplete: resume from "
                             "another one (pass its folder to --resume_from_checkpoint).")
        if found[rel] != digest:
            raise ValueError(f"{path} does not match the sha256 recorded when the checkpoint was written ({manifest}): "
                             "the file was truncated or modified. Resume from another checkpoint.")


def _write_checkpoint_files(accelerator, folder: str, model, optimizer, lr_scheduler) -> None:
    """Model, optimizer, LR schedule, loss scaler (rank 0) and this rank's random generators into ``folder``."""
    if _is_sharded(accelerator):
        accelerator.save_state(folder, safe_serialization=True)
        return
    if accelerator.is_main_process:
        tensors: dict[str, torch.Tensor] = {}
        for k, v in accelerator.unwrap_model(model).state_dict().items():
            _encode(v, tensors, k)
        _save_tensors(tensors, os.path.join(folder, MODEL_WEIGHTS))
        _save_state(optimizer.state_dict(), folder, OPTIMIZER_STATE)
        if lr_scheduler is not None:
            _save_state(lr_scheduler.state_dict(), folder, LR_SCHEDULER_STATE)
        if accelerator.scaler is not None:
            _save_state(accelerator.scaler.state_dict(), folder, GRAD_SCALER_STATE)
    _save_state({**_rng_state(), "accelerator_step": accelerator.step}, folder,
                f"{RNG_STATE}_{accelerator.process_index}")


def load_checkpoint(accelerator, checkpoint: str, model, optimizer, lr_scheduler=None) -> dict[str, Any]:
    """Restore model, optimizer, LR schedule, loss scaler and random generators from ``checkpoint`` (every file is
    first checked against its sha256) and return its trainer state. Reads safetensors and JSON only. Call on every
    rank, after ``accelerator.prepare``."""
    verify_checkpoint(checkpoint)
    if _is_sharded(accelerator):
        _register_for_sharded_checkpointing(accelerator, lr_scheduler)
        accelerator.load_state(checkpoint)
        return load_trainer_state(checkpoint)
    from safetensors.torch import load_file

    accelerator.unwrap_model(model).load_state_dict(load_file(os.path.join(checkpoint, MODEL_WEIGHTS)))
    optimizer.load_state_dict(_load_state(checkpoint, OPTIMIZER_STATE))
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(_load_state(checkpoint, LR_SCHEDULER_STATE))
    if accelerator.scaler is not None and os.path.isfile(os.path.join(checkpoint, f"{GRAD_SCALER_STATE}.json")):
        scaler_state = _load_state(checkpoint, GRAD_SCALER_STATE)
        if scaler_state:  # empty when saved before the first fp16 step
            accelerator.scaler.load_state_dict(scaler_state)
    rank_file = f"{RNG_STATE}_{accelerator.process_index}"
    if not os.path.isfile(os.path.join(checkpoint, f"{rank_file}.json")):
        logger.warning("%s has no random state for process %d (saved with fewer processes); its generators keep "
                       "their seeds, so the run won't repeat the uninterrupted one exactly", checkpoint,
                       accelerator.process_index)
        rank_file = f"{RNG_STATE}_0"
    rng = _load_state(checkpoint, rank_file)
    accelerator.step = rng.pop("accelerator_step")
    _set_rng_state(rng, checkpoint)
    return load_trainer_state(checkpoint)


def _all_ranks_ok(accelerator, ok: bool) -> bool:
    """True when every rank's ``ok`` is; a collective (it also synchronizes the ranks). Call on every rank."""
    if accelerator.num_processes == 1:
        return ok
    flags = accelerator.gather(torch.tensor([float(ok)], device=accelerator.device))
    return bool(flags.min().item() == 1.0)


def _save_failed(root: str, final: str, tmp: str, error: OSError | None, output_dir: str, remove: bool) -> OSError:
    """Remove the half-written folder (if ``remove``) and build the error that says what happened and what survived."""
    if remove:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    kept = [os.path.basename(c) for c in list_checkpoints(output_dir)]
    cause = (error.strerror or str(error)) if error is not None else "another process failed to write its part"
    return OSError(
        error.errno if error is not None else None,
        f"Could not write checkpoint {final}: {cause} ({free} on the disk of {root}). The partial folder was "
        f"removed; the earlier checkpoints are intact ({', '.join(kept) or 'none yet'}). Free disk space (or lower "
        "--keep_last) and continue with --resume_from_checkpoint latest.",
    )


def save_checkpoint(accelerator, output_dir: str, step: int, trainer_state: dict[str, Any], keep_last: int = 3, *,
                    model, optimizer, lr_scheduler=None) -> str:
    """Atomically write ``checkpoints/step-XXXXXX`` and prune to the newest ``keep_last``. Call on every rank.

    What is written (no pickle anywhere; every file listed with its sha256 in ``sha256sums.json``):

    * ``model.safetensors``: the unwrapped model's ``state_dict`` (fp32 master weights, same keys as the model);
    * ``optimizer.safetensors`` + ``optimizer.json``: optimizer tensors (moments, step counts) and the rest of its
      ``state_dict`` (param groups, hyper-parameters);
    * ``lr_scheduler.json``, ``grad_scaler.json`` (fp16 only): their ``state_dict``s;
    * ``rng_state_<rank>.json`` / ``.safetensors``: Python, NumPy, torch CPU and per-GPU generator states of each
      process, and accelerate's step counter;
    * ``trainer_state.json``: ``trainer_state`` plus ``step``; its presence marks a complete checkpoint.

    Under DeepSpeed / FSDP (sharded states) the first five are replaced by ``accelerator.save_state``'s own format
    (which pickles optimizer and random states). Everything goes into ``.tmp-step-XXXXXX``, is fsynced, then renamed:
    a kill at any moment leaves only complete ``step-*`` folders. A write error (disk full, quota) removes the
    partial folder, keeps the earlier checkpoints and raises an ``OSError`` saying so.
    """
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = os.path.join(root, f".tmp-step-{step:06d}")
    main = accelerator.is_main_process

    def prepare():
        if main:
            os.makedirs(root, exist_ok=True)
            for stale in os.listdir(root):  # left by a run killed while writing or deleting
                if stale.startswith((".tmp-step-", ".trash-")):
                    shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
            os.makedirs(tmp)

    def write():
        if _is_sharded(accelerator):
            _register_for_sharded_checkpointing(accelerator, lr_scheduler)
        _write_checkpoint_files(accelerator, tmp, model, optimizer, lr_scheduler)

    def commit():
        if main:
            _save_json({**trainer_state, "step": step}, os.path.join(tmp, TRAINER_STATE))
            _save_json(_sha256_tree(tmp), os.path.join(tmp, CHECKSUMS))
            _fsync_tree(tmp)
            if os.path.isdir(final):
                _discard(final)
            os.replace(tmp, final)
            _fsync_path(root)

    # Every rank runs every phase and then the same collective, so a write error on one rank stops all of them
    # (instead of leaving the others waiting at a barrier).
    for phase in (prepare, write, commit):
        error: OSError | None = None
        try:
            phase()
        except OSError as e:
            error = e
        if not _all_ranks_ok(accelerator, error is None):
            raise _save_failed(root, final, tmp, error, output_dir, remove=main)
    if main:
        for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            _discard(old)
    accelerator.wait_for_everyone()
    return final


#: Options a resumed run may change without altering what it computes (where it logs, how often it saves...).
RESUME_HARMLESS_OPTIONS = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "no_progress", "log_every", "checkpoint_every",
    "keep_last", "report_to", "num_workers", "eval_every", "eval_windows", "config", "allow_changed_options",
})


def check_resume_options(checkpoint: str, options: dict) -> None:
    """Refuse to resume ``checkpoint`` with options that change the result (another dataset, batch size, learning
    rate, preset, seed...): the run would silently mix two experiments. ``options["allow_changed_options"]`` (a
    comma-separated list) lets named ones through on purpose. A ``max_steps`` below the checkpoint's step is refused
    too (it would save a "final" model that is not the run's end)."""
    state = load_trainer_state(checkpoint)
    saved = state.get("args") or {}
    allowed = set(RESUME_HARMLESS_OPTIONS)
    allowed |= {x.strip() for x in str(options.get("allow_changed_options") or "").split(",") if x.strip()}
    changed = sorted(k for k in set(saved) | set(options) if k not in allowed and k != "max_steps"
                     and saved.get(k) != options.get(k))
    step = int(state.get("step", 0))
    if "max_steps" not in allowed and options.get("max_steps") is not None and int(options["max_steps"]) < step:
        raise ValueError(f"--max_steps {options['max_steps']} is below the step of the checkpoint being resumed "
                         f"({checkpoint}, step {step}). Resume with --max_steps >= {step}, or start a new run.")
    if changed:
        listed = ", ".join(f"--{k} {saved.get(k)!r} -> {options.get(k)!r}" for k in changed[:8])
        raise ValueError(
            f"Resuming {checkpoint} with other options than the run was started with ({listed}) would mix two runs. "
            "Resume with the same options, start a new --output_dir, or pass --allow_changed_options "
            f"{','.join(changed)} if the change is deliberate.")


def start_or_resume(accelerator, output_dir: str, resume_from: str | None, overwrite: bool, *, model, optimizer,
                    lr_scheduler=None, options: dict | None = None) -> tuple[int, list]:
    """Resume from ``resume_from`` ("latest" or a folder) and return ``(step, history)``; or start at step 0.

    Starting afresh in a folder that holds an earlier run's checkpoints is refused unless ``overwrite`` (then
    they are deleted), so two runs never mix; resuming with ``options`` (the run's command-line options) that differ
    from the checkpoint's in a way that changes the result is refused too (``check_resume_options``). Call on every
    rank, after ``accelerator.prepare``.
    """
    resume = resolve_resume(output_dir, resume_from)
    if resume and options is not None:
        check_resume_options(resume, options)
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
    state = load_checkpoint(accelerator, resume, model, optimizer, lr_scheduler)
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
        raise PermissionError(
            f"--output_dir {output_dir} is not writable ({e.strerror or e}). Choose a folder you can write to, or "
            "free space on its disk."
        ) from None
    free_mb = shutil.disk_usage(output_dir).free / 2**20
    if free_mb < min_free_mb:
        raise OSError(errno.ENOSPC, f"--output_dir {output_dir}: only {free_mb:.0f} MiB free on its disk; checkpoints "
                      f"need at least {min_free_mb:.0f} MiB. Free space or choose another --output_dir.")


def check_chunk_fits(datasets: Sequence, chunk_size: int, what: str = "--chunk_size") -> None:
    """Refuse an action chunk longer than every episode of a dataset: each of its windows would be mostly padding.

    ``datasets``: loaded ``TrajectoryDataset``s (``episode_lengths``, ``root``); ``chunk_size``: ``H`` in frames.
    """
    for ds in datasets:
        lengths = np.asarray(ds.episode_lengths, dtype=np.int64)
        if lengths.size and int(chunk_size) > int(lengths.max()):
            shown = ", ".join(str(int(n)) for n in lengths[:12]) + (", ..." if lengths.size > 12 else "")
            raise ValueError(
                f"{what} is {chunk_size} frames, longer than every episode of {ds.root} (episode lengths: {shown}; "
                f"the longest has {int(lengths.max())} frames), so no window would hold a full chunk. Use a chunk of "
                f"at most {int(lengths.max())} frames, or record longer episodes."
            )


def close_distributed(accelerator, destroy_timeout_s: float = 60.0) -> None:
    """Wait for every rank (rank 0 may still be evaluating and saving), then end the trackers and tear the
    process group down. Ending earlier on one rank leaves the other blocked on it. Call on every rank.

    ``destroy_process_group`` now and then never returns on gloo even after a barrier (pytorch/pytorch#75097).
    Everything is saved by then, so a teardown that does not finish within ``destroy_timeout_s`` is logged and
    left behind (a daemon thread) instead of holding the process, and the launcher, forever."""
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:
        tracker.finish()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    done = threading.Event()

    def destroy():
        accelerator.state.destroy_process_group()
        done.set()

    threading.Thread(target=destroy, name="actprior-destroy-process-group", daemon=True).start()
    if not done.wait(destroy_timeout_s):
        logger.warning("rank %d: torch.distributed.destroy_process_group() did not return within %.0f s "
                       "(pytorch/pytorch#75097); the run is complete and saved, exiting without it.",
                       accelerator.process_index, destroy_timeout_s)


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
