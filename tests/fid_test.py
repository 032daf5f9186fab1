"""FID: the Frechet distance, streaming statistics, weights files, the Inception port."""

import functools
import os
import tempfile

import numpy as np
import pytest
import scipy.linalg
from absl.testing import absltest, parameterized
from flax import traverse_util

from npdraw_jax import convert_inception
from npdraw_jax.model.nets import inception
from npdraw_jax.stages import fid


def random_features(seed, n, d, shift=0.0):
  """[n, d] correlated Gaussian features with a mean of roughly `shift`."""
  rng = np.random.default_rng(seed)
  return shift + rng.normal(size=(n, d)) @ rng.normal(size=(d, d))


@functools.cache
def random_variables():
  """Random FID Inception variables with the real names and shapes."""
  rng = np.random.default_rng(0)
  fill = {
    'kernel': lambda s: rng.normal(scale=(np.prod(s[:3])) ** -0.5, size=s),
    'scale': lambda s: rng.uniform(0.5, 1.5, size=s),
    'bias': lambda s: rng.normal(scale=0.1, size=s),
    'mean': lambda s: rng.normal(scale=0.1, size=s),
    'var': lambda s: rng.uniform(0.5, 1.5, size=s),
  }
  flat = traverse_util.flatten_dict(inception.variable_shapes())
  return traverse_util.unflatten_dict(
    {k: fill[k[-1]](v.shape).astype(np.float32) for k, v in flat.items()}
  )


class FrechetDistanceTest(parameterized.TestCase):
  @parameterized.parameters(0, 1)
  def test_closed_form_for_commuting_gaussians(self, seed):
    # Diagonal covariances rotated by one orthogonal Q commute, and then
    # sqrtm(s1 s2) = Q diag(sqrt(d1 d2)) Q^T: here diag(2, 2, 12), trace 16.
    # FID = |mu1 - mu2|^2 + Tr s1 + Tr s2 - 2 * 16 = 9 + 14 + 21 - 32 = 12.
    q = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))[0] if seed else np.eye(3)
    mu1, mu2 = q @ np.zeros(3), q @ np.array([1.0, 2.0, 2.0])
    sigma1 = q @ np.diag([1.0, 4.0, 9.0]) @ q.T
    sigma2 = q @ np.diag([4.0, 1.0, 16.0]) @ q.T
    self.assertAlmostEqual(fid.frechet_distance(mu1, sigma1, mu2, sigma2), 12.0, places=10)

  def test_matches_scipy_sqrtm(self):
    a, b = random_features(1, 400, 24), random_features(2, 300, 24, shift=0.5)
    mu1, sigma1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, sigma2 = b.mean(0), np.cov(b, rowvar=False)
    want = (
      np.sum((mu1 - mu2) ** 2)
      + np.trace(sigma1 + sigma2)
      - 2 * np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2).real)
    )
    got = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    self.assertIsInstance(got, float)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    np.testing.assert_allclose(fid.frechet_distance(mu2, sigma2, mu1, sigma1), want, rtol=1e-10)

  def test_singular_covariances(self):
    # Fewer samples than dimensions: rank-deficient covariances, no offset needed.
    a = random_features(3, 10, 32)
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    self.assertLess(abs(fid.frechet_distance(mu, sigma, mu, sigma)), 1e-12 * np.trace(sigma))
    b = random_features(4, 12, 32)
    distance = fid.frechet_distance(mu, sigma, b.mean(0), np.cov(b, rowvar=False))
    self.assertTrue(np.isfinite(distance) and distance > 0)

  def test_bad_shapes(self):
    with self.assertRaisesRegex(ValueError, 'covariances'):
      fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


class MomentsTest(absltest.TestCase):
  def test_streaming_equals_batch(self):
    features = random_features(5, 43, 16, shift=3.0).astype(np.float32)
    moments = fid.init_moments(16)
    for start, stop in ((0, 7), (7, 8), (8, 38), (38, 43)):
      moments = fid.update_moments(moments, features[start:stop])
    mean, covariance = fid.mean_and_covariance(moments)
    self.assertEqual(moments.count, 43)
    np.testing.assert_allclose(mean, features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(covariance, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-9)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, r'\[N, 16\]'):
      fid.update_moments(fid.init_moments(16), np.zeros((4, 15)))
    with self.assertRaisesRegex(ValueError, 'at least 2'):
      fid.mean_and_covariance(fid.update_moments(fid.init_moments(16), np.zeros((1, 16))))


