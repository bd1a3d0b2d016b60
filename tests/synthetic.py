"""Tiny synthetic LeRobot datasets for tests: smooth, history-predictable motions of two robots."""

import numpy as np
import torch

import modeling_actprior as ap
from modeling_actprior.data import Episode, write_lerobot_dataset


def random_prior(history_length: int, second_robot: str = "kuka_iiwa", sawyer_scale=1.0) -> ap.ActionPriorModel:
    """A tiny random ``ActionPriorModel`` (chunk 8, eval mode, seed 0) with action statistics for the 4-D sawyer
    (normal draws times ``sawyer_scale``) and ``second_robot`` (uniform in [-2, 2])."""
    torch.manual_seed(0)
    model = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=8, history_length=history_length))
    rng = np.random.default_rng(0)
    norm = ap.ActionNormalizer(model.config.max_action_dim)
    norm.add_embodiment(ap.get_embodiment("sawyer"), rng.normal(size=(200, 4)) * sawyer_scale)
    second = ap.get_embodiment(second_robot)
    norm.add_embodiment(second, rng.uniform(-2, 2, size=(200, second.action_dim)))
    model.normalizer = norm
    return model.eval()


def smooth_episodes(width: int, n_episodes: int, length: int, seed: int, images: int = 0, tasks=("reach the goal",)):
    """Each episode is a sum of two sinusoids with random phase/frequency per dimension: the past predicts the future."""
    rng = np.random.default_rng(seed)
    out = []
    for e in range(n_episodes):
        t = np.arange(length)[:, None]
        freq = rng.uniform(0.05, 0.15, size=(1, width))
        phase = rng.uniform(0, 2 * np.pi, size=(1, width))
        amp = rng.uniform(0.5, 1.5, size=(1, width))
        actions = (amp * np.sin(freq * t + phase)).astype(np.float32)
        states = np.cumsum(actions, axis=0).astype(np.float32)
        imgs = None
        if images:
            imgs = {"front": rng.integers(0, 255, size=(length, images, images, 3), dtype=np.uint8)}
        out.append(Episode(actions=actions, states=states, task=tasks[e % len(tasks)], images=imgs))
    return out


def make_corpus(root, embodiments=("sawyer", "xarm6"), n_episodes=12, length=40, seed=0, images=0):
    """Write one dataset per embodiment under ``root/<name>``; returns the list of dataset folders."""
    paths = []
    for i, name in enumerate(embodiments):
        spec = ap.get_embodiment(name)
        path = str(root / name)
        write_lerobot_dataset(path, smooth_episodes(spec.action_dim, n_episodes, length, seed + i, images=images),
                              spec, fps=spec.fps, camera_names=("front",) if images else (),
                              image_size=images or None)
        paths.append(path)
    return paths
