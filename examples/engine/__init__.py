"""Training machinery: the iteration step classes, the fold loop, checkpoints, evaluation and the run
configuration."""