class WeightsFileTest(absltest.TestCase):
  def test_round_trip(self):
    with tempfile.TemporaryDirectory() as directory:
      path = os.path.join(directory, 'inception.npz')
      fid.save_inception(path, random_variables())
      loaded = traverse_util.flatten_dict(fid.load_inception(path))
    for key, value in traverse_util.flatten_dict(random_variables()).items():
      np.testing.assert_array_equal(loaded[key], value)

  def test_converter_names_and_layouts(self):
    # pytorch-fid's names: 'Mixed_5b.branch1x1.conv.weight' (OIHW), '...bn.running_var'.
    torch_leaf = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}
    torch_leaf |= {'mean': 'running_mean', 'var': 'running_var'}
    state_dict = {'fc.weight': np.zeros((1008, 2048)), 'fc.bias': np.zeros(1008)}
    for key, value in traverse_util.flatten_dict(random_variables()).items():
      name = '.'.join([*key[1:-1], torch_leaf[key[-1]]])
      state_dict[name] = value.transpose(3, 2, 0, 1) if key[-1] == 'kernel' else value
      if key[-1] == 'var':
        state_dict[name.replace('running_var', 'num_batches_tracked')] = np.array(0)
    converted = traverse_util.flatten_dict(convert_inception.torch_to_variables(state_dict))
    want = traverse_util.flatten_dict(random_variables())
    self.assertEqual(converted.keys(), want.keys())
    for key, value in want.items():
      np.testing.assert_array_equal(converted[key], value)
    with self.assertRaisesRegex(ValueError, 'Unexpected'):
      convert_inception.torch_to_variables({'Mixed_5b.branch1x1.conv.bias': np.zeros(64)})

  def test_missing_file(self):
    with self.assertRaisesRegex(FileNotFoundError, 'convert_inception'):
      fid.load_inception('/nonexistent/inception_fid.npz')

  def test_wrong_files(self):
    with tempfile.TemporaryDirectory() as directory:
      text, other = os.path.join(directory, 'text.npz'), os.path.join(directory, 'other.npz')
      with open(text, 'w') as f:
        f.write('not weights')
      with self.assertRaisesRegex(ValueError, 'not an .npz'):
        fid.load_inception(text)
      np.savez(other, x=np.zeros(3))
      with self.assertRaisesRegex(ValueError, '470 missing.*1 unexpected'):
        fid.load_inception(other)
      flat = traverse_util.flatten_dict(random_variables(), sep='/')
      flat['params/Conv2d_1a_3x3/conv/kernel'] = np.zeros((3, 3, 1, 32), np.float32)
      np.savez(other, **flat)
      with self.assertRaisesRegex(ValueError, r'1 misshapen.*\(3, 3, 1, 32\)'):
        fid.load_inception(other)


class FeaturesTest(absltest.TestCase):
  def test_preprocess(self):
    grey = np.random.default_rng(6).uniform(size=(2, 299, 299, 1)).astype(np.float32)
    x = np.asarray(fid.preprocess(grey))
    self.assertEqual(x.shape, (2, 299, 299, 3))
    # At 299x299 the resize is the identity: only the scaling to [-1, 1] remains.
    np.testing.assert_allclose(x, np.repeat(2 * grey - 1, 3, axis=-1), atol=1e-6)
    small = grey[:, :40, :30]
    np.testing.assert_allclose(
      fid.preprocess(small), fid.preprocess(np.repeat(small, 3, axis=-1)), atol=1e-6
    )

  def test_features(self):
    features_fn = fid.make_feature_fn(random_variables())
    features = np.asarray(features_fn(np.full((1, 28, 28, 1), 0.5, np.float32)))
    self.assertEqual(features.shape, (1, 2048))
    self.assertTrue(np.all(np.isfinite(features)))
    for images, message in (
      (np.zeros((28, 28, 1), np.float32), 'N, H, W, C'),
      (np.zeros((1, 28, 28, 2), np.float32), 'C = 1 or 3'),
      (np.zeros((1, 28, 28, 3), np.uint8), 'float'),
    ):
      with self.assertRaisesRegex(ValueError, message):
        features_fn(images)


class TorchPortTest(absltest.TestCase):
  """Our network against pytorch-fid's on the same random weights (benchmarks/fid_port_check)."""

  def test_features_match_pytorch_fid(self):
    # Needs torch, torchvision and pytorch-fid, which npdraw-jax does not install.
    torch = pytest.importorskip('torch')
    pytest.importorskip('torchvision')
    pytest.importorskip('pytorch_fid')
    from benchmarks import fid_port_check

    net, torch_inception = fid_port_check.reference_network(seed=0)
    with tempfile.TemporaryDirectory() as directory:
      features_fn = fid_port_check.converted_features_fn(torch_inception, directory)
    generator = torch.Generator().manual_seed(1)
    images = fid_port_check.random_images(generator, (2, 28, 28, 1)).numpy()
    want = fid_port_check.torch_features(net, images)
    result = fid_port_check.compare(want, features_fn(images))
    self.assertGreater(result['spread'], 0.1 * result['max_feature'])  # the images matter
    self.assertLess(result['max_rel'], 1e-4)
