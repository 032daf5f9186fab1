"""Pieces of the eval stage: the summary of per-image bounds, the authors' NLL
estimate, FID's feature moments and its binary protocol."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from scipy import special

from configs import tiny
from npdraw_jax.infra import sharding
from npdraw_jax.model import bound, npdraw
from npdraw_jax.model.nets import inception
from npdraw_jax.stages import fid, scoring


class SummariseTest(absltest.TestCase):
  def test_means_standard_errors_and_bits_per_dim(self):
    rng = np.random.default_rng(0)
    per_image = {
      'nll_iwae_1': rng.normal(100, 5, 40),
      'nll_iwae_8': rng.normal(90, 5, 40),
      'elbo': rng.normal(110, 5, 40),
    }
    out = bound.summarise(per_image, num_dims=784, is_8bit=True)
    self.assertEqual(out['iwae_samples'], 8)
    self.assertEqual(out['test_images'], 40)
    self.assertEqual(out['nll_iwae'], out['nll_iwae_8'])
    for name, values in per_image.items():
      self.assertAlmostEqual(out[name], values.mean())
      self.assertAlmostEqual(out[f'{name}_stderr'], values.std(ddof=1) / math.sqrt(40))
    self.assertAlmostEqual(
      out['bits_per_dim_1'], per_image['nll_iwae_1'].mean() / 784 / math.log(2)
    )
    self.assertAlmostEqual(out['bits_per_dim'], out['bits_per_dim_8'])
    self.assertNotIn('bits_per_dim', bound.summarise(per_image, 784, is_8bit=False))


def _bernoulli_kl(q_logit, p_logit):
  q, p = special.expit(q_logit), special.expit(p_logit)
  return q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))


def _uniform_kl(p_logits):
  """KL(uniform || softmax(p_logits)) over the last axis."""
  return -np.log(p_logits.shape[-1]) - special.log_softmax(p_logits, axis=-1).mean(-1)


class AuthorsNllTest(absltest.TestCase):
  def test_one_step_model_against_numpy(self):
    # One step; an encoder and a decoder with all parameters zero output
    # logits 0: q is uniform (pres ~ Bern(1/2)) and p(x | z) = 2^-256 for any
    # z. The prior on the empty history is random. Sample s then weighs
    # log p(x | z_s) - KL_s with KL_s = K0 (pres_s = 0) or K1 (pres_s = 1), so
    # the estimate is 256 log 2 - log((1 - f) e^-K0 + f e^-K1), f the share of
    # the S samples that draw the part.
    config = tiny.get_config()
    config.model.T = 1
    config.parse.order = 'greedy'  # Any T.
    model = npdraw.make_model(config)
    variables = jax.jit(lambda k: npdraw.init_variables(model, k))(jax.random.key(0))
    params = variables['params']
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    prior = jax.tree.map(
      lambda x, k: x + 0.3 * jax.random.normal(k, x.shape),
      params['prior'],
      jax.tree.unflatten(
        jax.tree.structure(params['prior']),
        list(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params['prior'])))),
      ),
    )
    variables = {
      'params': {
        'encoder': zeros(params['encoder']),
        'decoder': zeros(params['decoder']),
        'prior': prior,
      },
      'batch_stats': variables['batch_stats'],
    }
    empty = jnp.zeros((1, 1, 16, 16, 1))
    p = jax.tree.map(
      lambda x: np.asarray(x, np.float64)[0, 0],
      model.prior.apply({'params': prior}, empty, empty, jnp.arange(1)),
    )
    k0 = _bernoulli_kl(0.0, p['pres'])
    k1 = k0 + _uniform_kl(p['where']) + _uniform_kl(p['what'])
    self.assertGreater(k1 - k0, 0.3)  # The two kinds of sample weigh apart.

    num_images, num_samples = 64, 4
    images = (jax.random.uniform(jax.random.key(2), (num_images, 16, 16, 1)) < 0.3).astype(
      jnp.float32
    )
    bank = jax.random.uniform(jax.random.key(3), (16, 4, 4, 1))
    # One IWAE sample asked for: the authors' S samples are drawn anyway.
    out = jax.jit(
      lambda key: bound.iwae_bounds(model, variables, bank, images, key, (1,), 2, num_samples)
    )(jax.random.key(4))
    estimate = np.asarray(out[f'nll_authors_{num_samples}'], np.float64)
    mean_weight = np.exp(256 * np.log(2) - estimate)
    share = (mean_weight - np.exp(-k0)) / (np.exp(-k1) - np.exp(-k0))
    drawn = np.round(share * num_samples)
    np.testing.assert_allclose(share * num_samples, drawn, atol=2e-3)
    self.assertTrue(np.all((drawn >= 0) & (drawn <= num_samples)))
    # The draws of pres are fair coins: 256 of them.
    self.assertLess(abs(drawn.mean() / num_samples - 0.5), 4 * 0.5 / math.sqrt(256))
    # Both kinds occur, so a mean of the KLs instead of a log-mean-exp would show.
    self.assertGreater(np.mean((drawn > 0) & (drawn < num_samples)), 0.5)


class SharedSamplesTest(absltest.TestCase):
  def test_the_authors_estimate_leaves_the_bounds_as_they_were(self):
    model = npdraw.make_model(tiny.get_config())
    variables = jax.jit(lambda k: npdraw.init_variables(model, k))(jax.random.key(0))
    images = (jax.random.uniform(jax.random.key(1), (8, 16, 16, 1)) < 0.3).astype(jnp.float32)
    bank = jax.random.uniform(jax.random.key(2), (16, 4, 4, 1))
    bounds = jax.jit(
      lambda authors: bound.iwae_bounds(
        model, variables, bank, images, jax.random.key(3), (1, 4), 2, authors
      ),
      static_argnums=0,
    )
    alone, shared = bounds(0), bounds(4)
    self.assertEqual(set(shared) - set(alone), {'nll_authors_4'})
    for name, value in alone.items():
      np.testing.assert_allclose(shared[name], value, rtol=1e-6, err_msg=name)
    # log p(x | z) - KL differs from log p(x | z) + log p(z) - log q(z): a real second estimate.
    self.assertGreater(np.max(np.abs(shared['nll_authors_4'] - shared['nll_iwae_4'])), 0.1)

  def test_sample_counts_are_checked_naming_the_field(self):
    model, mesh = npdraw.make_model(tiny.get_config()), sharding.make_mesh()
    for counts, authors, field in (
      ((1, 10), 0, 'eval.iwae_samples'),
      ((1, 8), 10, 'eval.authors_samples'),
      ((1, 8), -1, 'eval.authors_samples'),
    ):
      with self.assertRaisesRegex(ValueError, field):
        scoring.make_eval_step(model, mesh, counts, 4, authors)


class FeatureMomentsTest(absltest.TestCase):
  def test_padded_batches_give_the_moments_of_all_images(self):
    rng = np.random.default_rng(1)
    projection = rng.normal(size=(4 * 4 * 3, inception.FEATURES))
    calls = []

    def features_fn(images):  # A stand-in for Inception: a fixed linear map.
      calls.append(images.shape)
      return images.reshape(images.shape[0], -1) @ projection

    images = rng.uniform(size=(23, 4, 4, 3)).astype(np.float32)
    batches = (images[i : i + 10] for i in range(0, 23, 10))
    mean, covariance = fid.mean_and_covariance(fid.feature_moments(features_fn, batches, 10))
    features = images.reshape(23, -1).astype(np.float64) @ projection
    np.testing.assert_allclose(mean, features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(covariance, np.cov(features, rowvar=False), rtol=1e-4, atol=1e-5)
    self.assertEqual(calls, [(10, 4, 4, 3)] * 3)  # The short batch is padded: one shape.


class FidBinarizeTest(absltest.TestCase):
  def test_features_see_bernoulli_draws_of_both_streams(self):
    rng = np.random.default_rng(2)
    fake = rng.uniform(0, 0.5, size=(40, 8, 8, 3)).astype(np.float32)
    real = rng.uniform(0.5, 1, size=(40, 8, 8, 3)).astype(np.float32)
    seen = []
    projection = rng.normal(size=(8 * 8 * 3, 4))  # Few features: a quick distance.

    def features_fn(images):  # A stand-in for Inception that records its inputs.
      seen.append(np.array(images))
      return images.reshape(images.shape[0], -1) @ projection

    def batches(images):
      return (images[i : i + 10] for i in range(0, 40, 10))

    fid.images_fid(features_fn, batches(fake), batches(real), 10, binarize_seed=0)
    seen_fake, seen_real = np.concatenate(seen[:4]), np.concatenate(seen[4:])
    for images, probabilities in ((seen_fake, fake), (seen_real, real)):
      self.assertContainsSubset(set(np.unique(images)), {0.0, 1.0})
      # Pixel by pixel: the draws' mean within 4 standard errors of p's, over
      # all pixels and over those of high and of low p alike.
      high = probabilities >= np.median(probabilities)
      for pixels in (np.ones_like(high), high, ~high):
        p = probabilities[pixels]
        stderr = math.sqrt(np.mean(p * (1 - p)) / p.size)
        self.assertLess(abs(images[pixels].mean() - p.mean()), 4 * stderr)
    # Repeatable per seed; another seed draws other pixels.
    seen.clear()
    fid.images_fid(features_fn, batches(fake), batches(real), 10, binarize_seed=0)
    np.testing.assert_array_equal(np.concatenate(seen[:4]), seen_fake)
    seen.clear()
    fid.images_fid(features_fn, batches(fake), batches(real), 10, binarize_seed=1)
    self.assertGreater(np.mean(np.concatenate(seen[:4]) != seen_fake), 0.1)
    # Off: the images as they are.
    seen.clear()
    fid.images_fid(features_fn, batches(fake), batches(real), 10, binarize_seed=None)
    np.testing.assert_array_equal(np.concatenate(seen[:4]), fake)
    np.testing.assert_array_equal(np.concatenate(seen[4:]), real)


if __name__ == '__main__':
  absltest.main()
