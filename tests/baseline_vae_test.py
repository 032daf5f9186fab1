"""Tests for npdraw_jax.baseline_vae: the Gaussian KL, the bounds, training.

References: SciPy's normal log-densities for the KL; for the bounds, the ELBO
recomputed here from the nets' own outputs (reconstruction by Monte Carlo
plus the checked KL), compared within the samples' standard errors.
"""

import json
import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from scipy import stats

from configs import tiny
from npdraw_jax import baseline_vae, distributions, input_pipeline


def setUpModule():
  jax.config.update('jax_disable_most_optimizations', True)  # Compile time dominates.


def _tiny_model_and_images(num_images=4):
  config = tiny.get_config()
  config.baseline.latent_dim = 3
  model = baseline_vae.make_model(config)
  variables = baseline_vae.init_variables(model, jax.random.key(0))
  test = input_pipeline.load_split(config.data, 'test')
  batch = input_pipeline.train_batch(test, config.data, num_images, seed=0, step=0)
  return model, variables, jnp.asarray(batch['image'])


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
    mean, log_var = self.model.net.apply(self.variables, self.images, False, method='encode')
    eps = jax.random.normal(jax.random.key(2), (repeats, *mean.shape))
    z = (mean + jnp.exp(0.5 * log_var) * eps).reshape(-1, mean.shape[-1])
    out = self.model.net.apply(self.variables, z, False, method='decode')
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
  def test_loss_decreases_on_the_embedded_digits(self):
    config = tiny.get_config()
    config.vae.train_steps = 30
    config.vae.log_every = 5
    config.vae.checkpoint_every = 30
    workdir = tempfile.mkdtemp()
    state = baseline_vae.train_and_evaluate(config, workdir)
    self.assertEqual(int(state.step), 30)
    self.assertEqual(set(state.params), {'encoder', 'decoder'})
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      losses = [json.loads(line)['loss'] for line in f]
    self.assertLess(np.mean(losses[-2:]), losses[0] - 10)
    # A finished run is resumed, not retrained.
    again = baseline_vae.train_and_evaluate(config, workdir)
    self.assertEqual(int(again.step), 30)


if __name__ == '__main__':
  absltest.main()
