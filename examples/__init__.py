"""Reference model, data pipeline and training commands for cscpa_layers.

This package is not part of the installed library: it needs the ``examples`` extra
(torchvision, tqdm, pillow, ...) and is imported from the repository root. Its rooms:

- ``examples.data``: datasets, the dataset registry, samples, transforms, splits.
- ``examples.models``: the reference DeepLabv3+, its encoders, the custom-network protocol.
- ``examples.engine``: the run configuration, the step classes, the fold trainer, checkpoints,
  evaluation.
- ``examples.tutorials``: small demos of the layers.

The commands are the modules at the top, run from the repository root as
``python -m examples.NAME ...``: ``train_busi``, ``predict``, ``export``, ``diagnose``,
``make_splits``, ``study``, ``render_phantom``.
"""
