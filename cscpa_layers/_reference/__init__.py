"""Slow, literal transcriptions of the paper's equations.

Tests compare the fast layers against these in value and gradient, and the benchmarks time
the layers against them. They favour being obviously right over being fast or frugal, and
they do not validate their input. Not part of the public API.
"""
