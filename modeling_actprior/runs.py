"""A training run folder as the analysis commands read it: its exported model (``final/``), its checkpoints
(``checkpoints/step-*/``) and the options it trained with; loading the Stage-2 VLA and its processor from it, and a
checkpoint's weights into that model. Used by ``actprior viz-latents``, the study's evaluation, the input-sensitivity
analysis and the real-time benchmark. (Where a single model argument points, a model folder, a run folder or a Hub id,
is ``checkpoint_paths.resolve_model_path``.)"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from .checkpoint_paths import FINAL_DIR, resolve_model_path
from .training.checkpointing import CHECKPOINT_DIR, TRAINER_STATE
from .training.checkpointing import MODEL_WEIGHTS as WEIGHTS


@dataclass
class VLARun:
    """What ``--model`` points at: the exported VLA (``final``), the run's checkpoints as ``(step, folder)`` sorted
    by step (empty for a bare model folder), and the training options its checkpoints recorded (``{}`` if none)."""

    final: str
    checkpoints: list[tuple[int, str]] = field(default_factory=list)
    train_args: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def find_run(path: str) -> VLARun:
    """``path`` is a training run folder (``final/`` + ``checkpoints/step-*/``) or a model folder (``config.json``)."""
    if not os.path.isdir(path):  # a Hub id has no checkpoints to read: this command needs the run on this machine
        raise FileNotFoundError(f"--model {path}: no such folder. Pass a train_stage2.py run folder (with final/ and "
                                "checkpoints/) or its final/ folder.")
    final = resolve_model_path(path, "--model", trained_by="train_stage2.py")  # a run folder means its final/
    if final == path:
        return VLARun(final=path, notes=[
            f"{path} is a model folder, not a run folder: the alignment over training (b) is skipped. Pass the run "
            "folder (the parent of final/, with checkpoints/) to draw it."])
    checkpoints = []
    root = os.path.join(path, CHECKPOINT_DIR)
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        folder = os.path.join(root, name)
        state_file, weights = os.path.join(folder, TRAINER_STATE), os.path.join(folder, WEIGHTS)
        if name.startswith("step-") and os.path.isfile(state_file) and os.path.isfile(weights):
            with open(state_file) as f:
                checkpoints.append((int(json.load(f)["step"]), folder))
    checkpoints.sort()
    run = VLARun(final=final, checkpoints=checkpoints)
    if checkpoints:
        with open(os.path.join(checkpoints[-1][1], TRAINER_STATE)) as f:
            run.train_args = json.load(f).get("args") or {}
    else:
        run.notes.append(f"{path} has no complete checkpoints ({root}/step-*/ with {WEIGHTS} and {TRAINER_STATE}): "
                         "the alignment over training (b) is skipped.")
    return run


def load_vla(folder: str, device: str | torch.device = "cpu"):
    """The ``actprior_vla`` model and its processor in ``folder``, or an error saying what is there instead."""
    from . import ActionPriorProcessor, VLAWithPriorForAction

    with open(os.path.join(folder, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "actprior_vla":
        hint = (" That is a Stage-1 prior (actions only, no latent readout); pass the train_stage2.py run built on it."
                if model_type == "actprior" else "")
        raise ValueError(f"--model {folder} holds a {model_type!r} model; this command needs a Stage-2 VLA "
                         f"(model_type 'actprior_vla', written by train_stage2.py).{hint}")
    model = VLAWithPriorForAction.from_pretrained(folder).to(device).eval()
    if model.normalizer is None:
        raise ValueError(f"--model {folder} has no action_normalizer.json, so its action space is unknown. Use the "
                         "final/ folder train_stage2.py writes.")
    try:
        processor = ActionPriorProcessor.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"--model {folder}: no processor there ({e.__class__.__name__}: {e}). train_stage2.py "
                                "saves it in final/ beside the weights.") from None
    return model, processor


def load_checkpoint_weights(model, folder: str) -> None:
    """Load ``folder/model.safetensors`` (the unwrapped model's state dict, as ``accelerator.save_state`` writes it)
    into ``model``. A LoRA run's checkpoints hold the PEFT-wrapped VLM: adapters of the same rank are added first
    (their targets come from the config, which ``apply_lora`` wrote at training time)."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(folder, WEIGHTS))
    lora_a = [v for k, v in state.items() if ".lora_A." in k]
    wrapped = hasattr(model.vlm, "peft_config")
    if lora_a and not wrapped:
        model.apply_lora(r=int(lora_a[0].shape[0]))
        model.to(model.device)
    elif wrapped and not lora_a:
        raise ValueError(f"{folder}/{WEIGHTS} has no LoRA adapters but the model has; checkpoints of one run share "
                         "one layout. Pass the run folder train_stage2.py wrote.")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{folder}/{WEIGHTS} does not fit the model in final/: missing {result.missing_keys[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}. The checkpoints and final/ must come from the same train_stage2.py run.")
    model.eval()


__all__ = ["CHECKPOINT_DIR", "FINAL_DIR", "TRAINER_STATE", "VLARun", "WEIGHTS", "find_run", "load_checkpoint_weights",
           "load_vla"]
