"""Metrics loadable with ``evaluate.load`` from a local path (no Hub access needed)."""

import os

#: Path for ``evaluate.load(ACTION_ERROR_METRIC)``: masked MSE / L1 between action chunks.
ACTION_ERROR_METRIC = os.path.join(os.path.dirname(__file__), "action_error")

__all__ = ["ACTION_ERROR_METRIC"]
