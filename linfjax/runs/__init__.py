"""Running configs: the pipeline of stages, grids, shared work, checkpoints, progress."""
