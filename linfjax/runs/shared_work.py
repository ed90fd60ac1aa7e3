"""Work that several runs of a grid share, done once: one directory per (artifact, dependencies).

A run's vanilla model depends on the seed, the data, the model and the training recipe, not
on the trigger, poison rate or target; a 2-trigger x 2-rate x 3-seed grid needs 3 vanilla
models, not 12. A `Piece` names such an artifact by exactly the config values it depends on;
the first run that needs it computes it into the piece's directory, and every other run,
in this process or another (grid shards, hosts sharing the file system), reads it.

Layout under the grid's `GRID/shared/`:
  <artifact>/<key>/              key: the first 16 hex digits of the SHA-256 of the
                                 dependencies' canonical JSON;
  <artifact>/<key>/depends_on.json  those dependencies, for a person to read;
  <artifact>/<key>/done.json     written last, atomically: the piece is complete (with a
                                 summary the computing run chose to record);
  <artifact>/<key>.lock          an fcntl lock, held while a process computes the piece.

`Piece.claim()` takes the lock, waiting while another process holds it. The operating
system drops the lock of a killed process, and the files it left (checkpoints) stay, so the
next claimant resumes the piece where it stopped. The lock needs a file system with working
fcntl locks (local disks; NFS with locking); on hosts that do not share one, each host
computes its own copy. Pieces are never changed once done: a different dependency is a
different key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from typing import Any, Callable, Iterator

from absl import logging

from linfjax import files

DONE_FILE = "done.json"
DEPENDS_FILE = "depends_on.json"


def dependency_key(depends_on: dict[str, Any]) -> str:
  """The 16-hex-digit key of `depends_on` (any JSON-serialisable dict; key order ignored)."""
  canonical = json.dumps(depends_on, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class Piece:
  """One artifact for one set of dependencies, in its own directory."""

  def __init__(self, root: str, artifact: str, depends_on: dict[str, Any]):
    self.artifact = artifact
    self.depends_on = depends_on
    self.key = dependency_key(depends_on)
    self.directory = os.path.join(os.path.abspath(root), artifact, self.key)
    self._lock_path = self.directory + ".lock"

  def path(self, *parts: str) -> str:
    return os.path.join(self.directory, *parts)

  @property
  def done(self) -> bool:
    return os.path.exists(self.path(DONE_FILE))

  def summary(self) -> dict:
    """What `mark_done` recorded."""
    with open(self.path(DONE_FILE)) as f:
      return json.load(f)

  def mark_done(self, summary: dict | None = None) -> None:
    """Records the piece as complete; call it last, while holding the claim."""
    files.write_json(self.path(DONE_FILE), summary or {})

  @contextlib.contextmanager
  def claim(self, *, wait: bool = True) -> Iterator[bool]:
    """Holds the piece's lock for the block; yields whether it was taken.

    With `wait`, blocks until no other process holds it (then yields True); without, yields
    False at once when another process holds it. Inside the block, `done` says whether the
    piece still has to be computed.
    """
    os.makedirs(self.directory, exist_ok=True)
    if not os.path.exists(self.path(DEPENDS_FILE)):
      files.write_json(self.path(DEPENDS_FILE), self.depends_on)
    with open(self._lock_path, "a") as lock:
      try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        if not wait:
          yield False
          return
        logging.info("shared %s/%s: another process is computing it; waiting", self.artifact,
                     self.key)
        started = time.perf_counter()
        fcntl.flock(lock, fcntl.LOCK_EX)
        logging.info("shared %s/%s: waited %.1f s", self.artifact, self.key,
                     time.perf_counter() - started)
      try:
        yield True
      finally:
        fcntl.flock(lock, fcntl.LOCK_UN)

  def compute_once(self, compute: Callable[[], dict]) -> bool:
    """Runs `compute` (which writes the piece's files and returns its summary) unless the
    piece is done, holding the claim; returns whether it ran here."""
    with self.claim():
      computed_here = not self.done
      if computed_here:
        self.mark_done(compute())
    return computed_here


class SharedWork:
  """The shared pieces of one grid, under `root` (the grid's `shared/` directory)."""

  def __init__(self, root: str):
    self.root = os.path.abspath(root)

  def piece(self, artifact: str, depends_on: dict[str, Any]) -> Piece:
    return Piece(self.root, artifact, depends_on)
