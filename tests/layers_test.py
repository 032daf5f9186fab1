"""The ConvTranspose layer against flax's in both kernel forms (the kernels themselves:
platform_kernels_test.py), PyTorch's batch norm, and bfloat16 compute against float32."""

import functools
import itertools

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from configs import tiny
from npdraw_jax import errors
from npdraw_jax.infra import sharding
from npdraw_jax.model import npdraw
from npdraw_jax.model.nets import decoder as decoder_lib
from npdraw_jax.model.nets import encoder as encoder_lib
from npdraw_jax.model.nets import layers
from npdraw_jax.stages import train_vae


class ConvTransposeTest(parameterized.TestCase):
  @parameterized.product(
    (
      dict(kernel=4, stride=2, use_bias=False),
      dict(kernel=3, stride=2, use_bias=False),
      dict(kernel=2, stride=2, use_bias=True),
      dict(kernel=3, stride=3, use_bias=True),  # kernel == stride: every phase is 1x1.
    ),
    kernels=('cpu', 'plain'),
  )
  def test_values_and_gradients_equal_flax(self, kernel, stride, use_bias, kernels):
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    flax_layer = nn.ConvTranspose(4, (kernel, kernel), strides=(stride, stride), use_bias=use_bias)
    ours = layers.ConvTranspose(4, kernel, stride, use_bias, kernels=kernels)
    params = ours.init(jax.random.key(1), x)
    # Same parameter tree and initial values, so checkpoints carry over.
    chex.assert_trees_all_equal(params, flax_layer.init(jax.random.key(1), x))
    projection = jax.random.normal(jax.random.key(2), (2, 5 * stride, 6 * stride, 4))

    def objective(layer):
      return lambda p, x: jnp.sum(layer.apply(p, x) * projection)

    want = jax.value_and_grad(objective(flax_layer), argnums=(0, 1))(params, x)
    got = jax.jit(jax.value_and_grad(objective(ours), argnums=(0, 1)))(params, x)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def numpy_batch_norm_2d(x, scale, bias, running_mean, running_var, train, variance):
  """PyTorch's BatchNorm2d (momentum 0.1, eps 1e-5) on NHWC x, in float64.

  Returns (output, new running mean, new running variance). Training normalises
  with the batch's biased variance and moves the running variance a tenth of
  the way to the unbiased one (n / (n - 1), n = B * H * W) or, for 'biased',
  to the biased one.
  """
  x = x.astype(np.float64)
  if not train:
    out = (x - running_mean) / np.sqrt(running_var + 1e-5) * scale + bias
    return out, running_mean, running_var
  n = x.shape[0] * x.shape[1] * x.shape[2]
  mean, biased = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  stored = biased * n / (n - 1) if variance == 'unbiased' else biased
  out = (x - mean) / np.sqrt(biased + 1e-5) * scale + bias
  return out, 0.9 * running_mean + 0.1 * mean, 0.9 * running_var + 0.1 * stored


