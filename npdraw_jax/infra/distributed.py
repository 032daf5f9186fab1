"""Multi-process runs: joining one, waiting for each other, noticing a lost peer.

One process per host (or per GPU) runs the same command. A process joins the
run through jax.distributed.initialize:

- explicitly, from --coordinator_address, --num_processes and --process_id;
- automatically where JAX finds the cluster by itself: Cloud TPU VMs (libtpu
  installed), SLURM jobs of several tasks, Open MPI jobs of several ranks;
- never otherwise: a plain run stays one process.
"""

import importlib.util
import os
from collections.abc import Mapping

import jax
from absl import logging
from jax.experimental import multihost_utils

from npdraw_jax import errors

# Words of JAX's errors when a peer process is gone (Gloo collectives on CPU,
# the coordination service's barriers and heartbeats elsewhere).
_PEER_LOSS_SIGNS = ('Gloo', 'Connection reset', 'heartbeat', 'Barrier', 'UNAVAILABLE', 'DEADLINE')


def detected_cluster(environ: Mapping[str, str]) -> str | None:
  """The name of a multi-process cluster JAX can join by itself, or None."""
  if int(environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in environ:
    return 'SLURM'
  if int(environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'Open MPI'
  if importlib.util.find_spec('libtpu') is not None:
    # A TPU VM: JAX reads the slice's workers from the VM's metadata; on a
    # single-host slice it joins a run of one.
    return 'Cloud TPU'
  return None


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  heartbeat_timeout_s: int = 60,
  environ: Mapping[str, str] = os.environ,
) -> str | None:
  """Joins a multi-process run when asked to or when a cluster is detected.

  Returns how it joined ('flags' or the cluster's name), or None for a plain
  single-process run. A process that stops sending heartbeats for
  heartbeat_timeout_s seconds makes the others stop.

  Raises:
    errors.ConfigError: only some of the three explicit settings are given,
      or they are inconsistent.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise errors.ConfigError(
        'A multi-process run needs all of --coordinator_address, --num_processes and '
        '--process_id (the same address and count on every process, a different id each).'
      )
    if not 0 <= process_id < num_processes:
      raise errors.ConfigError(
        f'--process_id={process_id} is not in [0, --num_processes={num_processes}).'
      )
    how = 'flags'
  else:
    how = detected_cluster(environ)
    if how is None:
      return None
  jax.distributed.initialize(
    coordinator_address, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout_s
  )
  return how


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this name (a no-op alone)."""
  if jax.process_count() > 1:
    logging.info('Waiting for all %d processes at %s.', jax.process_count(), name)
    multihost_utils.sync_global_devices(name)


def is_peer_loss(error: BaseException) -> bool:
  """Whether error, or one it was raised from or while handling, is JAX's report
  of a collective or a barrier broken by a process of this run that died (only
  in multi-process runs)."""
  if jax.process_count() == 1:
    return False
  seen = []
  while error is not None and all(error is not e for e in seen):
    if isinstance(error, jax.errors.JaxRuntimeError) and any(
      sign in str(error) for sign in _PEER_LOSS_SIGNS
    ):
      return True
    seen.append(error)
    error = error.__cause__ or error.__context__
  return False
