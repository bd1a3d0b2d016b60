"""Real-time chunking (Black et al. 2025, "Real-Time Execution of Action Chunking Flow Policies"): the chunk being
executed as a guidance target for the next one. The first ``inference_delay`` actions are committed (kept exactly), the
overlap up to ``execution_horizon`` is pulled toward the previous chunk through the flow with a weight that decays over
the horizon, the rest is free. ``integrate_flow`` runs the guided loop when given a ``ChunkGuidance``.

This file is copied next to exported checkpoints for ``trust_remote_code`` loading, with the model files that import it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ChunkGuidance:
    """Real-time chunking (Black et al. 2025, "Real-Time Execution of Action Chunking Flow Policies"): what a new
    chunk must agree with, in the normalized padded action space.

    Args:
        target (`(B, H, D_max)`): the not yet executed actions of the chunk being executed, aligned with the new
            chunk's steps (its first ``inference_delay`` steps run while the new chunk is computed), zero-padded past
            their end; float32.
        inference_delay (`int`): ``d``, in control steps: the new chunk's first ``d`` actions are replaced by
            ``target``'s exactly (they are already committed).
        execution_horizon (`int` or one per sample): ``h``, the steps of the new chunk that overlap ``target``
            (the previous chunk's remaining length); guidance decays over ``d..h`` and is 0 after (``rtc_weights``).
        max_weight (`float`): ``beta``, the cap of the guidance scale (5 in the paper); 0 turns guidance off.
    """

    target: torch.Tensor
    inference_delay: int
    execution_horizon: int | list[int]
    max_weight: float = 5.0

    def weights(self) -> torch.Tensor:
        """``(B, H)`` per-step guidance weights (``rtc_weights`` of each sample's horizon)."""
        b, h = self.target.shape[:2]
        horizons = self.execution_horizon if isinstance(self.execution_horizon, (list, tuple)) else [
            self.execution_horizon] * b
        if len(horizons) != b:
            raise ValueError(f"ChunkGuidance has {b} targets but {len(horizons)} execution horizons.")
        return torch.stack([rtc_weights(h, self.inference_delay, e) for e in horizons]).to(self.target.device)


def rtc_weights(chunk_size: int, inference_delay: int, execution_horizon: int) -> torch.Tensor:
    """The soft mask of real-time chunking, ``(chunk_size,)``: 1 for the ``inference_delay`` committed steps, then
    ``c * (e^c - 1) / (e - 1)`` with ``c`` falling linearly from ``(h - d) / (h - d + 1)`` toward 0 up to the
    ``execution_horizon`` ``h`` (the overlap with the previous chunk), then 0 (the paper's exponential schedule)."""
    d, h = int(inference_delay), int(execution_horizon)
    if not 0 <= d <= h <= chunk_size:
        raise ValueError(f"Real-time chunking needs 0 <= inference_delay <= execution_horizon <= chunk_size "
                         f"({chunk_size}); got inference_delay={d}, execution_horizon={h}.")
    i = torch.arange(chunk_size, dtype=torch.float32)
    c = (h - i) / (h - d + 1)
    w = c * torch.expm1(c) / math.expm1(1.0)
    return torch.where(i < d, torch.ones_like(w), torch.where(i < h, w, torch.zeros_like(w)))


def _guidance_scale(t: float, max_weight: float) -> float:
    """``min(beta, (1 - tau) / (tau * r^2))`` of the paper (``tau = 1 - t``, ``r^2 = (1-tau)^2 / (tau^2 + (1-tau)^2)``)
    in our time convention: ``((1 - t)^2 + t^2) / ((1 - t) * t)``, capped; ``beta`` at pure noise."""
    if t <= 0.0 or t >= 1.0:
        return max_weight
    return min(max_weight, ((1.0 - t) ** 2 + t * t) / ((1.0 - t) * t))


def _guided_integration(decoder, run, conditioning, x, mask, guidance: ChunkGuidance, dtype, step_sizes):
    """The flow loop of ``integrate_flow`` with real-time-chunking guidance: at each step the decoder's one-step
    estimate of the chunk ``x - t * v`` is compared with the target on the weighted steps, and the velocity is
    corrected by the vector-Jacobian product of that error through the decoder (``torch.autograd.grad`` w.r.t.
    ``x_t`` only; no weight gradient is formed)."""
    target = guidance.target.float() * mask
    w = guidance.weights()[..., None] * mask.float()
    for t, step in zip(run.timesteps.unbind(0), conditioning.steps()):
        t_value = run.timestep_values[run.step_index]
        scale = _guidance_scale(t_value, guidance.max_weight)
        if scale > 0:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                v = decoder(xg.to(dtype), conditioning=step).float()
                estimate = xg - t_value * v
                (vjp,) = torch.autograd.grad(estimate, xg, grad_outputs=(target - estimate).detach() * w)
            v = v.detach() - scale * vjp  # v points toward noise: moving along -v, and +vjp, approaches the target
        else:
            v = decoder(x.to(dtype), conditioning=step).float()
        x = run.step(v, t, x, return_dict=False)[0] * mask
    d = int(guidance.inference_delay)
    if d:
        x = torch.cat([target[:, :d], x[:, d:]], dim=1)
    return x
