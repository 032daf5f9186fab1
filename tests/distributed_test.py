"""Joining a multi-process run: what is detected, what the flags must say.
(The runs themselves: tests/multihost_test.py.)"""

import importlib.util

import jax
import pytest

from npdraw_jax import errors
from npdraw_jax.infra import distributed

TPU_VM = importlib.util.find_spec('libtpu') is not None


@pytest.mark.parametrize(
  'environ, cluster',
  [
    ({}, None),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}, 'SLURM'),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}, None),  # One task: a plain run.
    ({'SLURM_NTASKS': '4'}, None),  # Not inside a job.
    ({'OMPI_COMM_WORLD_SIZE': '2'}, 'Open MPI'),
    ({'OMPI_COMM_WORLD_SIZE': '1'}, None),
  ],
)
def test_detected_cluster(environ, cluster):
  if TPU_VM and cluster is None:
    cluster = 'Cloud TPU'
  assert distributed.detected_cluster(environ) == cluster


def test_a_plain_run_stays_alone():
  assert distributed.initialize(environ={}) is None
  assert jax.process_count() == 1
  distributed.barrier('alone')  # Returns at once with one process.


@pytest.mark.parametrize(
  'flags, message',
  [
    ({'coordinator_address': '127.0.0.1:1234'}, 'needs all of --coordinator_address'),
    ({'num_processes': 2, 'process_id': 0}, 'needs all of --coordinator_address'),
    (
      {'coordinator_address': '127.0.0.1:1234', 'num_processes': 2, 'process_id': 2},
      r'--process_id=2 is not in \[0, --num_processes=2\)',
    ),
  ],
)
def test_incomplete_or_inconsistent_flags_are_config_errors(flags, message):
  with pytest.raises(errors.ConfigError, match=message):
    distributed.initialize(**flags, environ={})


def test_errors_of_a_single_process_are_never_a_lost_peer():
  error = jax.errors.JaxRuntimeError('UNAVAILABLE: Gloo all-reduce failed: Connection reset')
  assert not distributed.is_peer_loss(error)