class TorchBatchNormTest(parameterized.TestCase):
  def variables(self, channels, seed=1):
    rng = np.random.default_rng(seed)
    uniform = lambda low, high: rng.uniform(low, high, channels).astype(np.float32)
    return {
      'params': {'scale': uniform(0.5, 2.0), 'bias': uniform(-1.0, 1.0)},
      'batch_stats': {'mean': uniform(-1.0, 1.0), 'var': uniform(0.5, 2.0)},
    }

  def inputs(self, shape=(4, 3, 5, 6)):
    rng = np.random.default_rng(0)
    # Channels of different means and spreads.
    return (rng.normal(size=shape) * np.arange(1, 7) + np.arange(6) - 2).astype(np.float32)

  @parameterized.parameters(('unbiased', True), ('unbiased', False), ('biased', True))
  def test_matches_pytorch_batch_norm_2d(self, variance, train):
    x, variables = self.inputs(), self.variables(6)
    layer = layers.TorchBatchNorm(not train, variance)
    got, updates = layer.apply(variables, x, mutable=['batch_stats'])
    reference = functools.partial(
      numpy_batch_norm_2d,
      x,
      variables['params']['scale'],
      variables['params']['bias'],
      variables['batch_stats']['mean'],
      variables['batch_stats']['var'],
    )
    want, want_mean, want_var = reference(train, variance)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    stats = updates['batch_stats']
    np.testing.assert_allclose(stats['mean'], want_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats['var'], want_var, rtol=1e-6)
    if train and variance == 'unbiased':  # The two estimates differ by 0.1 var / (n - 1).
      _, _, biased_var = reference(True, 'biased')
      self.assertTrue(np.all(np.abs(stats['var'] - biased_var) > 1e-3))

  @parameterized.parameters(itertools.product((True, False), ('float32', 'bfloat16')))
  def test_biased_is_flax_batch_norm(self, train, dtype):
    x = self.inputs()
    ours = layers.TorchBatchNorm(not train, 'biased', dtype=jnp.dtype(dtype))
    flax_layer = nn.BatchNorm(not train, momentum=0.9, epsilon=1e-5, dtype=jnp.dtype(dtype))
    # Same variables and initial values: checkpoints carry over.
    init = ours.init(jax.random.key(0), x)
    chex.assert_trees_all_equal(init, flax_layer.init(jax.random.key(0), x))
    variables = self.variables(6)
    got = ours.apply(variables, x, mutable=['batch_stats'])
    want = flax_layer.apply(variables, x, mutable=['batch_stats'])
    self.assertEqual(got[0].dtype, jnp.dtype(dtype))
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)

  def test_statistics_of_the_global_batch_under_jit(self):
    x, variables = self.inputs((8, 3, 5, 6)), self.variables(6)
    layer = layers.TorchBatchNorm(False, 'unbiased')
    step = jax.jit(lambda v, x: layer.apply(v, x, mutable=['batch_stats']))
    want = step(variables, x)
    mesh = sharding.make_mesh()
    # Split over all devices of the run (XLA_FLAGS=--xla_force_host_platform_device_count=8).
    got = step(sharding.replicate(variables, mesh), jax.device_put(x, sharding.batch_sharded(mesh)))
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)

  def test_init_leaves_running_averages(self):
    x = self.inputs()
    stats = layers.TorchBatchNorm(False).init(jax.random.key(0), x)['batch_stats']
    np.testing.assert_array_equal(stats['mean'], np.zeros(6))
    np.testing.assert_array_equal(stats['var'], np.ones(6))

  def test_one_value_per_channel(self):
    variables = self.variables(6)
    with self.assertRaisesRegex(ValueError, 'more than 1 value'):
      layers.TorchBatchNorm(False).apply(variables, jnp.ones((1, 1, 1, 6)), mutable=True)

  def test_unknown_variance(self):
    with self.assertRaisesRegex(errors.ConfigError, 'batch_norm_variance'):
      layers.check_batch_norm_variance('population')
    with self.assertRaisesRegex(errors.ConfigError, 'batch_norm_variance'):
      layers.TorchBatchNorm(True, 'population').init(jax.random.key(0), jnp.ones((2, 6)))

  @parameterized.parameters('encoder_mlp', 'encoder_fcn', 'decoder')
  def test_authors_networks_take_the_variance(self, network):
    def make(variance):
      if network == 'decoder':
        return decoder_lib.AuthorsDecoder(8, 6, upsample=2, batch_norm_variance=variance)
      head = network.split('_')[1]
      return encoder_lib.AuthorsEncoder(4, 4, 3, 8, head, batch_norm_variance=variance)

    x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
    unbiased, biased = make('unbiased'), make('biased')
    variables = unbiased.init(jax.random.key(1), x, train=False)
    # Same variables whichever the variance: checkpoints load either way.
    chex.assert_trees_all_equal_shapes(variables, biased.init(jax.random.key(1), x, train=False))
    names = {path[-2:] for path in flax.traverse_util.flatten_dict(variables['batch_stats'])}
    self.assertEqual({name for _, name in names}, {'mean', 'var'})
    self.assertEqual({module for module, _ in names}, {'BatchNorm_0'})
    out = {}
    for name, model in (('unbiased', unbiased), ('biased', biased)):
      out[name] = model.apply(variables, x, train=True, mutable=['batch_stats'])
    chex.assert_trees_all_close(out['unbiased'][0], out['biased'][0])
    stats = {name: flax.traverse_util.flatten_dict(o[1]['batch_stats']) for name, o in out.items()}
    for path, value in stats['unbiased'].items():
      if path[-1] == 'mean':
        np.testing.assert_array_equal(value, stats['biased'][path])
      else:  # Every batch norm moved further: n / (n - 1) > 1.
        self.assertTrue(np.all(value > stats['biased'][path]), path)


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
