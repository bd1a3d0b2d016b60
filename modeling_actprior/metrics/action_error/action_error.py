"""Masked action-chunk error, as an ``evaluate`` metric.

Load it offline from the installed package::

    import evaluate
    from modeling_actprior.metrics import ACTION_ERROR_METRIC
    metric = evaluate.load(ACTION_ERROR_METRIC)
    metric.compute(predictions=pred, references=true, masks=mask)

``predictions`` and ``references`` are action chunks flattened to one list per sample (e.g.
``(H * D_max,)`` normalized units); ``masks`` (same shape, 0/1) marks the entries that count: real
action dimensions at real chunk steps. Padded entries never count. Returns ``mse`` and ``l1``: means over
counted entries (each entry weighs the same, so longer/wider samples weigh more), and ``count``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Masked mean squared error and mean absolute error between predicted and true action chunks."
_KWARGS = """
Args:
    predictions: list of flattened predicted chunks (floats).
    references: list of flattened true chunks, same shapes.
    masks: list of flattened 0/1 masks, same shapes; 1 where the entry counts.
Returns:
    mse: masked mean squared error. l1: masked mean absolute error. count: number of counted entries.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ActionError(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Jing et al., Learning Action Priors for Cross-embodiment Robot Manipulation, 2026.",
            inputs_description=_KWARGS,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("float32")),
                "references": datasets.Sequence(datasets.Value("float32")),
                "masks": datasets.Sequence(datasets.Value("float32")),
            }),
        )

    def _compute(self, predictions, references, masks):
        sq = abs_ = count = 0.0
        for i, (p, r, m) in enumerate(zip(predictions, references, masks)):
            p, r, m = (np.asarray(x, dtype=np.float64) for x in (p, r, m))
            if not (p.shape == r.shape == m.shape):
                raise ValueError(
                    f"Sample {i}: predictions {p.shape}, references {r.shape} and masks {m.shape} must have the same "
                    "shape (flatten each chunk the same way)."
                )
            if not (np.isfinite(p).all() and np.isfinite(r).all()):
                raise ValueError(f"Sample {i}: predictions or references contain NaN or inf.")
            d = (p - r) * m
            sq += float((d * d).sum())
            abs_ += float(np.abs(d).sum())
            count += float(m.sum())
        if count == 0:
            raise ValueError("No entry is counted: every mask is 0. Check the dimension and step masks.")
        return {"mse": sq / count, "l1": abs_ / count, "count": int(count)}
