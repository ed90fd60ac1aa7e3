"""linfjax: backdoored and vanilla classifiers, their activation norms, and linf-based pruning.

Modules, lowest floor first (each imports only from floors below it):
  data, models, triggers, checkpoints       datasets, Flax models, trigger functions, orbax
  config, poison, metrics, train            configs, poisoning, CA/ASR/RA, the training step
  stages/                                   one pipeline stage per module
  pipeline, main                            the run directory and the command line
"""

__version__ = "0.1.0"
