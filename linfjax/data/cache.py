"""Decoded datasets kept on disk, keyed by what they were decoded from.

A source that decodes many image files (GTSRB) stores the decoded arrays under a key made of
every file's SHA-256 and the decoding settings, in `$LINFJAX_DATA_CACHE` or
`~/.cache/linfjax/data` ('off': no cache). Another load of the same bytes reads the arrays
back instead of decoding; other bytes give another key. A damaged or unwritable cache only
costs the decoding it would have saved.
"""

from __future__ import annotations

import io
import os

import numpy as np
from absl import logging

from linfjax import files

ENV = "LINFJAX_DATA_CACHE"


def directory() -> str | None:
  """Where decoded datasets are kept: $LINFJAX_DATA_CACHE, else ~/.cache/linfjax/data;
  None when that variable is 'off'."""
  chosen = os.environ.get(ENV, "")
  if chosen == "off":
    return None
  return chosen or os.path.join(os.path.expanduser("~"), ".cache", "linfjax", "data")


def read(cache_path: str | None, count: int) -> np.ndarray | None:
  """The cached images, or None when there are none (or they are unreadable: decode anew)."""
  if cache_path is None or not os.path.exists(cache_path):
    return None
  try:
    images = np.load(cache_path, allow_pickle=False)  # One .npy array: a plain read.
  except Exception as e:  # A damaged cache file only costs the decoding it would have saved.
    logging.warning("%s: unreadable decoded cache (%s); decoding the images again", cache_path,
                    type(e).__name__)
    return None
  if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
      or len(images) != count:
    return None
  return images


def write(cache_path: str | None, images: np.ndarray) -> None:
  if cache_path is None:
    return
  try:
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, images)
    files.write_bytes(cache_path, buffer.getvalue())
  except OSError as e:  # No cache is slower, not wrong.
    logging.warning("%s: the decoded cache cannot be written (%s)", cache_path, e.strerror)
