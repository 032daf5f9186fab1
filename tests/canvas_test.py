"""Canvas renderer against loops in NumPy, and its gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import references
from npdraw_jax.model import canvas

# 13 is not a multiple of 3, so parts at the last row and column overhang.
GRID = canvas.Grid(canvas_size=13, patch_size=4, stride=3)
K, T, C = 6, 7, 2


def random_drawing(seed, batch=(3,)):
  rng = np.random.default_rng(seed)
  bank = rng.uniform(size=(K, GRID.patch_size, GRID.patch_size, C)).astype(np.float32)
  pres = rng.uniform(size=(*batch, T)) < 0.7
  where = rng.integers(GRID.num_locations, size=(*batch, T))
  what = rng.integers(K, size=(*batch, T))
  return bank, pres, where, what


class GridTest(absltest.TestCase):
  def test_locations(self):
    self.assertEqual(GRID.side, 5)
    self.assertEqual(GRID.num_locations, 25)
    np.testing.assert_array_equal(GRID.corners(), references.corners(13, 3))

  def test_bad_sizes(self):
    with self.assertRaisesRegex(ValueError, 'exceeds'):
      canvas.Grid(canvas_size=3, patch_size=4, stride=1)
    with self.assertRaisesRegex(ValueError, 'positive'):
      canvas.Grid(canvas_size=8, patch_size=2, stride=0)


class RenderTest(chex.TestCase, parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_hard_matches_numpy_with_clipping(self):
    bank, pres, where, what = random_drawing(0)
    # Make sure the overhanging bottom-right corner is drawn.
    pres[0, 0], where[0, 0] = True, GRID.num_locations - 1
    render_steps = self.variant(lambda *a: canvas.render_steps(GRID, *a))
    canvases, maps = render_steps(bank, pres, where, what)
    chex.assert_shape(canvases, (3, T, 13, 13, C))
    chex.assert_shape(maps, (3, T, 13, 13, 1))
    final = canvas.render(GRID, bank, pres, where, what)
    for b in range(3):
      for t in range(T):
        want_canvas, want_map = references.render(
          bank, pres[b, : t + 1], where[b, : t + 1], what[b, : t + 1], 13, 3
        )
        np.testing.assert_allclose(canvases[b, t], want_canvas, rtol=0, atol=1e-7)
        np.testing.assert_array_equal(maps[b, t], want_map)
      np.testing.assert_array_equal(final[b], canvases[b, -1])

  @parameterized.parameters('every_step', 'drawn')
  def test_history_maps_match_numpy(self, history):
    bank, pres, where, what = random_drawing(5)
    self.assertTrue(pres.any() and not pres.all())
    every_box = history == 'every_step'
    hard = jax.jit(lambda *a: canvas.render_steps(GRID, *a, history=history))
    relaxed = jax.jit(lambda *a: canvas.render_relaxed_steps(GRID, *a, history=history))
    _, hard_maps = hard(bank, pres, where, what)
    _, soft_maps = relaxed(
      bank,
      pres.astype(np.float32),
      jax.nn.one_hot(where, GRID.num_locations),
      jax.nn.one_hot(what, K),
    )
    for b in range(3):
      for t in range(T):
        args = (bank, pres[b, : t + 1], where[b, : t + 1], what[b, : t + 1], 13, 3)
        _, want = references.render(*args, every_box=every_box)
        np.testing.assert_array_equal(hard_maps[b, t], want)
        np.testing.assert_allclose(soft_maps[b, t], want, atol=1e-6)

  def test_bad_history_names_the_config_key(self):
    with self.assertRaisesRegex(ValueError, 'model.prior_history'):
      canvas.render_steps(GRID, *random_drawing(0), history='all')

  @parameterized.parameters(
    (28, 5, [(1, 1, 4.0)]), (32, 4, [(0, 0, 1.0), (0, 1, 1.0), (1, 0, 1.0), (1, 1, 1.0)])
  )
  def test_empty_location_mark_by_hand(self, size, patch, pixels):
    # Part row i lands on canvas row round(i + 1 - p/2) - 1, half to even:
    # p = 5: rows -3, -1, -1, 1, 1 (two rows on row 1); p = 4: rows -2, -1, 0, 1.
    mark = canvas.empty_location_mark(canvas.Grid(size, patch, patch))
    want = np.zeros((size, size, 1), np.float32)
    for r, c, v in pixels:
      want[r, c] = v
    np.testing.assert_array_equal(mark, want)

  @parameterized.parameters('every_step', 'drawn')
  def test_sampled_boxes(self, history):
    _, pres, where, _ = random_drawing(6)
    added = canvas.sampled_boxes(GRID, pres, where, history, jnp.float32)
    mark = canvas.empty_location_mark(GRID) if history == 'every_step' else 0.0
    for b, t in np.ndindex(pres.shape):
      box = references.render(np.ones((1, 4, 4, 1)), [True], where[b, t : t + 1], [0], 13, 3)[1]
      np.testing.assert_array_equal(added[b, t], box if pres[b, t] else mark + 0 * box)

  def test_vmap_equals_batched(self):
    bank, pres, where, what = random_drawing(1, batch=(4, 2))
    batched = canvas.render(GRID, bank, pres, where, what)
    mapped = jax.jit(jax.vmap(jax.vmap(lambda p, w, k: canvas.render(GRID, bank, p, w, k))))(
      pres, where, what
    )
    np.testing.assert_array_equal(batched, mapped)

  @chex.variants(with_jit=True, without_jit=True)
  def test_relaxed_with_one_hot_equals_hard(self):
    bank, pres, where, what = random_drawing(2)
    relaxed = self.variant(lambda *a: canvas.render_relaxed_steps(GRID, *a))
    soft_canvases, soft_maps = relaxed(
      bank,
      pres.astype(np.float32),
      jax.nn.one_hot(where, GRID.num_locations),
      jax.nn.one_hot(what, K),
    )
    hard_canvases, hard_maps = canvas.render_steps(GRID, bank, pres, where, what)
    np.testing.assert_allclose(soft_canvases, hard_canvases, atol=1e-6)
    np.testing.assert_allclose(soft_maps, hard_maps, atol=1e-6)

  def test_place_is_the_weighted_sum_of_pastes(self):
    rng = np.random.default_rng(3)
    parts = rng.uniform(size=(2, 4, 4, C)).astype(np.float32)
    weights = rng.dirichlet(np.ones(GRID.num_locations), size=2).astype(np.float32)
    placed = canvas.place(GRID, parts, weights)
    for b in range(2):
      want = np.zeros((13, 13, C))
      for loc in range(GRID.num_locations):
        pasted, _ = references.render(
          parts[b][None], [True], [loc], [0], GRID.canvas_size, GRID.stride
        )
        want += weights[b, loc] * pasted
      np.testing.assert_allclose(placed[b], want, atol=1e-5)

  def test_relaxed_pres_scales_the_part(self):
    bank, _, where, what = random_drawing(4, batch=())
    pres = np.full((T,), 0.5, np.float32)
    canvases, _ = canvas.render_relaxed_steps(
      GRID, bank, pres, jax.nn.one_hot(where, 25), jax.nn.one_hot(what, K)
    )
    hard, _ = canvas.render_steps(GRID, bank, np.ones(T, bool), where, what)
    np.testing.assert_allclose(canvases, 0.5 * hard, atol=1e-6)


class FinalCanvasTest(parameterized.TestCase):
  @parameterized.product(where_gradient=(True, False), kernels=('cpu', 'plain'))
  def test_render_relaxed_is_the_last_step_with_its_gradients(self, where_gradient, kernels):
    bank, pres, where, what = random_drawing(5)
    rng = np.random.default_rng(6)
    where_soft = rng.dirichlet(np.ones(GRID.num_locations), size=(3, T)).astype(np.float32)
    what_soft = rng.dirichlet(np.ones(K), size=(3, T)).astype(np.float32)
    cotangent = rng.normal(size=(3, 13, 13, C)).astype(np.float32)

    def through(render):
      def objective(pres, where_soft, what_soft):
        final = render(GRID, bank, pres, straight_through(where_soft), what_soft, where_gradient)
        return jnp.vdot(final, cotangent)

      return jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2)))(
        pres.astype(np.float32), where_soft, what_soft
      )

    want = through(lambda *a: canvas.render_relaxed_steps(*a)[0][:, -1])
    got = through(lambda *a: canvas.render_relaxed(*a, kernels=kernels))
    chex.assert_trees_all_equal(got, want)


def straight_through(soft):
  """One-hot in value, the soft weights' gradient (as the stage-2 `where` sample)."""
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), soft.shape[-1], dtype=soft.dtype)
  return hard + (soft - jax.lax.stop_gradient(soft))


