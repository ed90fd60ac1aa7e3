"""The pipeline's stages, one module each: inputs, outputs and checkpoints of one step."""
