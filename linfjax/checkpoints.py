"""The one module that talks to orbax: per-stage checkpoint folders that survive a kill.

Each stage keeps a `StageCheckpoints` over a folder of its own (for example
`WORKDIR/train/backdoored/`); saves are synchronous, so a save that returned is on
disk, and orbax's own atomic rename means a run killed mid-save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from linfjax import errors


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint exists but cannot be restored into the expected structure."""


class StageCheckpoints:
  """Numbered checkpoints of one pytree in one folder (the latest `max_to_keep` are kept)."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, tree: Any) -> None:
    self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
    self._manager.wait_until_finished()

  def restore(self, like: Any, step: int | None = None) -> Any:
    """Restores checkpoint `step` (default: the latest) with the structure of `like`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"{self.directory}: no checkpoint to restore")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # Orbax raises many types for missing or garbled files.
      raise CheckpointError(
          f"{self.directory}: checkpoint {step} cannot be restored ({type(e).__name__}: "
          f"{str(e)[:300]}). It is corrupt or from a different config; delete "
          f"{self.directory} to redo this stage.") from None

  def close(self) -> None:
    self._manager.close()
