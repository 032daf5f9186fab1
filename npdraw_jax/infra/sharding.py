"""The only module that builds meshes, shardings and global batches.

Data parallelism over every device of every host: a one-axis mesh named
'data', batches split along their leading axis, everything else replicated.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from npdraw_jax import errors

DATA_AXIS = 'data'


def make_mesh() -> Mesh:
  """A ('data',) mesh over all devices; Auto axes so linen layers need no annotations."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Same value on every device: parameters, optimizer state, part bank."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the 'data' axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, name: str = 'batch_size') -> int:
  """A global batch must split evenly over devices and processes."""
  devices = jax.device_count()
  if batch_size % devices:
    raise errors.ConfigError(
      f'{name} = {batch_size} does not divide over {devices} devices; use a multiple of {devices}.'
    )
  return batch_size // jax.process_count()


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded over 'data'."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )


def replicate(tree, mesh: Mesh):
  """Puts a host pytree (e.g. the part bank) on every device."""
  return jax.device_put(tree, replicated(mesh))


def data_shards() -> range:
  """The global data-shard numbers of this process's devices: one shard per
  device, numbered process by process (input_pipeline.train_batch)."""
  local = jax.local_device_count()
  return range(jax.process_index() * local, (jax.process_index() + 1) * local)


def local_copy(tree):
  """Host NumPy copies of a pytree of replicated arrays, for work one process
  does alone (pictures, FID): computing on arrays that span other processes'
  devices would wait for those processes."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
