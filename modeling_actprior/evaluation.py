"""Offline evaluation of the action prior: does it predict the future from the past better than
trivial motion models?

For each embodiment, on held-out episodes (split by episode), every window's true future chunk is compared
with three predictions, all in normalized units with padded dims and past-the-end steps masked out:

* ``prior``: a chunk sampled by the prior's flow from the latent of the window's history (fixed seed);
* ``repeat_last``: the last real past action held for the whole chunk (zero at an episode's start);
* ``mean_chunk``: the embodiment's mean training chunk, step by step.

Errors go through the ``action_error`` metric loaded with ``evaluate``. The latent is reported too: mean
KL to N(0, I) and the number of active dimensions (variance of the posterior mean across windows > 0.01,
the usual "active units" count); a prior with 0 active dimensions ignores the history.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .metrics import ACTION_ERROR_METRIC
from .modeling_actprior import gaussian_kl

PREDICTORS = ("prior", "repeat_last", "mean_chunk")


def _batches(dataset, indices: Sequence[int], batch_size: int, collate):
    for i in range(0, len(indices), batch_size):
        yield collate([dataset[j] for j in indices[i : i + batch_size]])


def mean_chunk(dataset, collate, max_windows: int = 2048, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """Masked mean of the future chunks of up to ``max_windows`` windows: ``(H, D_max)`` normalized."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(dataset), size=min(max_windows, len(dataset)), replace=False)
    total = count = None
    for b in _batches(dataset, idx, batch_size, collate):
        w = (b["action_mask"][..., None] & b["dim_mask"][:, None, :]).float()
        s, c = (b["actions"] * w).sum(0), w.sum(0)
        total, count = (s, c) if total is None else (total + s, count + c)
    return total / count.clamp_min(1.0)


def repeat_last_action(history: torch.Tensor, history_mask: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``(B, K, D)`` history -> ``(B, H, D)``: the last real past action, repeated (zeros without one)."""
    k = history.shape[1]
    pos = torch.arange(k, device=history.device).expand_as(history_mask)
    last = torch.where(history_mask, pos, torch.full_like(pos, -1)).max(dim=1).values
    picked = history[torch.arange(history.shape[0]), last.clamp_min(0)]
    picked = torch.where((last >= 0)[:, None], picked, torch.zeros_like(picked))
    return picked[:, None, :].expand(-1, chunk_size, -1)


@torch.no_grad()
def evaluate_prior(
    model,
    val_sets: dict[str, list[torch.utils.data.Dataset]],
    mean_chunks: dict[str, torch.Tensor],
    collate,
    max_windows: int = 1024,
    batch_size: int = 128,
    seed: int = 0,
    num_inference_steps: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Per-embodiment errors of the prior and both baselines on held-out windows.

    Args:
        model: an ``ActionPriorModel`` (put in eval mode here).
        val_sets: embodiment -> window datasets of held-out episodes (samples as ``ActionWindowDataset`` gives).
        mean_chunks: embodiment -> ``(H, D_max)`` mean training chunk.
        max_windows: windows evaluated per embodiment (an evenly spaced, fixed subset if there are more).
    Returns:
        ``{embodiment: {"prior_mse", "prior_l1", "repeat_last_mse", ..., "windows", "kl", "active_dims"}}``.
    """
    import evaluate

    model.eval()
    dev = model.device
    metric = evaluate.load(ACTION_ERROR_METRIC)
    results = {}
    for emb in tqdm(sorted(val_sets), desc="evaluating", disable=not progress):
        preds = {p: [] for p in PREDICTORS}
        refs, masks, mus, kls = [], [], [], []
        gen = torch.Generator(device=dev).manual_seed(seed)
        for ds in val_sets[emb]:
            n = len(ds)
            share = max(1, max_windows // len(val_sets[emb]))
            idx = np.unique(np.linspace(0, n - 1, num=min(n, share)).astype(np.int64))
            for b in _batches(ds, idx, batch_size, collate):
                b = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
                latent = model.encode(b["history"], b["history_mask"], b["dim_mask"])
                chunk = model.sample_actions(latent.mean, b["dim_mask"], num_inference_steps, generator=gen)
                mask = (b["action_mask"][..., None] & b["dim_mask"][:, None, :]).float()
                preds["prior"].append(chunk)
                preds["repeat_last"].append(repeat_last_action(b["history"], b["history_mask"], chunk.shape[1]))
                preds["mean_chunk"].append(mean_chunks[emb].to(dev).expand_as(chunk))
                refs.append(b["actions"])
                masks.append(mask)
                mus.append(latent.mean)
                kls.append(gaussian_kl(latent.mean, latent.logvar))
        ref, mask = torch.cat(refs).flatten(1), torch.cat(masks).flatten(1)
        row = {"windows": int(ref.shape[0])}
        for p in PREDICTORS:
            pred = torch.cat(preds[p]).flatten(1)
            m = metric.compute(predictions=pred.cpu().numpy(), references=ref.cpu().numpy(), masks=mask.cpu().numpy())
            row[f"{p}_mse"], row[f"{p}_l1"] = float(m["mse"]), float(m["l1"])
        mu = torch.cat(mus)
        row["kl"] = float(torch.cat(kls).mean())
        row["active_dims"] = int((mu.var(0) > 0.01).sum()) if mu.shape[0] > 1 else 0
        row["beats_baselines"] = bool(row["prior_mse"] < min(row["repeat_last_mse"], row["mean_chunk_mse"]))
        results[emb] = row
    return results
