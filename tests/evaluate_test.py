"""Pieces of the eval stage: the summary of per-image bounds and FID's feature moments."""

import math

import numpy as np
from absl.testing import absltest

from npdraw_jax import evaluate, fid
from npdraw_jax.models import inception


class SummariseTest(absltest.TestCase):
  def test_means_standard_errors_and_bits_per_dim(self):
    rng = np.random.default_rng(0)
    per_image = {
      'nll_iwae_1': rng.normal(100, 5, 40),
      'nll_iwae_8': rng.normal(90, 5, 40),
      'elbo': rng.normal(110, 5, 40),
    }
    out = evaluate.summarise(per_image, num_dims=784, is_8bit=True)
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
    self.assertNotIn('bits_per_dim', evaluate.summarise(per_image, 784, is_8bit=False))


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
    mean, covariance = fid.mean_and_covariance(evaluate.feature_moments(features_fn, batches, 10))
    features = images.reshape(23, -1).astype(np.float64) @ projection
    np.testing.assert_allclose(mean, features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(covariance, np.cov(features, rowvar=False), rtol=1e-4, atol=1e-5)
    self.assertEqual(calls, [(10, 4, 4, 3)] * 3)  # The short batch is padded: one shape.


if __name__ == '__main__':
  absltest.main()
