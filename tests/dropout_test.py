"""dropout.py against published threefry answers, jax.random.bits and flax's nn.Dropout."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from npdraw_jax.models import dropout


class Threefry2x32Test(parameterized.TestCase):
  # Known answers of threefry-2x32 with 20 rounds, from the Random123 suite's
  # kat_vectors (Salmon et al. 2011): key, counter, output.
  @parameterized.parameters(
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
  )
  def test_known_answers(self, key, counter, want):
    as_words = lambda pair: tuple(jnp.asarray([word], jnp.uint32) for word in pair)
    got = jax.jit(dropout.threefry2x32)(as_words(key), as_words(counter))
    self.assertEqual([int(word[0]) for word in got], list(want))


class RandomBitsTest(parameterized.TestCase):
  @parameterized.parameters(((1,), 0), ((7, 3), 1), ((4, 37, 2048), 2), ((2, 3, 5, 7), 3))
  def test_equal_to_jax_random_bits(self, shape, seed):
    key = jax.random.fold_in(jax.random.key(seed), 11)
    got = jax.jit(dropout.random_bits, static_argnums=1)(key, shape)
    np.testing.assert_array_equal(got, jax.random.bits(key, shape))

  def test_uniform_equal_to_jax_random_uniform(self):
    key = jax.random.key(5)
    got = jax.jit(dropout.uniform, static_argnums=1)(key, (64, 33))
    np.testing.assert_array_equal(got, jax.random.uniform(key, (64, 33)))

  def test_other_key_implementations_are_refused(self):
    key = jax.random.key(0, impl='rbg')
    self.assertFalse(dropout.fused_bits_supported(key, (3,)))
    with self.assertRaisesRegex(ValueError, 'threefry'):
      dropout.random_bits(key, (3,))


class Stack(nn.Module):
  """Three auto-named dropout layers of either class around a Dense layer."""

  layer: type

  @nn.compact
  def __call__(self, x, train):
    x = self.layer(0.1)(x, deterministic=not train)
    x = nn.Dense(x.shape[-1])(x)
    x = self.layer(0.5, deterministic=not train)(x)
    return self.layer(0.25)(x * 2.0, deterministic=not train)


class DropoutTest(parameterized.TestCase):
  def outputs_and_gradients(self, layer, key_impl='threefry2x32', train=True):
    x = jax.random.normal(jax.random.key(0), (8, 37, 64))
    params = Stack(nn.Dropout).init(jax.random.key(1), x, train=False)
    rngs = {'dropout': jax.random.key(2, impl=key_impl)}

    def loss(x):
      y = Stack(layer).apply(params, x, train, rngs=rngs)
      return jnp.sum(y * jnp.cos(y)), y

    return jax.jit(jax.grad(loss, has_aux=True))(x)

  @parameterized.parameters('threefry2x32', 'rbg')
  def test_same_masks_and_gradients_as_flax(self, key_impl):
    got = self.outputs_and_gradients(dropout.Dropout, key_impl)
    want = self.outputs_and_gradients(nn.Dropout, key_impl)
    chex.assert_trees_all_equal(got, want)

  def test_original_threefry_counters_fall_back_to_flax(self):
    with jax.threefry_partitionable(False):
      self.assertFalse(dropout.fused_bits_supported(jax.random.key(0), (3,)))
      got = self.outputs_and_gradients(dropout.Dropout)
      want = self.outputs_and_gradients(nn.Dropout)
    chex.assert_trees_all_equal(got, want)

  def test_keeps_each_value_with_its_probability_and_rescales(self):
    x = jnp.ones((200_000,))
    rngs = {'dropout': jax.random.key(3)}
    y = dropout.Dropout(0.1).apply({}, x, deterministic=False, rngs=rngs)
    kept = np.asarray(y) != 0
    # Binomial standard error of the kept fraction: sqrt(0.9 * 0.1 / n) = 0.00067.
    self.assertAlmostEqual(kept.mean(), 0.9, delta=5 * 0.00067)
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.9, rtol=1e-6)

  def test_deterministic_is_the_identity(self):
    x = jax.random.normal(jax.random.key(0), (4, 5))
    np.testing.assert_array_equal(dropout.Dropout(0.3).apply({}, x, deterministic=True), x)


if __name__ == '__main__':
  absltest.main()
