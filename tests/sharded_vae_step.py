"""Runs two stage-2 train steps on a fixed batch and saves the result.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharded_vae_step.py OUT.npz

train_vae_test.py runs it on 1 and on 4 host devices and compares: the
sharded step must compute what the single-device step computes.
"""

import sys

import jax
import numpy as np

from configs import tiny
from npdraw_jax.infra import sharding, training
from npdraw_jax.model import npdraw
from npdraw_jax.stages import train_vae


def main(path):
  config = tiny.get_config()
  model = npdraw.make_model(config)
  rng = np.random.default_rng(0)
  batch = {
    'image': (rng.uniform(size=(32, 16, 16, 1)) < 0.3).astype(np.float32),
    'pres': rng.uniform(size=(32, 16)) < 0.5,
    'where': rng.integers(16, size=(32, 16)).astype(np.int32),
    'what': rng.integers(16, size=(32, 16)).astype(np.int32),
  }
  bank = rng.uniform(size=(16, 4, 4, 1)).astype(np.float32)
  mesh = sharding.make_mesh()
  prior_params = jax.jit(lambda k: npdraw.init_variables(model, k))(jax.random.key(1))['params'][
    'prior'
  ]
  state = training.init_replicated(train_vae.make_init_fn(config, model, prior_params), mesh)
  step = train_vae.make_train_step(model, config, mesh, steps_per_epoch=10)
  bank = sharding.replicate(bank, mesh)
  global_batch = sharding.to_global(batch, mesh)
  for _ in range(2):
    state, metrics = step(state, bank, global_batch)
  tree = jax.device_get({'params': state.params, 'stats': state.batch_stats})
  leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  np.savez(path, **leaves, devices=jax.device_count(), loss=float(metrics['loss']))


if __name__ == '__main__':
  main(sys.argv[1])
