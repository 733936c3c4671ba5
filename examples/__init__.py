"""Reference model, data pipeline and training scripts for cscpa_layers.

This package is not part of the installed library: it needs the ``examples`` extra
(torchvision, tqdm, pillow) and is imported from the repository root, e.g.
``from examples.datasets import build_dataset``. The scripts in it run as
``python examples/NAME.py ...`` from the repository root.
"""
