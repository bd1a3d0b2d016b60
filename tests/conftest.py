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
    from synthetic import random_prior

    return random_prior(history_length=6, sawyer_scale=np.array([0.5, 0.5, 0.3, 1.0]))


@pytest.fixture(scope="module")
def prior():
    """A tiny random prior (chunk 8, history 4) with statistics for a 4-D and an 8-D robot (the VLA tests')."""
    from synthetic import random_prior

    return random_prior(history_length=4)
