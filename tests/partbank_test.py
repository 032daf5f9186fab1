"""Part bank: patch sampling, k-means++ and Lloyd against scikit-learn."""

import tempfile

import jax
import numpy as np
from absl.testing import absltest
from sklearn.cluster import KMeans

from npdraw_jax.infra import run_dir
from npdraw_jax.model import partbank


def blobs(seed, per_blob=200, num_blobs=8, dim=12, spread=0.05):
  rng = np.random.default_rng(seed)
  centres = rng.uniform(size=(num_blobs, dim))
  points = centres[:, None] + spread * rng.normal(size=(num_blobs, per_blob, dim))
  return points.reshape(-1, dim).astype(np.float32), centres


class KMeansTest(absltest.TestCase):
  def test_inertia_no_worse_than_sklearn_from_same_centres(self):
    rng = np.random.default_rng(0)
    points = rng.uniform(size=(3000, 16)).astype(np.float32)  # No clear clusters.
    init = np.asarray(partbank.kmeans_plusplus(jax.random.key(0), points, 20))
    _, counts, inertia, iters = partbank.kmeans(points, init, 300, 0.0, 512)
    reference = KMeans(20, init=init, n_init=1, max_iter=300, tol=0.0, algorithm='lloyd')
    reference.fit(points.astype(np.float64))
    self.assertLessEqual(float(inertia), reference.inertia_ * (1 + 1e-4))
    self.assertEqual(int(counts.sum()), 3000)
    self.assertGreater(int(iters), 1)

  def test_converged_centres_are_cluster_means(self):
    points, _ = blobs(1)
    init = np.asarray(partbank.kmeans_plusplus(jax.random.key(1), points, 8))
    centres, counts, inertia, _ = partbank.kmeans(points, init, 100, 0.0, 128)
    d = ((points[:, None] - np.asarray(centres)[None]) ** 2).sum(-1)
    labels = d.argmin(1)
    for k in range(8):
      np.testing.assert_allclose(centres[k], points[labels == k].mean(0), atol=1e-5)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=8))
    np.testing.assert_allclose(inertia, d.min(1).sum(), rtol=1e-4)

  def test_chunk_size_does_not_change_the_result(self):
    points, _ = blobs(2)
    init = np.asarray(partbank.kmeans_plusplus(jax.random.key(2), points, 8))
    small = partbank.kmeans(points, init, 50, 1e-4, 7)
    large = partbank.kmeans(points, init, 50, 1e-4, 4096)
    for a, b in zip(small, large, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5)

  def test_plusplus_seeds_one_centre_per_separated_blob(self):
    points, centres = blobs(3, spread=0.001)
    init = np.asarray(partbank.kmeans_plusplus(jax.random.key(3), points, 8))
    nearest_blob = ((init[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    self.assertCountEqual(nearest_blob, range(8))
    # Every seed is a data point.
    self.assertTrue(all((points == row).all(1).any() for row in init))


class SamplePatchesTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(4)
    # Sparse images: most patches are empty.
    self.images = (rng.uniform(size=(20, 10, 10, 1)) < 0.1).astype(np.float32)

  def all_patches(self, p, stride):
    found = []
    for image in self.images:
      for r in range(0, 10 - p + 1, stride):
        for c in range(0, 10 - p + 1, stride):
          found.append(image[r : r + p, c : c + p])
    return np.stack(found)

  def test_keeps_real_non_empty_patches(self):
    every = self.all_patches(3, 2)
    non_empty = every[every.mean((1, 2, 3)) >= 0.2]
    sampled = partbank.sample_patches(self.images, 3, 2, 0.2, 10_000, seed=0)
    # Fewer non-empty patches than max_patches: all of them, each once.
    self.assertEqual(len(sampled), len(non_empty))
    key = lambda a: sorted(map(bytes, (a > 0.5).astype(np.uint8).reshape(len(a), -1)))
    self.assertEqual(key(sampled), key(non_empty))

  def test_subset_size_and_determinism(self):
    a = partbank.sample_patches(self.images, 3, 1, 0.0, 50, seed=7)
    b = partbank.sample_patches(self.images, 3, 1, 0.0, 50, seed=7)
    c = partbank.sample_patches(self.images, 3, 1, 0.0, 50, seed=8)
    self.assertEqual(a.shape, (50, 3, 3, 1))
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.array_equal(a, c))

  def test_all_empty_is_an_error(self):
    with self.assertRaisesRegex(ValueError, 'empty_threshold'):
      partbank.sample_patches(self.images, 3, 1, 2.0, 50, seed=0)


class BuildTest(absltest.TestCase):
  def build(self, seed):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(30, 12, 12, 3)).astype(np.float32)
    return partbank.build(
      images,
      num_parts=6,
      patch_size=4,
      extract_stride=2,
      empty_threshold=0.0,
      max_patches=400,
      max_iters=50,
      tol=1e-4,
      chunk_size=64,
      seed=seed,
      settings={'K': 6},
    )

  def test_bank_is_deterministic_sorted_and_round_trips(self):
    bank = self.build(0)
    self.assertEqual(bank.parts.shape, (6, 4, 4, 3))
    self.assertEqual(bank.parts.dtype, np.float32)
    self.assertEqual(int(bank.counts.sum()), bank.num_patches)
    self.assertEqual(bank.num_patches, 400)
    self.assertTrue((np.diff(bank.counts) <= 0).all())
    again = self.build(0)
    np.testing.assert_array_equal(bank.parts, again.parts)
    self.assertFalse(np.array_equal(bank.parts, self.build(1).parts))
    with tempfile.TemporaryDirectory() as d:
      run_dir.save_bank(d, bank)
      loaded = run_dir.load_bank(d)
    np.testing.assert_array_equal(loaded.parts, bank.parts)
    np.testing.assert_array_equal(loaded.counts, bank.counts)
    self.assertEqual(loaded.settings, {'K': 6})
    self.assertAlmostEqual(loaded.inertia, bank.inertia)

  def test_too_few_patches_for_k(self):
    with self.assertRaisesRegex(ValueError, 'model.K'):
      partbank.build(
        np.ones((1, 4, 4, 1), np.float32),
        num_parts=5,
        patch_size=4,
        extract_stride=1,
        empty_threshold=0.0,
        max_patches=10,
        max_iters=5,
        tol=0.0,
        chunk_size=8,
        seed=0,
      )


if __name__ == '__main__':
  absltest.main()
