"""Transposed convolution by phases, 1x1 convolutions and folded pairs of them against
flax's, and bfloat16 compute against float32."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from configs import tiny
from npdraw_jax import npdraw, sharding, train_vae
from npdraw_jax.models import layers


class ConvTransposeTest(parameterized.TestCase):
  @parameterized.parameters(
    (4, 2, False),
    (3, 2, False),
    (5, 2, False),
    (2, 2, False),
    (4, 3, False),
    (3, 1, False),
    (2, 2, True),
    (3, 3, True),  # kernel == stride: every phase is 1x1, one matmul.
    (1, 1, False),
  )
  def test_values_and_gradients_equal_flax(self, kernel, stride, use_bias):
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    flax_layer = nn.ConvTranspose(4, (kernel, kernel), strides=(stride, stride), use_bias=use_bias)
    ours = layers.ConvTranspose(4, kernel, stride, use_bias)
    params = ours.init(jax.random.key(1), x)
    # Same parameter tree and initial values, so checkpoints carry over.
    chex.assert_trees_all_equal(params, flax_layer.init(jax.random.key(1), x))
    projection = jax.random.normal(jax.random.key(2), (2, 5 * stride, 6 * stride, 4))

    def objective(layer):
      return lambda p, x: jnp.sum(layer.apply(p, x) * projection)

    want = jax.value_and_grad(objective(flax_layer), argnums=(0, 1))(params, x)
    got = jax.jit(jax.value_and_grad(objective(ours), argnums=(0, 1)))(params, x)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)

  @parameterized.parameters(2, 3)
  def test_phase_convolutions_equal_lax_when_kernel_equals_stride(self, stride):
    # The model takes one matmul for these; the per-phase path is the benchmarks' baseline.
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    kernel = jax.random.normal(jax.random.key(1), (stride, stride, 3, 4))
    want = jax.lax.conv_transpose(
      x, kernel, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    got = layers._phase_convolutions(x, kernel, stride)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def test_kernel_smaller_than_stride(self):
    with self.assertRaisesRegex(ValueError, 'empty'):
      layers.conv_transpose(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 1, 1, 1)), 2)


class PointwiseConvTest(parameterized.TestCase):
  @parameterized.parameters(
    (1, 'SAME', 4),
    (1, 'VALID', 6),
    (1, 0, 3),
    (3, 1, 4),  # Not 1x1: lax's own convolution.
  )
  def test_values_and_gradients_equal_lax(self, kernel, padding, batch):
    x = jax.random.normal(jax.random.key(0), (batch, 5, 6, 3))
    make = functools.partial(nn.Conv, 4, (kernel, kernel), padding=padding)
    ours, plain = make(conv_general_dilated=layers.conv_general_dilated), make()
    params = plain.init(jax.random.key(1), x)
    projection = jax.random.normal(jax.random.key(2), plain.apply(params, x).shape)

    def objective(layer):
      return lambda p, x: jnp.sum(layer.apply(p, x) * projection)

    want = jax.value_and_grad(objective(plain), argnums=(0, 1))(params, x)
    got = jax.jit(jax.value_and_grad(objective(ours), argnums=(0, 1)))(params, x)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


class PointwisePairTest(parameterized.TestCase):
  @parameterized.parameters(True, False)
  def test_parameters_values_and_gradients_equal_two_flax_convs(self, second_bias):
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))

    class TwoConvs(nn.Module):
      @nn.compact
      def __call__(self, x):
        hidden = nn.Conv(7, (1, 1))
        return nn.Conv(4, (1, 1), use_bias=second_bias)(hidden(x))

    class Folded(nn.Module):
      @nn.compact
      def __call__(self, x):
        first = layers.PointwiseParams(3, 7, name='Conv_0')()
        second = layers.PointwiseParams(7, 4, second_bias, name='Conv_1')()
        return layers.pointwise_pair(x, first, second, jnp.float32)

    params = TwoConvs().init(jax.random.key(1), x)
    # Same tree and initial values as the two layers make, so checkpoints carry over.
    chex.assert_trees_all_equal(Folded().init(jax.random.key(1), x), params)
    # Non-zero biases, so that b0 W1 + b1 is exercised.
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(3), p.shape), params)
    projection = jax.random.normal(jax.random.key(2), (2, 5, 6, 4))

    def objective(layer):
      return lambda p, x: jnp.sum(layer.apply(p, x) * projection)

    want = jax.value_and_grad(objective(TwoConvs()), argnums=(0, 1))(params, x)
    got = jax.jit(jax.value_and_grad(objective(Folded()), argnums=(0, 1)))(params, x)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def relative_error(got, want):
  return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


class ComputeDtypeTest(absltest.TestCase):
  def models(self):
    config = tiny.get_config()
    models = {}
    for name in ('float32', 'bfloat16'):
      config.model.compute_dtype = name
      models[name] = npdraw.make_model(config)
    return config, models

  def test_bfloat16_outputs_are_close_to_float32(self):
    _, models = self.models()
    variables = jax.jit(lambda k: npdraw.init_variables(models['float32'], k))(jax.random.key(0))
    images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 1))
    canvases = jax.random.uniform(jax.random.key(2), (4, 16, 16, 1))
    history = jax.random.uniform(jax.random.key(3), (2, 16, 16, 16, 1))

    @functools.partial(jax.jit, static_argnums=0)
    def apply_all(model):
      q, _ = npdraw.encode(model, variables, images, train=True)
      out, _ = npdraw.decode(model, variables, canvases, train=True)
      p = model.prior.apply(
        {'params': variables['params']['prior']}, history, history, jnp.arange(16)
      )
      return {'q': q, 'decoder': out, 'prior': p}

    outputs = {name: apply_all(model) for name, model in models.items()}
    # Outputs come back in float32 whatever the compute dtype.
    for leaf in jax.tree.leaves(outputs['bfloat16']):
      self.assertEqual(leaf.dtype, jnp.float32)
    errors = jax.tree.map(relative_error, outputs['bfloat16'], outputs['float32'])
    # bfloat16 keeps 8 significant bits (2^-8 = 0.4%); a few layers compound it.
    for path, error in jax.tree_util.tree_leaves_with_path(errors):
      self.assertLess(error, 0.05, jax.tree_util.keystr(path))
      self.assertGreater(error, 0.0, 'the bfloat16 model did not compute in bfloat16')

  def test_bfloat16_train_step_keeps_float32_params_and_tracks_float32(self):
    config, models = self.models()
    rng = np.random.default_rng(0)
    batch = {
      'image': (rng.random((8, 16, 16, 1)) < 0.3).astype(np.float32),
      'pres': rng.random((8, 16)) < 0.8,
      'where': rng.integers(0, 16, (8, 16), dtype=np.int32),
      'what': rng.integers(0, 16, (8, 16), dtype=np.int32),
    }
    bank = rng.random((16, 4, 4, 1), dtype=np.float32)
    mesh = sharding.make_mesh()
    metrics = {}
    for name, model in models.items():
      prior = jax.jit(lambda k, m=model: npdraw.init_variables(m, k))(jax.random.key(0))
      state = jax.jit(train_vae.make_init_fn(config, model, prior['params']['prior']))()
      step = train_vae.make_train_step(model, config, mesh, steps_per_epoch=100)
      state, metrics[name] = step(state, bank, batch)
      for leaf in jax.tree.leaves(state.params):
        self.assertEqual(leaf.dtype, jnp.float32)
    for key in ('loss', 'recon', 'kl', 'sup'):
      self.assertTrue(np.isfinite(float(metrics['bfloat16'][key])), key)
      np.testing.assert_allclose(metrics['bfloat16'][key], metrics['float32'][key], rtol=0.05)

  def test_unknown_dtype(self):
    with self.assertRaisesRegex(ValueError, 'compute_dtype'):
      layers.compute_dtype('float16')


if __name__ == '__main__':
  absltest.main()
