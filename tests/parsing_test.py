"""Heuristic parser against NumPy loops and the greedy parse's invariants."""

import numpy as np
from absl.testing import absltest

import references
from npdraw_jax.model import canvas, parsing

GRID = canvas.Grid(canvas_size=11, patch_size=4, stride=3)  # Overhangs by 1.


def random_problem(seed, num_images=5, num_parts=7, channels=1):
  rng = np.random.default_rng(seed)
  shape = (GRID.patch_size, GRID.patch_size, channels)
  bank = rng.uniform(size=(num_parts, *shape)).astype(np.float32)
  images = rng.uniform(size=(num_images, 11, 11, channels)) ** 3  # Some dark patches.
  return bank, images.astype(np.float32)


def numpy_raster_parse(bank, image, threshold):
  pres, what = [], []
  for r, c in references.corners(11, 3):
    patch = references.padded_patch(image.astype(np.float64), r, c, GRID.patch_size)
    distances = [((patch - part) ** 2).sum() for part in bank.astype(np.float64)]
    what.append(int(np.argmin(distances)))
    pres.append(patch.mean() > threshold)
  where = np.arange(len(pres))
  rendered, _ = references.render(bank, pres, where, what, 11, 3)
  return np.array(pres), where, np.array(what), ((image - rendered) ** 2).sum()


class RasterTest(absltest.TestCase):
  def test_equals_numpy_loop(self):
    for channels in (1, 3):
      bank, images = random_problem(0, channels=channels)
      parse = parsing.parse_batch(GRID, bank, images, 'raster', 16, 0.15)
      for i, image in enumerate(images):
        pres, where, what, error = numpy_raster_parse(bank, image, 0.15)
        np.testing.assert_array_equal(parse.pres[i], pres)
        np.testing.assert_array_equal(parse.where[i], where)
        np.testing.assert_array_equal(parse.what[i], what)
        np.testing.assert_allclose(parse.error[i], error, rtol=1e-5)
      self.assertTrue(0 < parse.pres.mean() < 1)  # The threshold mattered.

  def test_wrong_step_count_and_order(self):
    bank, images = random_problem(1)
    with self.assertRaisesRegex(ValueError, 'T = L = 16'):
      parsing.parse_batch(GRID, bank, images, 'raster', 10, 0.1)
    with self.assertRaisesRegex(ValueError, 'parse.order'):
      parsing.parse_batch(GRID, bank, images, 'spiral', 16, 0.1)

  def test_parse_images_pads_batches_without_changing_results(self):
    bank, images = random_problem(2, num_images=7)
    whole = parsing.parse_batch(GRID, bank, images, 'raster', 16, 0.1)
    batched = parsing.parse_images(GRID, bank, images, 'raster', 16, 0.1, batch_size=3)
    for got, want in zip(batched, whole, strict=True):
      self.assertEqual(got.shape[0], 7)
      np.testing.assert_allclose(got, want, rtol=1e-6)


class GreedyTest(absltest.TestCase):
  def test_error_never_rises_and_steps_are_best_first(self):
    bank, images = random_problem(3)
    num_steps = 12
    parse = parsing.parse_batch(GRID, bank, images, 'greedy', num_steps, 0.01)
    for i, image in enumerate(images):
      pres, where, what = (np.asarray(a[i]) for a in parse[:3])
      errors, gains = [((image) ** 2).sum()], []
      for t in range(num_steps):
        rendered, _ = references.render(bank, pres[: t + 1], where, what, 11, 3)
        errors.append(((image - rendered) ** 2).sum())
        gains.append(errors[-2] - errors[-1])
      self.assertTrue((np.diff(errors) <= 1e-5).all(), errors)
      # Drawing stops for good: no step is drawn after the first undrawn one.
      drawn = int(pres.sum())
      self.assertTrue(pres[:drawn].all() and not pres[drawn:].any())
      self.assertGreater(drawn, 0)
      self.assertTrue((np.asarray(gains[:drawn]) > 0.01 - 1e-5).all())
      np.testing.assert_allclose(parse.error[i], errors[-1], rtol=1e-5)
      # The first step is the best single paste over all (location, part) pairs.
      best = max(
        (
          (image**2).sum()
          - ((image - references.render(bank, [1], [loc], [k], 11, 3)[0]) ** 2).sum()
        )
        for loc in range(GRID.num_locations)
        for k in range(len(bank))
      )
      np.testing.assert_allclose(gains[0], best, rtol=1e-5)

  def test_undrawn_steps_are_zero(self):
    bank, images = random_problem(4)
    parse = parsing.parse_batch(GRID, bank, images, 'greedy', 40, 0.5)
    off = ~np.asarray(parse.pres)
    self.assertTrue(off.any())
    self.assertFalse(np.asarray(parse.where)[off].any() or np.asarray(parse.what)[off].any())


if __name__ == '__main__':
  absltest.main()
