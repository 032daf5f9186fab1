"""Reading a run's Orbax checkpoints from a test, whatever devices saved them."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def _host_array(leaf: jax.Array) -> np.ndarray:
  """A NumPy copy; a PRNG key as its raw bits."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  return np.asarray(leaf)


def newest_state(stage_directory: str) -> tuple[int, dict]:
  """(step, train state as NumPy arrays) of the newest checkpoint in DIR/STAGE,
  restored onto this process's first device."""
  step = max(int(name) for name in os.listdir(stage_directory) if name.isdigit())
  path = os.path.join(stage_directory, str(step), 'default')
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    target = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
      checkpointer.metadata(path).item_metadata,
    )
    return step, jax.tree.map(_host_array, checkpointer.restore(path, target))
