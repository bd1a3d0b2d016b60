#!/usr/bin/env python
"""Stage 1: train the action prior on action trajectories alone, across embodiments.

The entry point ``accelerate launch training_scripts/train_stage1.py ...`` runs; the same as the console script
``actprior-train-stage1 ...`` and ``python -m modeling_actprior.training.stage1 ...``. The code, and its options
(``--help``), live in ``modeling_actprior/training/stage1.py``.
"""

from modeling_actprior.training.stage1 import main

if __name__ == "__main__":
    main()
