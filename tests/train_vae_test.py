"""Stage-2 training: exact resume, and sharded == unsharded."""

import os
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
from absl.testing import absltest

from configs import tiny
from npdraw_jax import pipeline, train_prior, train_vae

HERE = os.path.dirname(os.path.abspath(__file__))


class ResumeTest(absltest.TestCase):
  def test_n_steps_stop_n_more_equals_2n_straight(self):
    config = tiny.get_config()
    config.vae.train_steps = 6
    config.vae.checkpoint_every = 3
    config.vae.keep_checkpoints = 5
    workdir = tempfile.mkdtemp()
    pipeline.run_bank(config, workdir)
    pipeline.run_parse(config, workdir)
    train_prior.train_and_evaluate(config, workdir)
    straight = train_vae.train_and_evaluate(config, workdir)
    # Stopped after step 3: step 6 was never saved.
    shutil.rmtree(os.path.join(workdir, 'vae', '6'))
    resumed = train_vae.train_and_evaluate(config, workdir)
    self.assertEqual(int(resumed.step), 6)
    for name in ('params', 'batch_stats', 'opt_state'):
      a, b = getattr(straight, name), getattr(resumed, name)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6, err_msg=name)


class ShardingTest(absltest.TestCase):
  def test_four_devices_match_one(self):
    results = {}
    for devices in (1, 4):
      path = os.path.join(tempfile.mkdtemp(), 'out.npz')
      env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
      run = subprocess.run(
        [sys.executable, os.path.join(HERE, 'sharded_vae_step.py'), path],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(HERE),
      )
      self.assertEqual(run.returncode, 0, run.stderr[-3000:])
      results[devices] = dict(np.load(path))
    self.assertEqual(int(results[4].pop('devices')), 4)
    self.assertEqual(int(results[1].pop('devices')), 1)
    self.assertEqual(results[1].keys(), results[4].keys())
    for name in results[1]:
      np.testing.assert_allclose(results[4][name], results[1][name], rtol=1e-6, atol=1e-6)


if __name__ == '__main__':
  absltest.main()
