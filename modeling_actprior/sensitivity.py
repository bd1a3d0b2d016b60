"""What a trained policy's chunk depends on, offline: the mean squared change of its normalized chunk when a window's
image, or its history, is swapped with another window's (a policy that ignores the image, or copies the history, shows
here before any rollout). The study records it for every final model (``sensitivity.json``)."""

from __future__ import annotations

import json
import os

import numpy as np

from .training import write_json


def sensitivity_file(run: str, demos: str) -> dict:
    """``run/sensitivity.json`` (``input_sensitivity`` of ``run/final``), computed once."""
    path = os.path.join(run, "sensitivity.json")
    if not os.path.isfile(path):
        result = input_sensitivity(os.path.join(run, "final"), demos)
        write_json(path, result)
    with open(path) as f:
        return json.load(f)


def input_sensitivity(final: str, dataset: str, windows: int = 96, seed: int = 0) -> dict:
    """What a VLA's chunk depends on, offline: on ``windows`` windows of ``dataset``, the mean squared change of the
    predicted chunk (normalized units, real dimensions and steps, fixed noise) when each window's image is swapped
    for another window's, and when its history is; plus the error to the true chunk.

    A policy that barely reacts to the image but strongly to the history has learned to continue its own past
    actions ("copycat"): fine offline, where the history is the expert's, and poor in closed loop.
    """
    import torch

    from modeling_actprior.data import IMAGE, VLAWindowDataset, collate_windows, load_lerobot_dataset
    from modeling_actprior.runs import load_vla

    model, processor = load_vla(final)
    ds = load_lerobot_dataset(dataset)
    pc = model.config.prior_config
    data = VLAWindowDataset(ds, model.normalizer, history=pc.history_length, chunk=pc.chunk_size)
    idx = np.random.default_rng(seed).choice(len(data), size=min(windows, len(data)), replace=False)
    samples = [data[int(i)] for i in idx]
    camera = next(iter(samples[0][IMAGE]))
    images = [s[IMAGE][camera] for s in samples]
    other = np.roll(np.arange(len(samples)), 1)

    def predict(rows, imgs):
        batch = collate_windows([{k: v for k, v in r.items() if k != IMAGE} for r in rows])
        batch.update(processor(images=imgs, text=[r["instruction"] for r in rows]))
        noise = torch.randn(len(rows), pc.chunk_size, pc.max_action_dim, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return model.predict_action(**batch, noise=noise), batch

    base, batch = predict(samples, images)
    swapped_image, _ = predict(samples, [images[j] for j in other])
    swapped_history, _ = predict([dict(r, history=samples[j]["history"], history_mask=samples[j]["history_mask"])
                                  for r, j in zip(samples, other)], images)
    w = batch["action_mask"][..., None].float() * batch["dim_mask"][:, None, :].float()

    def mse(a, b):
        return float((((a - b) ** 2) * w).sum() / w.sum())

    return {"windows": len(samples), "mse_to_truth": mse(base, batch["actions"]),
            "change_when_image_swapped": mse(base, swapped_image),
            "change_when_history_swapped": mse(base, swapped_history)}
