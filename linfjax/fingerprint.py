"""What a saved result was computed from: one digest of arrays, so a rerun reuses only what
matches its inputs (a model retrained in place is never matched with old numbers)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import jax
import numpy as np


def digest(arrays: Iterable[Any]) -> str:
  """SHA-256 of the arrays' shapes, dtypes and bytes, in order."""
  sha = hashlib.sha256()
  for array in arrays:
    array = np.asarray(array)
    sha.update(f"{array.shape}{array.dtype}".encode())
    sha.update(np.ascontiguousarray(array).tobytes())
  return sha.hexdigest()


def tree_digest(tree: Any) -> str:
  """The digest of a pytree's leaves (model variables, a trigger)."""
  return digest(jax.tree.leaves(tree))


def fingerprint(**inputs: Any) -> str:
  """A canonical JSON text of named inputs (digests, settings, sizes) to compare with."""
  return json.dumps(inputs, sort_keys=True, default=str)
