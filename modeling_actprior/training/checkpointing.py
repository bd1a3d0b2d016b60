"""Crash-safe, pickle-free, resumable checkpoints: save, load, verify, resume, and the state encoder.

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

import json
import logging
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch

from .atomic_io import discard_folder, fsync_path, fsync_tree

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
    from ..modeling_checkpoint import _sha256

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
            fsync_tree(tmp)
            if os.path.isdir(final):
                discard_folder(final)
            os.replace(tmp, final)
            fsync_path(root)

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
            discard_folder(old)
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
                discard_folder(old)
        accelerator.wait_for_everyone()
    if not resume:
        return 0, []
    state = load_checkpoint(accelerator, resume, model, optimizer, lr_scheduler)
    logger.info("resumed from %s at step %d", resume, state["step"])
    return state["step"], state.get("history", [])


def load_trainer_state(checkpoint: str) -> dict[str, Any]:
    with open(os.path.join(checkpoint, TRAINER_STATE)) as f:
        return json.load(f)
