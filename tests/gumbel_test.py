"""Gumbel-softmax and (relaxed) Bernoulli samples against their exact distributions."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from scipy import special, stats

from npdraw_jax.model import gumbel

LOGITS = np.float32([0.5, -1.0, 2.0, 0.0, -0.3])

# Jitted: much faster here than op-by-op dispatch; one test below also runs them eagerly.
gumbel_softmax = jax.jit(gumbel.gumbel_softmax, static_argnames='straight_through')
bernoulli = jax.jit(gumbel.bernoulli)
relaxed_bernoulli = jax.jit(gumbel.relaxed_bernoulli, static_argnames='straight_through')


def chi2_bound(df: int) -> float:
  # The keys are fixed, so this only sets how unlucky a correct sampler may look.
  return stats.chi2.ppf(1 - 1e-5, df)


class GumbelSoftmaxTest(parameterized.TestCase):
  @parameterized.parameters((1.0, False), (0.3, False), (2.0, True))
  def test_argmax_frequencies_are_softmax(self, tau, straight_through):
    n = 100_000
    logits = jnp.broadcast_to(LOGITS, (n, LOGITS.size))
    y = gumbel_softmax(jax.random.key(0), logits, tau, straight_through)
    counts = np.bincount(np.asarray(jnp.argmax(y, -1)), minlength=LOGITS.size)
    expected = n * special.softmax(LOGITS.astype(np.float64))
    chi2 = np.sum((counts - expected) ** 2 / expected)
    self.assertLess(chi2, chi2_bound(LOGITS.size - 1), (counts, expected))

  def test_soft_sample_on_simplex(self):
    logits = np.random.default_rng(1).normal(scale=3.0, size=(4, 6, 9)).astype(np.float32)
    y = gumbel_softmax(jax.random.key(2), logits, 0.7)
    self.assertEqual(y.shape, logits.shape)
    self.assertEqual(y.dtype, jnp.float32)
    self.assertTrue(np.all(np.asarray(y) >= 0))
    np.testing.assert_allclose(jnp.sum(y, -1), 1.0, atol=1e-6)
    # Not already one-hot at this temperature.
    self.assertLess(float(jnp.min(jnp.max(y, -1))), 0.99)

  def test_same_key_same_sample(self):
    a = gumbel_softmax(jax.random.key(3), LOGITS, 1.0)
    np.testing.assert_array_equal(a, gumbel_softmax(jax.random.key(3), LOGITS, 1.0))
    self.assertFalse(np.allclose(a, gumbel_softmax(jax.random.key(4), LOGITS, 1.0)))

  def test_straight_through(self):
    key = jax.random.key(5)
    logits = np.random.default_rng(6).normal(size=(8, 7)).astype(np.float32)
    weights = np.random.default_rng(7).normal(size=(8, 7)).astype(np.float32)
    hard = gumbel.gumbel_softmax(key, logits, 0.5, straight_through=True)  # Eager.
    soft = gumbel_softmax(key, logits, 0.5)
    # Exactly one-hot, at the soft sample's argmax.
    np.testing.assert_array_equal(hard, jax.nn.one_hot(jnp.argmax(soft, -1), 7))
    # The gradient of any function of the sample is the soft sample's.
    linear = lambda st: (
      lambda lg: jnp.sum(weights * gumbel_softmax(key, lg, 0.5, straight_through=st))
    )
    g_hard, g_soft = jax.grad(linear(True))(logits), jax.grad(linear(False))(logits)
    self.assertGreater(float(jnp.max(jnp.abs(g_soft))), 1e-3)
    np.testing.assert_allclose(g_hard, g_soft, rtol=1e-6, atol=1e-7)
    # The helper alone: hard forward from any soft vector, identity Jacobian.
    probs = jnp.float32([[0.1, 0.6, 0.3], [0.45, 0.1, 0.45001]])
    np.testing.assert_array_equal(gumbel.straight_through_one_hot(probs), [[0, 1, 0], [0, 0, 1]])
    jac = jax.jacobian(lambda p: gumbel.straight_through_one_hot(p)[0])(probs)[:, 0]
    np.testing.assert_array_equal(jac, np.eye(3))

  def test_low_temperature_approaches_one_hot(self):
    key = jax.random.key(8)
    logits = jnp.broadcast_to(LOGITS, (2000, LOGITS.size))
    hard = gumbel_softmax(key, logits, 1.0, straight_through=True)
    gaps = []
    for tau in (1.0, 0.3, 0.1, 0.01, 0.001):
      soft = gumbel_softmax(key, logits, tau)
      gaps.append(float(jnp.mean(jnp.sum(jnp.abs(soft - hard), -1))))
    # With the noise fixed, the largest entry only grows as tau falls.
    self.assertEqual(gaps, sorted(gaps, reverse=True))
    self.assertLess(gaps[-1], 5e-3)
    self.assertGreater(gaps[0], 0.3)


class BernoulliTest(parameterized.TestCase):
  LOGIT = np.float32([-4.0, -1.0, 0.0, 0.7, 3.0])

  def frequency_check(self, ones, p):
    n = ones.shape[0]
    freq, se = ones.mean(0), np.sqrt(p * (1 - p) / n)
    self.assertTrue(np.all(np.abs(freq - p) < 5 * se), (freq, p))

  def test_hard_frequency_and_no_gradient(self):
    n = 200_000
    logit = jnp.broadcast_to(self.LOGIT, (n, self.LOGIT.size))
    x = np.asarray(bernoulli(jax.random.key(9), logit))
    self.assertEqual(x.shape, logit.shape)
    self.assertEqual(x.dtype, np.float32)
    self.assertTrue(np.all((x == 0) | (x == 1)))
    self.frequency_check(x, special.expit(self.LOGIT.astype(np.float64)))
    grad = jax.grad(lambda lg: jnp.sum(bernoulli(jax.random.key(9), lg)))(self.LOGIT)
    np.testing.assert_array_equal(grad, 0.0)

  @parameterized.parameters(0.5, 1.0, 2.0)
  def test_relaxed_exceeds_half_with_probability_sigmoid(self, tau):
    n = 200_000
    logit = jnp.broadcast_to(self.LOGIT, (n, self.LOGIT.size))
    y = np.asarray(relaxed_bernoulli(jax.random.key(10), logit, tau))
    self.assertEqual(y.shape, logit.shape)
    self.frequency_check(y > 0.5, special.expit(self.LOGIT.astype(np.float64)))
    if tau >= 1.0:  # Below that, float32 may round the far tails to exactly 0 or 1.
      self.assertTrue(np.all((y > 0) & (y < 1)))

  @parameterized.parameters(0.5, 2.0)
  def test_relaxed_cdf(self, tau):
    # Y = sigmoid((l + L) / tau) <= y  <=>  L <= tau logit(y) - l,
    # so P(Y <= y) = sigmoid(tau logit(y) - l): this one depends on tau.
    n, logit = 200_000, 0.7
    y = np.asarray(relaxed_bernoulli(jax.random.key(11), jnp.full((n,), logit), tau))
    for level in (0.05, 0.3, 0.7, 0.95):
      p = special.expit(tau * special.logit(level) - logit)
      self.assertLess(abs(np.mean(y <= level) - p), 5 * np.sqrt(p * (1 - p) / n), level)

  def test_relaxed_straight_through_and_hard_agree(self):
    key = jax.random.key(12)
    logit = np.random.default_rng(13).normal(scale=2.0, size=1000).astype(np.float32)
    hard = bernoulli(key, logit)
    st = gumbel.relaxed_bernoulli(key, logit, 0.5, straight_through=True)  # Eager.
    soft = relaxed_bernoulli(key, logit, 0.5)
    # The same key decides the same value in all three.
    np.testing.assert_array_equal(st, hard)
    np.testing.assert_array_equal(soft > 0.5, hard == 1)
    weights = np.random.default_rng(14).normal(size=1000).astype(np.float32)
    grads = [
      jax.grad(lambda lg, s=s: jnp.sum(weights * relaxed_bernoulli(key, lg, 0.5, s)))(logit)
      for s in (True, False)
    ]
    self.assertGreater(float(jnp.max(jnp.abs(grads[1]))), 1e-3)
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6, atol=1e-7)


if __name__ == '__main__':
  absltest.main()
