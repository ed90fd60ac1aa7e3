"""The pipeline's stages: train, reverse, analysis, prune."""
