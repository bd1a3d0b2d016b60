"""Checkpoints of the models that sample actions: weights (safetensors only) with their sha256 (``weights_sha256.json``,
checked before loading), the flow sampler (``scheduler/``), the per-embodiment action statistics
(``action_normalizer.json``), and weights in aligned storage of their own after loading.

This file is copied next to exported checkpoints for ``trust_remote_code`` loading, with the model files that import it."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from .action_space import ACTION_NORMALIZER_NAME, ActionNormalizer
from .scheduling_flow_matching import FlowMatchingActionScheduler

logger = hf_logging.get_logger(__name__)

SCHEDULER_SUBFOLDER = "scheduler"


#: Byte alignment of the CPU allocator's blocks (what a freshly built model's tensors have).
_ALIGNMENT = 64


def _own_aligned_storage(model: nn.Module) -> int:
    """Give every CPU parameter and buffer of ``model`` that is not ``_ALIGNMENT``-byte aligned storage of its own.

    safetensors tensors come out of the file at their header offset (8-byte aligned), and some CPU kernels (seen with
    the fused transformer-encoder layer on AMD EPYC with AVX-512) take another vectorized path for unaligned inputs,
    so a reloaded model differed from the one saved by ~1e-8 although its weights were bit-identical. Copying those
    tensors into fresh allocations makes a loaded model compute exactly what the saved one did. Returns how many
    tensors were copied."""
    copied = 0
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type == "cpu" and t.numel() and t.data_ptr() % _ALIGNMENT:
                t.data = t.data.clone(memory_format=torch.contiguous_format)
                copied += 1
    return copied


class ActionCheckpointMixin:
    """``save_pretrained`` / ``from_pretrained`` for models that sample actions: besides weights
    (safetensors only) and config, a checkpoint carries the flow sampler (``scheduler/``) and the
    per-embodiment action statistics (``action_normalizer.json``). Put it first in the bases; ``_flow_decoder`` names
    the model's ``FlowMatchingActionDecoder`` attribute."""

    _flow_decoder = "decoder"

    def compile_flow(self, enable: bool = True, num_inference_steps: int | tuple[int, ...] | None = None,
                     batch_size: int = 1, **compile_kwargs):
        """Sample actions through a ``torch.compile``d flow loop (``FlowMatchingActionDecoder.compile_flow``, with
        this model's scheduler): by default the scheduler's own step count is compiled now, at ``batch_size``, so the
        first chunk does not wait for the compiler. ``enable=False`` goes back to the eager loop. Returns the model.

        ``robot.model.compile_flow(num_inference_steps=2)`` on a ``pipeline("robot-action")`` compiles its 2-step
        flow."""
        if num_inference_steps is None:
            num_inference_steps = self.scheduler.config.num_inference_steps
        getattr(self, self._flow_decoder).compile_flow(enable, num_inference_steps, batch_size,
                                                       scheduler=self.scheduler, **compile_kwargs)
        return self

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        kwargs.setdefault("safe_serialization", True)
        if not kwargs["safe_serialization"]:
            raise ValueError("actprior checkpoints are written as safetensors only; drop safe_serialization=False.")
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self.scheduler.save_pretrained(os.path.join(save_directory, SCHEDULER_SUBFOLDER))
            if self.normalizer is not None:
                self.normalizer.save_pretrained(save_directory)
            _write_checksums(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if os.path.isdir(str(pretrained_model_name_or_path)):
            _check_model_type(str(pretrained_model_name_or_path), cls)
            _verify_checksums(str(pretrained_model_name_or_path))
        wants_info = kwargs.get("output_loading_info", False)
        kwargs["output_loading_info"] = True
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as e:
            if type(e).__name__ != "SafetensorError":
                raise
            raise ValueError(
                f"The weights in {pretrained_model_name_or_path} cannot be read as safetensors ({e}): the file is "
                "truncated or was modified. Download or export the checkpoint again."
            ) from None
        # transformers only prints a load report; tensors it leaves uninitialised would make a model of NaN.
        problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(problems.values()):
            listed = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:8]))}"
                               + (f" and {len(v) - 8} more" if len(v) > 8 else "") for k, v in problems.items() if v)
            raise ValueError(
                f"{pretrained_model_name_or_path} does not hold the weights of a {cls.__name__} of its config "
                f"({listed}). It was saved by another model or is incomplete; export the checkpoint again with "
                "save_pretrained.")
        _own_aligned_storage(model)
        # The model was built on the meta device; a sampler made here holds real tensors.
        default = FlowMatchingActionScheduler.from_config(model.scheduler.config)
        model.scheduler, model.normalizer = _load_sidecars(pretrained_model_name_or_path, default, kwargs)
        return (model, info) if wants_info else model


