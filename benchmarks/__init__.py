"""Benchmarks of the cscpa_layers kernels against their dense references (style rule 15).

Not part of the installed package and never collected by pytest (setup.cfg's testpaths are
``tests`` and ``cscpa_layers``). Run ``python benchmarks/run.py --help``.
"""