class PlaceStraightThroughTest(chex.TestCase):
  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(7)
    self.parts = rng.uniform(size=(3, T, 4, 4, C)).astype(np.float32)
    self.soft = rng.dirichlet(np.ones(GRID.num_locations), size=(3, T)).astype(np.float32)
    # The bottom-right location overhangs the border.
    self.soft[0, 0, -1] = 2.0
    self.projection = rng.normal(size=(3, T, 13, 13, C)).astype(np.float32)

  def objective(self, place):
    return lambda parts, soft: jnp.sum(place(GRID, parts, straight_through(soft)) * self.projection)

  @chex.variants(with_jit=True, without_jit=True)
  def test_values_and_gradients_equal_the_einsum(self):
    grads = {}
    for name, place in (('einsum', canvas.place), ('pad', canvas.place_straight_through)):
      value_and_grad = self.variant(jax.value_and_grad(self.objective(place), argnums=(0, 1)))
      grads[name] = value_and_grad(self.parts, self.soft)
    placed = canvas.place_straight_through(GRID, self.parts, straight_through(self.soft))
    np.testing.assert_array_equal(
      placed, canvas.place(GRID, self.parts, straight_through(self.soft))
    )
    chex.assert_trees_all_close(grads['pad'], grads['einsum'], rtol=1e-6, atol=1e-6)

  def test_gradients_match_numpy(self):
    d_parts, d_soft = jax.grad(self.objective(canvas.place_straight_through), argnums=(0, 1))(
      self.parts, self.soft
    )
    where = self.soft.argmax(-1)
    for b in range(3):
      for t in range(T):
        proj = self.projection[b, t]
        # d/dw_l <proj, paste(part, l)> for every location l.
        want = [
          np.sum(proj * references.render(self.parts[b, t][None], [1], [loc], [0], 13, 3)[0])
          for loc in range(GRID.num_locations)
        ]
        np.testing.assert_allclose(d_soft[b, t], want, rtol=1e-5, atol=1e-5)
        # The part gets the projection's window at its (one-hot) location.
        r, c = GRID.corners()[where[b, t]]
        window = references.padded_patch(proj, r, c, 4)
        np.testing.assert_allclose(d_parts[b, t], window, rtol=1e-6, atol=1e-6)


