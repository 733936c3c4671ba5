"""Small, self-contained demos of the layers, each run as ``python -m examples.tutorials.NAME``."""
