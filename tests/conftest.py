import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_prior():
    """A tiny random ActionPriorModel with statistics for two embodiments of different widths."""
    import modeling_actprior as ap

    torch.manual_seed(0)
    model = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=8, history_length=6))
    rng = np.random.default_rng(0)
    norm = ap.ActionNormalizer(model.config.max_action_dim)
    norm.add_embodiment(ap.get_embodiment("sawyer"), rng.normal(size=(200, 4)) * [0.5, 0.5, 0.3, 1.0])
    norm.add_embodiment(ap.get_embodiment("kuka_iiwa"), rng.uniform(-2, 2, size=(200, 8)))
    model.normalizer = norm
    return model.eval()


@pytest.fixture(scope="module")
def prior():
    """A tiny random prior (chunk 8, history 4) with statistics for a 4-D and an 8-D robot (the VLA tests')."""
    import modeling_actprior as ap

    torch.manual_seed(0)
    model = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=8, history_length=4))
    rng = np.random.default_rng(0)
    norm = ap.ActionNormalizer(model.config.max_action_dim)
    norm.add_embodiment(ap.get_embodiment("sawyer"), rng.normal(size=(200, 4)))
    norm.add_embodiment(ap.get_embodiment("kuka_iiwa"), rng.uniform(-2, 2, size=(200, 8)))
    model.normalizer = norm
    return model.eval()
