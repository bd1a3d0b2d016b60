"""The batch keys every part shares (data pipeline, training, models, pipeline) and the one set of checks of a
model's action-side inputs, so that each mistake gets the same message wherever it is made.

This file is copied next to exported checkpoints for ``trust_remote_code`` loading, so it imports only its
siblings, relatively.
"""

from __future__ import annotations

import torch

from .action_space import check_finite

HISTORY = "history"  # (B, K, D_max) normalized, padded past actions
HISTORY_MASK = "history_mask"  # (B, K) bool: real history steps
ACTIONS = "actions"  # (B, H, D_max) normalized, padded future chunk
ACTION_MASK = "action_mask"  # (B, H) bool: real chunk steps
DIM_MASK = "dim_mask"  # (B, D_max) bool: the embodiment's real action dimensions
STATE = "state"  # (B, S_max) standardized, zero-padded proprioceptive state
EMBODIMENT = "embodiment"  # list of embodiment names
# The VLM's inputs, as its processor makes them.
PIXEL_VALUES = "pixel_values"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"


def check_state(state: torch.Tensor | None, batch: int, max_state_dim: int) -> None:
    """Refuse a current state the model cannot read: any state when it reads none (``max_state_dim = 0``), a shape other
    than ``(batch, max_state_dim)`` (standardized, zero-padded), or NaN / inf."""
    if state is None:
        return
    if max_state_dim == 0:
        raise ValueError(
            f"Got a state of shape {tuple(state.shape)} but this model reads no state (max_state_dim=0). Drop state, "
            "or train a prior with max_state_dim > 0 on data that records it."
        )
    if state.ndim != 2 or tuple(state.shape) != (batch, max_state_dim):
        raise ValueError(
            f"state must be (batch={batch}, max_state_dim={max_state_dim}), standardized and zero-padded; got shape "
            f"{tuple(state.shape)}."
        )
    check_finite(state, "state")


def check_action_inputs(config, history: torch.Tensor | None, history_mask: torch.Tensor | None,
                        dim_mask: torch.Tensor | None, actions: torch.Tensor | None = None,
                        action_mask: torch.Tensor | None = None, state: torch.Tensor | None = None,
                        batch: int | None = None) -> None:
    """Check the action-side inputs of a model of ``config`` (an ``ActionPriorConfig``): shapes, lengths, finiteness.
    ``None`` skips an input; ``batch`` defaults to the history's."""
    c = config
    if history is not None:
        if history.ndim != 3 or history.shape[-1] != c.max_action_dim:
            raise ValueError(
                f"history must be (batch, steps, max_action_dim={c.max_action_dim}) normalized and padded; got "
                f"shape {tuple(history.shape)}. Pad raw actions with ActionNormalizer.normalize first."
            )
        if history.shape[1] > c.history_length:
            raise ValueError(
                f"history has {history.shape[1]} steps but this model reads at most history_length="
                f"{c.history_length}. Pass the last {c.history_length} actions."
            )
        if history_mask is not None and history_mask.shape != history.shape[:2]:
            raise ValueError(f"history_mask must be {tuple(history.shape[:2])}; got {tuple(history_mask.shape)}.")
        check_finite(history, "history")
        batch = history.shape[0] if batch is None else batch
    check_state(state, batch, c.max_state_dim)
    if dim_mask is not None and (dim_mask.ndim != 2 or dim_mask.shape[-1] != c.max_action_dim
                                 or (batch is not None and dim_mask.shape[0] != batch)):
        raise ValueError(f"dim_mask must be (batch{'' if batch is None else f'={batch}'}, {c.max_action_dim}); got "
                         f"{tuple(dim_mask.shape)}.")
    if actions is not None:
        if actions.ndim != 3 or actions.shape[1:] != (c.chunk_size, c.max_action_dim) or (
                batch is not None and actions.shape[0] != batch):
            raise ValueError(
                f"actions must be (batch{'' if batch is None else f'={batch}'}, chunk_size={c.chunk_size}, "
                f"max_action_dim={c.max_action_dim}) normalized and padded; got {tuple(actions.shape)}."
            )
        check_finite(actions, "actions")
        if action_mask is not None and action_mask.shape != actions.shape[:2]:
            raise ValueError(f"action_mask must be {tuple(actions.shape[:2])}; got {tuple(action_mask.shape)}.")


__all__ = ["ACTIONS", "ACTION_MASK", "ATTENTION_MASK", "DIM_MASK", "EMBODIMENT", "HISTORY", "HISTORY_MASK", "INPUT_IDS",
           "PIXEL_VALUES", "STATE",
           "check_action_inputs", "check_state"]
