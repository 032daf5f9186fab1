"""The Dropout layer against flax's nn.Dropout in both kernel forms (the masks themselves:
platform_kernels_test.py)."""

import functools
from collections.abc import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from npdraw_jax.model.nets import dropout

KERNEL_FORMS = ('cpu', 'plain')


class Stack(nn.Module):
  """Three auto-named dropout layers of either class around a Dense layer."""

  layer: Callable

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

  @parameterized.product(key_impl=('threefry2x32', 'rbg'), kernels=KERNEL_FORMS)
  def test_same_masks_and_gradients_as_flax(self, key_impl, kernels):
    layer = functools.partial(dropout.Dropout, kernels=kernels)
    got = self.outputs_and_gradients(layer, key_impl)
    want = self.outputs_and_gradients(nn.Dropout, key_impl)
    chex.assert_trees_all_equal(got, want)

  @parameterized.parameters(*KERNEL_FORMS)
  def test_original_threefry_counters_give_flaxs_masks(self, kernels):
    with jax.threefry_partitionable(False):
      got = self.outputs_and_gradients(functools.partial(dropout.Dropout, kernels=kernels))
      want = self.outputs_and_gradients(nn.Dropout)
    chex.assert_trees_all_equal(got, want)

  @parameterized.parameters(*KERNEL_FORMS)
  def test_keeps_each_value_with_its_probability_and_rescales(self, kernels):
    x = jnp.ones((200_000,))
    rngs = {'dropout': jax.random.key(3)}
    y = dropout.Dropout(0.1, kernels=kernels).apply({}, x, deterministic=False, rngs=rngs)
    kept = np.asarray(y) != 0
    # Binomial standard error of the kept fraction: sqrt(0.9 * 0.1 / n) = 0.00067.
    self.assertAlmostEqual(kept.mean(), 0.9, delta=5 * 0.00067)
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.9, rtol=1e-6)

  def test_deterministic_is_the_identity(self):
    x = jax.random.normal(jax.random.key(0), (4, 5))
    np.testing.assert_array_equal(dropout.Dropout(0.3).apply({}, x, deterministic=True), x)


if __name__ == '__main__':
  absltest.main()
