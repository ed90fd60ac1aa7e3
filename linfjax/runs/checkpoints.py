"""The one module that talks to orbax: per-stage checkpoint folders that survive a kill.

Each stage keeps a `StageCheckpoints` over a folder of its own (for example
`WORKDIR/train/backdoored/`); saves are synchronous, so a save that returned is on
disk, and orbax's own atomic rename means a run killed mid-save leaves the previous
checkpoint intact.

Checkpoints are process-local: in a multi-process JAX program (a grid started with
`--distributed`, `jax.process_count() > 1`) each process checkpoints only its own runs,
with no barrier with the other processes. orbax's default handlers cannot do that: its
jax.Array handler refuses host-local arrays whenever `jax.process_count() > 1` ("Cannot
serialize host local jax.Array ... in multi-host setting"), and its NumPy handler writes
array data from process 0 only (other processes silently write none). So the manager
runs with this process as its only active and primary process, and the leaves, copied
to the host, are written by `_LocalArrayHandler`: one `.npy` file per leaf inside
orbax's step folder, the same on one process or many, so any process (or a later
single-process rerun) restores what another wrote.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from linfjax import errors


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint exists but cannot be restored into the expected structure."""


class _LocalArrayHandler(ocp.type_handlers.TypeHandler):
  """Host arrays as `<name>.npy` files, written by whichever process saves them."""

  def typestr(self) -> str:
    return "linfjax.local_ndarray"

  @staticmethod
  def _file(info) -> str:
    return os.path.join(os.fspath(info.parent_dir), f"{info.name}.npy")

  async def metadata(self, infos: Sequence[Any]) -> Sequence[ocp.metadata.ArrayMetadata]:
    result = []
    for info in infos:
      await info.await_path_creation()
      array = np.load(self._file(info), mmap_mode="r", allow_pickle=False)
      result.append(ocp.metadata.ArrayMetadata(name=info.name, directory=info.parent_dir,
                                               shape=array.shape, sharding=None,
                                               dtype=array.dtype))
    return result

  async def serialize(self, values: Sequence[np.ndarray], infos: Sequence[Any],
                      args: Sequence[Any] | None = None) -> list:
    del args
    for value, info in zip(values, infos):
      await info.await_path_creation()
      np.save(self._file(info), np.asarray(value), allow_pickle=False)
    return []

  async def deserialize(self, infos: Sequence[Any],
                        args: Sequence[Any] | None = None) -> list[np.ndarray]:
    del args
    arrays = []
    for info in infos:
      await info.await_path_creation()
      arrays.append(await asyncio.to_thread(np.load, self._file(info), allow_pickle=False))
    return arrays


def _to_host(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)


def _like(leaf: Any, host: np.ndarray) -> jax.Array:
  """`host` as a jax.Array of `leaf`'s dtype. NumPy stores dtypes it does not know
  (bfloat16) as raw bytes ('V2'); those are reinterpreted, not converted."""
  dtype = getattr(leaf, "dtype", None)
  if host.dtype.kind == "V" and dtype is not None:
    host = host.view(dtype)
  return jnp.asarray(host, dtype=dtype)


class StageCheckpoints:
  """Numbered checkpoints of one pytree in one folder (the latest `max_to_keep` are kept)."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    os.makedirs(self.directory, exist_ok=True)
    this_process = jax.process_index()
    local = ocp.options.MultiprocessingOptions(primary_host=this_process,
                                               active_processes={this_process})
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, _LocalArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, multiprocessing_options=local,
                                          type_handler_registry=registry)
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers=handler,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=False,
                                             enable_async_checkpointing=False,
                                             multiprocessing_options=local))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, tree: Any) -> None:
    self._manager.save(step, args=ocp.args.PyTreeSave(_to_host(tree)), force=True)
    self._manager.wait_until_finished()

  def restore(self, like: Any, step: int | None = None) -> Any:
    """Restores checkpoint `step` (default: the latest) with the structure of `like`.

    Returns `like`'s structure with jax.Array leaves (on the default device).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"{self.directory}: no checkpoint to restore")
    target = _to_host(like)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
      shapes = jax.tree.map(lambda a, b: np.shape(a) == np.shape(b), restored, target)
      if not all(jax.tree.leaves(shapes)):
        raise ValueError("array shapes differ from the expected ones")
    except Exception as e:  # Orbax raises many types for missing or garbled files.
      raise CheckpointError(
          f"{self.directory}: checkpoint {step} cannot be restored ({type(e).__name__}: "
          f"{str(e)[:300]}). It is corrupt or from a different config; delete "
          f"{self.directory} to redo this stage.") from None
    return jax.tree.map(_like, like, restored)

  def step_directory(self, step: int) -> str:
    """The folder of checkpoint `step` (orbax's default naming: the step number)."""
    return os.path.join(self.directory, str(step))

  def copy_latest_to(self, destination: "StageCheckpoints") -> int:
    """Copies the latest checkpoint into `destination` (unless it has that step); returns it.

    The copy is made beside its final place and renamed into it, so a kill mid-copy leaves
    no partial checkpoint that orbax would list.
    """
    step = self.latest_step()
    if step is None:
      raise CheckpointError(f"{self.directory}: no checkpoint to copy")
    target = destination.step_directory(step)
    if not os.path.exists(target):
      staging = os.path.join(destination.directory, f".copying-{step}-{os.getpid()}")
      shutil.rmtree(staging, ignore_errors=True)
      shutil.copytree(self.step_directory(step), staging)
      os.replace(staging, target)
      destination.reload()
    return step

  def reload(self) -> None:
    """Re-reads the folder's steps (after another manager or a copy changed them)."""
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()
