#!/usr/bin/env python
"""Stage 2: align a vision-language model to a trained action prior (VLA training).

The entry point ``accelerate launch training_scripts/train_stage2.py ...`` runs; the same as the console script
``actprior-train-stage2 ...`` and ``python -m modeling_actprior.training.stage2 ...``. The code, and its options
(``--help``), live in ``modeling_actprior/training/stage2.py``.
"""

from modeling_actprior.training.stage2 import main

if __name__ == "__main__":
    main()
