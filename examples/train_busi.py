"""Train CSC-PA (or the SupOnly baseline) on BUSI, an images/masks folder, or the phantom.

    python -m examples.train_busi                                   # phantom, CSC-PA, fold 0, 1/8 labels
    python -m examples.train_busi --data /data/BUSI --backbone resnet50 --crop 513
    python -m examples.train_busi --method both --folds all          # SupOnly and CSC-PA, every fold
    torchrun --nproc_per_node=4 -m examples.train_busi --data /data/BUSI   # one process per GPU

The schedule follows the paper (method.md §6): --pretrain-epochs of supervised training
(CE + PAL on the labeled half, the unlabeled half acting through FPA), the edge container's
initialisation, then per iteration stage 1 on [labeled, unlabeled] and stage 2 on
[labeled, masked] with pseudo-labels, SGD with momentum 0.9, weight decay 5e-4 and poly
learning rate. The checkpoint is chosen on the fold's val split (never the test split), and
the test split is scored per image at the original resolution.

Everything lands in --out: last.pt (full state, atomic, also on Ctrl-C / SIGTERM), best.pt,
results.json and test_scores.csv per fold, overlays/, and summary.json / summary.csv.

The options are generated from examples/engine/config.py (TrainConfig), where each default
is stated once; the run itself is examples.engine.run.main.
"""

from __future__ import annotations

import sys

from examples.engine.run import main as run


def main(argv: list[str] | None = None) -> int:
    return run(argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
