"""Every random stream of a run, named in one place.

A run's randomness derives from its config seed. JAX streams fold a salt into
`jax.random.key(seed)` (`run_key`); NumPy draws (which examples are held out or poisoned)
seed a generator with `[seed, salt]` (`numpy_rng`). Each use has its own salt, so changing one
stage's draws never moves another's.
"""

from __future__ import annotations

import jax
import numpy as np

# JAX streams: jax.random.fold_in(jax.random.key(seed), salt).
TRAIN_INIT = 0  # The models' initial weights.
TRAIN_STEPS = 1  # Shuffles, augmentation and WaNet's noise in training.
REVERSE = 2  # Neural Cleanse's initial masks and patterns, and its batches.
FINE_TUNE = 3  # Every fine-tuning on S (shuffles, augmentation).
ANP = 4  # ANP's batches, augmentation and noise.
NC_UNLEARNING = 5  # Which images of S unlearning stamps, its shuffles and augmentation.
FT_SAM = 6  # FT-SAM's shuffles and augmentation on S.
NAD = 7  # NAD's student tuning on S (its teacher is FINE_TUNE's).
IBAU = 8  # i-BAU's batches of S and the images its outer loss perturbs.
RNP = 9  # RNP's shuffles and augmentation on S, unlearning and mask recovery.
SAU = 10  # SAU's shuffles on S.
ATTACK_PREPARATION = 11  # An attack made on the clean model (LF, TrojanNN, LC, Input-aware).
ABL = 12  # ABL's model: its initial weights, each phase's shuffles and augmentation.
# Folded into a training step's key for WaNet's noise-mode noise (apart from augmentation).
NOISE_MODE = 1

# NumPy draws: np.random.default_rng([seed, salt]).
CLEAN_SET = 0x5E7  # The defender's clean set S.
POISON = 0xBAD  # The poisoned training examples.
NOISE_EXAMPLES = 0x7015E  # WaNet's noise-mode examples.
UNLEARNING_STAMPS = 0x0C  # The images of S that unlearning stamps.


def run_key(seed: int, salt: int) -> jax.Array:
  """The JAX key of one stream of a run."""
  return jax.random.fold_in(jax.random.key(seed), salt)


def numpy_rng(seed: int, salt: int) -> np.random.Generator:
  """The NumPy generator of one draw of a run."""
  return np.random.default_rng([seed, salt])
