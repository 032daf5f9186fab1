"""Stage-1 training: learning a known distribution, checkpoints, exact resume."""

import json
import math
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized

from configs import tiny
from npdraw_jax.infra import artifacts, run_dir
from npdraw_jax.model import partbank
from npdraw_jax.stages import bank_parse, train_prior

pytestmark = pytest.mark.slow  # Tens of seconds: not in the quick loop (-m "not slow").


T = 16  # The tiny config: 16x16 canvas, p = s = 4, L = 16, K = 16.


def two_drawings_workdir(config, copies=64):
  """A workdir whose parses are two fixed drawings, half the examples each."""
  workdir = tempfile.mkdtemp()
  rng = np.random.default_rng(0)
  parts = rng.uniform(size=(16, 4, 4, 1)).astype(np.float32)
  bank = partbank.PartBank(
    parts, np.ones(16, np.int64), 0.0, 16, 1, bank_parse.bank_settings(config)
  )
  run_dir.save_bank(workdir, bank)
  drawings = {
    'pres': np.zeros((2, T), bool),
    'where': np.zeros((2, T), np.int32),
    'what': np.zeros((2, T), np.int32),
  }
  drawings['pres'][:, :3] = True
  # Only the first part differs. The heads are independent given the history,
  # so a first step differing in both location and part would cost 2 log 2.
  drawings['where'][:, :3] = [[0, 5, 10], [0, 5, 10]]
  drawings['what'][:, :3] = [[1, 2, 3], [4, 2, 3]]
  arrays = {}
  for split in ('train', 'test'):
    rows = np.arange(2 * copies) % 2
    arrays.update({f'{split}_{k}': v[rows] for k, v in drawings.items()})
    arrays[f'{split}_index'] = np.arange(2 * copies)
    arrays[f'{split}_error'] = np.zeros(2 * copies, np.float32)
  settings = np.asarray(artifacts.to_json(bank_parse.parse_settings(config)))
  artifacts.save_npz(os.path.join(workdir, run_dir.PARSES_FILE), settings=settings, **arrays)
  return workdir


def prior_config(**prior_fields):
  config = tiny.get_config()
  config.prior.dropout = 0.0
  config.prior.update(prior_fields)
  return config


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


class LearningTest(parameterized.TestCase):
  @parameterized.parameters('authors', 'ours')
  def test_held_out_nll_reaches_log_2(self, networks):
    config = prior_config(
      lr=3e-3, warmup_steps=10, train_steps=150, eval_every=50, checkpoint_every=50
    )
    config.model.networks = networks
    workdir = two_drawings_workdir(config)
    train_prior.train_and_evaluate(config, workdir)
    records = read_metrics(workdir)
    test = [r for r in records if r['split'] == 'test']
    trained = [r for r in test if 'nll' in r]
    self.assertEqual([r['step'] for r in test], [0, 50, 100, 150])
    # Without the history the first part is a coin flip and so is where each
    # later step draws what: log 2 at best, plus what smoothing costs.
    self.assertGreater(test[0]['nll_history_free'], math.log(2))
    self.assertTrue(all(r['stage'] == 'prior' for r in records))
    # Half the test drawings are each drawing: no model beats log 2 nats, and
    # a model that has learned both drawings is close to it.
    self.assertGreater(trained[-1]['nll'], math.log(2) - 1e-3)
    self.assertLess(trained[-1]['nll'], math.log(2) + 0.1)
    self.assertGreater(trained[0]['nll'], trained[-1]['nll'])
    self.assertTrue(os.path.exists(os.path.join(workdir, run_dir.PRIOR_SAMPLES_PICTURE)))
    with open(os.path.join(workdir, 'prior', 'config.json')) as f:
      self.assertEqual(json.load(f)['prior']['train_steps'], 150)


class HistoryFreeBaselineTest(absltest.TestCase):
  def test_hand_computed_case(self):
    # T = 2, L = 2, K = 3; two train sequences, one test sequence.
    train = {
      'pres': np.array([[True, False], [True, True]]),
      'where': np.array([[0, 1], [0, 1]]),
      'what': np.array([[2, 0], [1, 0]]),
    }
    test = {
      'pres': np.array([[True, False]]),
      'where': np.array([[1, 0]]),
      'what': np.array([[1, 2]]),
    }
    # Step 1: pres (2+1)/(2+2); where 1 seen 0 of 2 drawn: (0+1)/(2+2); what 1:
    # (1+1)/(2+3). Step 2: not drawn with (2-1+1)/(2+2) -> 1 - 2/4.
    want = -(math.log(3 / 4) + math.log(1 / 4) + math.log(2 / 5) + math.log(1 - 2 / 4))
    got = train_prior.history_free_nll(train, test, num_locations=2, num_parts=3)
    self.assertAlmostEqual(got, want, places=6)


class CheckpointTest(absltest.TestCase):
  def test_resume_after_interruption_is_exact(self):
    config = prior_config(train_steps=20, checkpoint_every=5, keep_checkpoints=10, eval_every=0)
    workdir = two_drawings_workdir(config, copies=32)
    straight = train_prior.train_and_evaluate(config, workdir)
    # An interruption after step 10: the later checkpoints never happened.
    for step in (15, 20):
      shutil.rmtree(os.path.join(workdir, 'prior', str(step)))
    resumed = train_prior.train_and_evaluate(config, workdir)
    self.assertEqual(int(resumed.step), 20)
    steps = [r['step'] for r in read_metrics(workdir) if r['split'] == 'train']
    self.assertEqual(steps[-2:], [15, 20])  # The second run logged from step 11 on.
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params), strict=True):
      np.testing.assert_allclose(a, b, atol=1e-6)

    # A finished run restores instead of training, with identical logits.
    restored = train_prior.train_and_evaluate(config, workdir)
    model = train_prior.prior_lib.make_prior(config, 16)
    inputs = jax.random.uniform(jax.random.key(0), (2, T, 16, 16, 1))
    apply = lambda s: model.apply({'params': s.params}, inputs, inputs, jnp.arange(T))
    for a, b in zip(jax.tree.leaves(apply(resumed)), jax.tree.leaves(apply(restored)), strict=True):
      np.testing.assert_array_equal(a, b)

  def test_incompatible_checkpoint_is_a_clear_error(self):
    config = prior_config(train_steps=2, checkpoint_every=1, eval_every=0)
    workdir = two_drawings_workdir(config, copies=16)
    train_prior.train_and_evaluate(config, workdir)
    wider = prior_config(train_steps=2, checkpoint_every=1, eval_every=0, d_model=48)
    with self.assertRaisesRegex(ValueError, r'model\.d_model: recorded 32, requested 48\)'):
      train_prior.train_and_evaluate(wider, workdir)
    ours = prior_config(train_steps=2, checkpoint_every=1, eval_every=0)
    ours.model.networks = 'ours'
    with self.assertRaisesRegex(
      ValueError, r"\(model\.networks: recorded 'authors', requested 'ours'\)"
    ):
      train_prior.train_and_evaluate(ours, workdir)


if __name__ == '__main__':
  absltest.main()