CHECKSUMS_NAME = "weights_sha256.json"


def _sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_checksums(folder: str) -> None:
    """Record the sha256 of every weight file, so a truncated or altered file is caught at load time."""
    import json

    sums = {n: _sha256(os.path.join(folder, n)) for n in sorted(os.listdir(folder)) if n.endswith(".safetensors")}
    with open(os.path.join(folder, CHECKSUMS_NAME), "w") as f:
        json.dump(sums, f, indent=2)


def _check_model_type(folder: str, cls) -> None:
    """A clear error when ``folder`` holds another kind of checkpoint than ``cls`` loads (an ``actprior_vla`` folder
    given where a prior is expected, say), before transformers tries to fit one into the other."""
    import json

    path = os.path.join(folder, "config.json")
    expected = getattr(cls.config_class, "model_type", None)
    if not expected or not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            found = json.load(f).get("model_type")
    except (OSError, ValueError):
        return  # transformers reports an unreadable config itself
    if found and found != expected:
        raise ValueError(f"{folder} is a {found} checkpoint; {cls.__name__} needs an {expected} one (its config.json "
                         f"says model_type={found!r}). Pass the folder of a {expected} model.")


def _verify_checksums(folder: str) -> None:
    import json

    path = os.path.join(folder, CHECKSUMS_NAME)
    if not os.path.isfile(path):
        logger.warning("%s has no %s: its weights cannot be checked against what was saved (verification off). "
                       "Re-save it with save_pretrained to record them.", folder, CHECKSUMS_NAME)
        return
    try:
        with open(path) as f:
            sums = json.load(f)
        if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
            raise ValueError("expected a JSON object of file name -> sha256 hex digest")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a valid checksum file ({e}); re-save the checkpoint with save_pretrained, or "
                         "delete the file to load without verification.") from None
    root = os.path.realpath(folder)
    for name, expected in sums.items():
        file = os.path.realpath(os.path.join(folder, name))
        if os.path.commonpath([root, file]) != root:
            raise ValueError(f"{path} lists {name!r}, which lies outside the checkpoint folder: refused. A checksum "
                             "file only names files inside its own checkpoint.")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} is missing: {CHECKSUMS_NAME} lists it. Copy the whole checkpoint folder.")
        if _sha256(file) != expected:
            raise ValueError(
                f"{file} does not match the sha256 recorded when the checkpoint was saved ({CHECKSUMS_NAME}): the "
                "file was truncated or modified. Download or export the checkpoint again."
            )


def _load_sidecars(path, default_scheduler, kwargs):
    """The scheduler and normalizer saved beside the weights (local folder or Hub repo), if present."""
    hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "force_download") if k in kwargs}
    path = str(path)
    scheduler, normalizer = default_scheduler, None
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, SCHEDULER_SUBFOLDER)):
            scheduler = FlowMatchingActionScheduler.from_pretrained(path, subfolder=SCHEDULER_SUBFOLDER)
        if os.path.isfile(os.path.join(path, ACTION_NORMALIZER_NAME)):
            normalizer = ActionNormalizer.from_pretrained(path)
        return scheduler, normalizer
    from transformers.utils import cached_file

    if cached_file(path, f"{SCHEDULER_SUBFOLDER}/{FlowMatchingActionScheduler.config_name}",
                   _raise_exceptions_for_missing_entries=False, **hub):
        scheduler = FlowMatchingActionScheduler.from_pretrained(path, subfolder=SCHEDULER_SUBFOLDER, **hub)
    norm_file = cached_file(path, ACTION_NORMALIZER_NAME, _raise_exceptions_for_missing_entries=False, **hub)
    if norm_file:
        normalizer = ActionNormalizer.from_pretrained(norm_file)
    return scheduler, normalizer
