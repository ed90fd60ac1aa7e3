"""Atomic writes of run files: a reader, or a run killed mid-write, never sees half a file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import numpy as np


@contextlib.contextmanager
def _replacing(path: str, mode: str):
  """Yields a temporary file beside `path` that replaces `path` when the block succeeds."""
  directory = os.path.dirname(os.path.abspath(path))
  with tempfile.NamedTemporaryFile(mode, dir=directory, delete=False, suffix=".tmp") as f:
    try:
      yield f
      f.flush()  # A full disk fails here, inside the block, not when the file closes.
    except BaseException as error:
      with contextlib.suppress(OSError):  # Closing flushes again, and fails again.
        f.close()
      os.remove(f.name)
      if isinstance(error, OSError) and error.filename is None:
        raise OSError(error.errno, error.strerror, path) from error
      raise
  os.replace(f.name, path)


def write_json(path: str, obj) -> None:
  with _replacing(path, "w") as f:
    json.dump(obj, f, indent=1)


def write_text(path: str, text: str) -> None:
  with _replacing(path, "w") as f:
    f.write(text)


def write_bytes(path: str, data: bytes) -> None:
  with _replacing(path, "wb") as f:
    f.write(data)


def write_npz(path: str, **arrays) -> None:
  with _replacing(path, "wb") as f:
    np.savez(f, **arrays)
