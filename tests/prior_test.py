"""The prior: causality, the log-likelihood, and the cached sampler."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from npdraw_jax import canvas, losses, sampling, train_prior
from npdraw_jax.models import prior as prior_lib

GRID = canvas.Grid(canvas_size=12, patch_size=4, stride=4)  # L = 9.
T, K, C = 9, 5, 1


def small_prior(**overrides):
  fields = dict(
    num_steps=T,
    num_parts=K,
    num_locations=GRID.num_locations,
    token_features=4,
    d_model=16,
    num_layers=2,
    num_heads=2,
    mlp_ratio=2,
    dropout=0.0,
  )
  return prior_lib.Prior(**{**fields, **overrides})


def init_params(model, seed=0):
  zeros = jnp.zeros((1, T, 12, 12, C))
  params = model.init(jax.random.key(seed), zeros, zeros[..., :1], jnp.arange(T))['params']
  # Random heads: a fresh init would make every step look alike.
  return jax.tree.map(
    lambda x: x + 0.3 * jax.random.normal(jax.random.key(seed + 1), x.shape), params
  )


def random_bank(seed=0):
  return jax.random.uniform(jax.random.key(seed), (K, 4, 4, C))


class CausalityTest(parameterized.TestCase):
  @parameterized.parameters(0, 4, 7)
  def test_later_tokens_do_not_change_earlier_outputs(self, t):
    model = small_prior()
    params = init_params(model)
    rng = np.random.default_rng(t)
    canvases = rng.uniform(size=(2, T, 12, 12, C)).astype(np.float32)
    maps = (rng.uniform(size=(2, T, 12, 12, 1)) < 0.5).astype(np.float32)
    changed_canvases, changed_maps = canvases.copy(), maps.copy()
    changed_canvases[:, t + 1 :] = rng.uniform(size=changed_canvases[:, t + 1 :].shape)
    changed_maps[:, t + 1 :] = 1 - changed_maps[:, t + 1 :]
    steps = jnp.arange(T)
    before = model.apply({'params': params}, canvases, maps, steps)
    after = model.apply({'params': params}, changed_canvases, changed_maps, steps)
    for name in ('pres', 'where', 'what'):
      np.testing.assert_allclose(after[name][:, : t + 1], before[name][:, : t + 1], atol=1e-6)
      if t + 1 < T:
        self.assertGreater(np.abs(after[name][:, t + 1 :] - before[name][:, t + 1 :]).max(), 1e-4)

  def test_output_shapes(self):
    model = small_prior()
    zeros = jnp.zeros((3, T, 12, 12, C))
    logits = model.apply({'params': init_params(model)}, zeros, zeros, jnp.arange(T))
    chex.assert_shape(logits['pres'], (3, T))
    chex.assert_shape(logits['where'], (3, T, GRID.num_locations))
    chex.assert_shape(logits['what'], (3, T, K))


class LogLikelihoodTest(absltest.TestCase):
  def test_two_step_case_by_hand(self):
    logits = {
      'pres': jnp.array([[1.5, -0.5]]),
      'where': jnp.array([[[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]]),
      'what': jnp.array([[[2.0, 0.0], [0.0, 5.0]]]),
    }
    # Step 1 drawn at location 2 with part 0; step 2 not drawn (its where/what
    # must not count, so they are set to unlikely values).
    pres = jnp.array([[True, False]])
    where, what = jnp.array([[2, 1]]), jnp.array([[0, 0]])
    got = losses.prior_step_log_prob(logits, pres, where, what)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    step1 = (
      math.log(sigmoid(1.5))
      + math.log(math.exp(2) / (1 + math.e + math.exp(2)))
      + math.log(math.exp(2) / (math.exp(2) + 1))
    )
    step2 = math.log(1 - sigmoid(-0.5))
    np.testing.assert_allclose(got, [[step1, step2]], rtol=1e-6)
    np.testing.assert_allclose(
      losses.prior_sequence_log_prob(logits, pres, where, what), [step1 + step2], rtol=1e-6
    )


class SamplerTest(parameterized.TestCase):
  def test_cached_logits_equal_the_teacher_forced_pass(self):
    model = small_prior()
    params, bank = init_params(model), random_bank()
    samples = sampling.make_sampler(model, GRID, batch_size=6)(params, bank, jax.random.key(3))
    chex.assert_shape(samples.canvases, (6, T, 12, 12, C))
    sequences = {'pres': samples.pres, 'where': samples.where, 'what': samples.what}
    full = train_prior.teacher_forced_logits(model, params, GRID, bank, sequences)
    for name in ('pres', 'where', 'what'):
      np.testing.assert_allclose(samples.logits[name], full[name], atol=2e-5, rtol=1e-5)
    # The returned canvases are the rendering of the sampled steps.
    rendered, _ = canvas.render_steps(GRID, bank, samples.pres, samples.where, samples.what)
    np.testing.assert_allclose(samples.canvases, rendered, atol=1e-6)
    self.assertTrue(samples.pres.any() and not samples.pres.all())

  def test_naive_sampler_draws_the_same_samples(self):
    model = small_prior()
    params, bank = init_params(model, seed=4), random_bank(4)
    key = jax.random.key(5)
    cached = sampling.make_sampler(model, GRID, 4)(params, bank, key, 0.8)
    naive = sampling.make_naive_sampler(model, GRID, 4)(params, bank, key, 0.8)
    for a, b in zip(cached[:4], naive[:4], strict=True):
      np.testing.assert_allclose(a, b, atol=1e-6)

  def test_top_1_picks_the_most_likely_location_and_part(self):
    model = small_prior()
    params, bank = init_params(model, seed=6), random_bank(6)
    samples = sampling.make_sampler(model, GRID, 4, top_k=1)(params, bank, jax.random.key(7))
    np.testing.assert_array_equal(samples.where, np.argmax(samples.logits['where'], -1))
    np.testing.assert_array_equal(samples.what, np.argmax(samples.logits['what'], -1))

  def test_low_temperature_follows_the_pres_logit(self):
    model = small_prior()
    params, bank = init_params(model, seed=8), random_bank(8)
    samples = sampling.make_sampler(model, GRID, 8)(params, bank, jax.random.key(9), 1e-4)
    np.testing.assert_array_equal(samples.pres, samples.logits['pres'] > 0)


if __name__ == '__main__':
  absltest.main()
