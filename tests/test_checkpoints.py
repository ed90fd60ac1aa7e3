"""Process-local orbax checkpoints: exact round trips (bfloat16 too) and copies between folders."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from linfjax.runs import checkpoints


def test_round_trip_is_exact_for_every_dtype_and_copies_keep_the_latest(tmp_path):
  tree = {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3) * 1.5,
          "b": jnp.linspace(-1, 1, 5, dtype=jnp.float32), "step": jnp.int32(7),
          "flags": jnp.array([True, False])}
  like = {k: jnp.zeros_like(v) for k, v in tree.items()}
  source = checkpoints.StageCheckpoints(str(tmp_path / "source"))
  source.save(1, like)
  source.save(2, tree)
  restored = source.restore(like)
  for key, value in tree.items():
    assert restored[key].dtype == value.dtype
    np.testing.assert_array_equal(np.asarray(restored[key], np.float32),
                                  np.asarray(value, np.float32))
  copy = checkpoints.StageCheckpoints(str(tmp_path / "copy"))
  assert source.copy_latest_to(copy) == 2
  assert copy.latest_step() == 2 and sorted(os.listdir(tmp_path / "copy")) == ["2"]
  np.testing.assert_array_equal(np.asarray(copy.restore(like)["b"]), np.asarray(tree["b"]))
  with pytest.raises(checkpoints.CheckpointError, match="cannot be restored"):
    source.restore({"w": jnp.zeros((3, 3), jnp.bfloat16), "b": like["b"], "step": like["step"],
                    "flags": like["flags"]})