class GradientTest(parameterized.TestCase):
  def _check_finite_differences(self, objective, x):
    grad = np.asarray(jax.grad(objective)(x)).reshape(-1)
    eps = 1e-6
    numeric = np.empty(x.size)
    for flat in range(x.size):
      step = np.zeros(x.size)
      step[flat] = eps
      step = step.reshape(x.shape)
      numeric[flat] = (objective(x + step) - objective(x - step)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-6)
    self.assertGreater(np.abs(grad).max(), 0.0)

  @parameterized.parameters('what', 'pres')
  def test_relaxed_gradient_matches_finite_differences(self, argument):
    # float64, so central differences are accurate enough to compare closely.
    with jax.enable_x64(True):
      rng = np.random.default_rng(5)
      bank, _, where, what = random_drawing(6, batch=())
      inputs = {
        'pres': rng.uniform(0.2, 0.9, size=T),
        'what': rng.dirichlet(np.ones(K), size=T),
      }
      projection = rng.normal(size=(13, 13, C))

      def objective(value):
        args = {**inputs, argument: value}
        canvases, maps = canvas.render_relaxed_steps(
          GRID, bank.astype(np.float64), args['pres'], np.eye(25)[where], args['what']
        )
        return jnp.sum(canvases[-1] * projection) + jnp.sum(maps[-1] * projection[..., :1])

      self._check_finite_differences(objective, inputs[argument])

  def test_place_gradient_matches_finite_differences(self):
    # `place` is linear in soft weights; its gradient is what `where` receives.
    with jax.enable_x64(True):
      rng = np.random.default_rng(8)
      parts = rng.uniform(size=(4, 4, C))
      projection = rng.normal(size=(13, 13, C))
      weights = rng.dirichlet(np.ones(GRID.num_locations))
      self._check_finite_differences(
        lambda w: jnp.sum(canvas.place(GRID, parts, w) * projection), weights
      )


if __name__ == '__main__':
  absltest.main()
