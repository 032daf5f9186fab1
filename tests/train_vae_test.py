"""Stage-2 training: exact resume, model selection on held-out images, and
sharded == unsharded."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from absl.testing import absltest

from configs import tiny
from npdraw_jax.infra import run_dir
from npdraw_jax.stages import bank_parse, train_prior, train_vae

pytestmark = pytest.mark.slow  # Minutes: started first (tests/conftest.py).

HERE = os.path.dirname(os.path.abspath(__file__))


def holdout_records(workdir):
  with open(os.path.join(workdir, run_dir.METRICS_FILE)) as f:
    records = [json.loads(line) for line in f]
  return [r for r in records if r['stage'] == 'vae' and r['split'] == 'holdout']


class ResumeTest(absltest.TestCase):
  def test_n_steps_stop_n_more_equals_2n_straight(self):
    config = tiny.get_config()  # 64 held-out images.
    config.vae.train_steps = 6
    config.vae.checkpoint_every = 3
    config.vae.keep_checkpoints = 5
    workdir = tempfile.mkdtemp()
    bank_parse.run_bank(config, workdir)
    bank_parse.run_parse(config, workdir)
    train_prior.train_and_evaluate(config, workdir)
    straight = train_vae.train_and_evaluate(config, workdir)
    # The held-out bound at every checkpoint; the best of them is kept.
    records = holdout_records(workdir)
    self.assertEqual([r['step'] for r in records], [3, 6])
    for r in records:
      self.assertEqual(r['holdout_images'], 64)
      self.assertEqual(r['iwae_samples'], config.vae.holdout_iwae_samples)
      self.assertLessEqual(r['nll_iwae'], r['elbo'] + 1e-4)
    lowest = min(records, key=lambda r: r['nll_iwae'])
    best = train_vae.open_best_checkpoint(workdir)
    self.assertEqual(best.best()[0], lowest['step'])
    self.assertAlmostEqual(best.best()[1], lowest['nll_iwae'], places=5)
    best.close()
    self.assertEqual(
      os.listdir(os.path.join(workdir, 'vae', run_dir.BEST_DIR)), [str(lowest['step'])]
    )
    # Stopped after step 3: step 6 was never saved.
    shutil.rmtree(os.path.join(workdir, 'vae', '6'))
    resumed = train_vae.train_and_evaluate(config, workdir)
    self.assertEqual(int(resumed.step), 6)
    # The resumed run bounds step 6 again, alike, and keeps the same best.
    again = holdout_records(workdir)[-1]
    self.assertEqual(again['step'], 6)
    self.assertAlmostEqual(again['nll_iwae'], records[-1]['nll_iwae'], places=4)
    best = train_vae.open_best_checkpoint(workdir)
    self.assertEqual(best.best()[0], lowest['step'])
    best.close()
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
    # The authors' convolutions feeding a batch norm have a bias whose true
    # gradient is zero: Adam turns its round-off, which depends on the
    # reduction order, into full-size steps, and the batch norm's running mean
    # carries that bias. Everything else must agree.
    biased = re.compile(r"\['params'\](.*\['TorchConvBN_\d+'\])\['Conv_0'\]\['bias'\]")
    blocks = {m[1]: m[0] for m in map(biased.fullmatch, results[1]) if m}
    self.assertNotEmpty(blocks)
    noise = {*blocks.values(), *(f"['stats']{b}['BatchNorm_0']['mean']" for b in blocks)}
    self.assertLessEqual(noise, results[1].keys())
    for name in results[1].keys() - set(noise):
      np.testing.assert_allclose(
        results[4][name], results[1][name], rtol=1e-6, atol=1e-6, err_msg=name
      )


if __name__ == '__main__':
  absltest.main()
