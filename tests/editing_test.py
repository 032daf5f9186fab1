"""Latent editing: regions, the locations they hold, and composed drawings."""

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from npdraw_jax.model import canvas, editing


class RegionTest(absltest.TestCase):
  def test_named_and_numeric_regions(self):
    self.assertEqual(editing.parse_region('top', 28), (0, 0, 28, 14))
    self.assertEqual(editing.parse_region('right', 28), (14, 0, 28, 28))
    self.assertEqual(editing.parse_region('2, 3,10,28', 28), (2, 3, 10, 28))
    for bad in ('middle', '1,2,3', '0,0,29,5', '5,0,4,5', 'a,b,c,d'):
      with self.assertRaises(ValueError, msg=bad):
        editing.parse_region(bad, 28)

  def test_locations_whose_box_centre_lies_inside(self):
    # Canvas 10, parts 4, stride 4: corners 0, 4, 8 per axis; the last box is
    # clipped to rows 8..9, centre 9. Box centres per axis: 2, 6, 9.
    grid = canvas.Grid(canvas_size=10, patch_size=4, stride=4)
    centres = np.array([2.0, 6.0, 9.0])
    rows, cols = np.repeat(centres, 3), np.tile(centres, 3)
    for region in [(0, 0, 10, 5), (5, 0, 10, 10), (6, 6, 9, 9), (0, 0, 10, 10)]:
      x0, y0, x1, y1 = region
      expected = (x0 <= cols) & (cols < x1) & (y0 <= rows) & (rows < y1)
      np.testing.assert_array_equal(editing.locations_in_region(grid, region, 10), expected)
    # On an image twice the canvas, the region is in image pixels.
    top = editing.locations_in_region(grid, editing.parse_region('top', 20), 20)
    np.testing.assert_array_equal(top, rows < 5)


class ComposeTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.grid = canvas.Grid(canvas_size=16, patch_size=4, stride=4)
    rng = np.random.default_rng(0)
    self.bank = jnp.asarray(rng.uniform(size=(8, 4, 4, 1)), jnp.float32)

    def drawing():
      return editing.Steps(
        rng.uniform(size=6) < 0.7, rng.integers(0, 16, 6, np.int32), rng.integers(0, 8, 6, np.int32)
      )

    self.a, self.b = drawing(), drawing()

  def render(self, steps):
    return np.asarray(canvas.render(self.grid, self.bank, *map(jnp.asarray, steps)))

  def test_whole_region_gives_b_and_empty_region_gives_a(self):
    everywhere = editing.locations_in_region(self.grid, (0, 0, 16, 16), 16)
    nowhere = editing.locations_in_region(self.grid, (0, 0, 0, 0), 16)
    self.assertTrue(everywhere.all() and not nowhere.any())
    np.testing.assert_array_equal(
      self.render(editing.compose(self.a, self.b, everywhere)), self.render(self.b)
    )
    np.testing.assert_array_equal(
      self.render(editing.compose(self.a, self.b, nowhere)), self.render(self.a)
    )

  def test_half_region_takes_each_drawing_on_its_side(self):
    top = editing.locations_in_region(self.grid, editing.parse_region('top', 16), 16)
    composed = self.render(editing.compose(self.a, self.b, top))
    # Reference: paste by hand the kept steps of each drawing.
    expected = np.zeros((16, 16, 1), np.float32)
    bank, corners = np.asarray(self.bank), self.grid.corners()
    for steps, keep in ((self.a, ~top), (self.b, top)):
      for drawn, where, what in zip(*steps, strict=True):
        if drawn and keep[where]:
          r, c = corners[where]
          patch = expected[r : r + 4, c : c + 4]
          np.maximum(patch, bank[what], out=patch)
    np.testing.assert_array_equal(composed, expected)


if __name__ == '__main__':
  absltest.main()
