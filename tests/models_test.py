"""The authors' encoder and decoder (docs/model.md, section 11) against hand counts and NumPy."""

import math
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from configs import celeba, cifar10, mnist, tiny
from npdraw_jax.model import npdraw
from npdraw_jax.model.nets import decoder as decoder_lib
from npdraw_jax.model.nets import encoder as encoder_lib
from npdraw_jax.model.nets import layers

REFERENCE_CONFIGS = {'mnist': mnist, 'celeba': celeba, 'cifar10': cifar10}
# Output channels of each reference likelihood: one Bernoulli logit; a mean and
# a log-scale per RGB channel; 10 mixture weights + 10 x (mean, log-scale,
# coupling) per RGB channel.
OUTPUT_CHANNELS = {'mnist': 1, 'celeba': 6, 'cifar10': 10 + 10 * 3 * 3}


# --- Parameter counts from the spec's layer lists, by hand --------------------


def conv(kernel, cin, cout, bias=True):
  return kernel * kernel * cin * cout + (cout if bias else 0)


def bn(channels):
  return 2 * channels  # Scale and shift.


def dense(fan_in, fan_out):
  return fan_in * fan_out + fan_out


def a_res(f):
  return conv(3, f, f, bias=False) + bn(f) + conv(1, f, f, bias=False) + bn(f)


def expected_encoder_params(config):
  m, c = config.model, config.data.channels
  f, steps, parts = m.encoder_features, m.T, m.K
  locations = math.ceil(config.data.canvas_size / m.location_stride) ** 2
  if m.encoder_head == 'mlp':
    side = config.data.image_size
    for _ in range(4):  # 3x3, stride 2, padding 1.
      side = (side + 2 - 3) // 2 + 1
    body = conv(3, c, f) + bn(f) + 3 * (conv(3, f, f) + bn(f)) + dense(side * side * f, f)
    what = dense(f, f) + dense(f, steps * parts)
    where = dense(f, f) + dense(f, steps * locations)
    return body + what + where + dense(f, steps)
  body = conv(3, c, f) + bn(f) + 2 * (conv(4, f, f, bias=False) + bn(f)) + 2 * a_res(f)
  body += conv(1, f, f)
  grid_head = conv(1, f, f) + bn(f)
  return body + grid_head + conv(1, f, parts) + conv(1, f, locations) + conv(1, f, 1)


def expected_decoder_params(config, out_channels):
  m, c = config.model, config.data.channels
  f = m.decoder_features
  down = conv(4, c, f, bias=False) + bn(f) + conv(4, f, f, bias=False) + bn(f)
  up = 2 * (conv(4, f, f, bias=False) + bn(f))
  if config.data.image_size == 2 * config.data.canvas_size:
    up += conv(2, f, f) + bn(f) + conv(1, f, f)
  head = conv(1, f, out_channels, bias=m.likelihood != 'mixture_logistic')
  return down + 2 * a_res(f) + up + head


def make_networks(config):
  """Encoder and decoder (not the prior) of a config, as model.encoder and model.decoder."""
  locations = math.ceil(config.data.canvas_size / config.model.location_stride) ** 2
  encoder, decoder = npdraw.make_networks(config, locations)
  return types.SimpleNamespace(encoder=encoder, decoder=decoder)


def count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def init_shapes(module, input_shape):
  """(output, variables) of module.init_with_output, as shapes only."""
  return jax.eval_shape(
    lambda: module.init_with_output(jax.random.key(0), jnp.zeros(input_shape), train=False)
  )


class ReferenceNetworksTest(parameterized.TestCase):
  @parameterized.parameters('mnist', 'celeba', 'cifar10')
  def test_parameter_counts_and_shapes(self, name):
    config = REFERENCE_CONFIGS[name].get_config()
    self.assertEqual(config.model.networks, 'authors')
    model = make_networks(config)
    self.assertIsInstance(model.encoder, encoder_lib.AuthorsEncoder)
    self.assertIsInstance(model.decoder, decoder_lib.AuthorsDecoder)
    m, data = config.model, config.data
    image = (2, data.image_size, data.image_size, data.channels)
    canvas = (2, data.canvas_size, data.canvas_size, data.channels)
    locations = math.ceil(data.canvas_size / m.location_stride) ** 2

    q, encoder_vars = init_shapes(model.encoder, image)
    self.assertEqual(count(encoder_vars['params']), expected_encoder_params(config))
    chex.assert_shape(
      [q['pres'], q['where'], q['what']], [(2, m.T), (2, m.T, locations), (2, m.T, m.K)]
    )
    for logits in q.values():
      self.assertEqual(logits.dtype, jnp.float32)

    out, decoder_vars = init_shapes(model.decoder, canvas)
    expected = expected_decoder_params(config, OUTPUT_CHANNELS[name])
    self.assertEqual(count(decoder_vars['params']), expected)
    chex.assert_shape(out, image[:3] + (OUTPUT_CHANNELS[name],))
    self.assertEqual(out.dtype, jnp.float32)

  @parameterized.parameters(
    # The spec's size check: about 2.07 M (MNIST) and 2.13 M (CelebA) in all.
    ('mnist', 947_772, 1_118_337, 2.07e6),
    ('celeba', 924_809, 1_205_510, 2.13e6),
  )
  def test_sizes_quoted_by_the_spec(self, name, encoder_size, decoder_size, total):
    config = REFERENCE_CONFIGS[name].get_config()
    model = make_networks(config)
    data = config.data
    _, encoder_vars = init_shapes(
      model.encoder, (1, data.image_size, data.image_size, data.channels)
    )
    _, decoder_vars = init_shapes(
      model.decoder, (1, data.canvas_size, data.canvas_size, data.channels)
    )
    self.assertEqual(count(encoder_vars['params']), encoder_size)
    self.assertEqual(count(decoder_vars['params']), decoder_size)
    self.assertAlmostEqual((encoder_size + decoder_size) / total, 1.0, delta=0.005)

  @parameterized.parameters(None, 'celeba')
  def test_tiny_configs_run_forward(self, arg):
    config = tiny.get_config(arg)
    config.model.networks = 'authors'
    model = npdraw.make_model(config)
    data, m = config.data, config.model
    images = jax.random.uniform(
      jax.random.key(1), (4, data.image_size, data.image_size, data.channels)
    )
    canvases = jax.random.uniform(
      jax.random.key(2), (4, data.canvas_size, data.canvas_size, data.channels)
    )

    @jax.jit
    def forward(key):
      k_enc, k_dec = jax.random.split(key)
      enc = model.encoder.init(k_enc, images, train=False)
      dec = model.decoder.init(k_dec, canvases, train=False)
      q, enc_stats = model.encoder.apply(enc, images, train=True, mutable=['batch_stats'])
      out, dec_stats = model.decoder.apply(dec, canvases, train=True, mutable=['batch_stats'])
      return q, out, (enc['batch_stats'], enc_stats), (dec['batch_stats'], dec_stats)

    q, out, enc_stats, dec_stats = forward(jax.random.key(0))
    chex.assert_shape(q['what'], (4, m.T, m.K))
    chex.assert_shape(out, (4, data.image_size, data.image_size, None))
    chex.assert_tree_all_finite((q, out))
    # Training mode moved the running statistics.
    for before, after in (enc_stats, dec_stats):
      self.assertFalse(
        all(jax.tree.leaves(jax.tree.map(np.array_equal, before, after['batch_stats'])))
      )

  def test_ours_still_builds(self):
    config = tiny.get_config()
    config.model.networks = 'ours'
    model = make_networks(config)
    self.assertIsInstance(model.encoder, encoder_lib.Encoder)
    self.assertIsInstance(model.decoder, decoder_lib.Decoder)
    q, _ = init_shapes(model.encoder, (2, 16, 16, 1))
    out, _ = init_shapes(model.decoder, (2, 16, 16, 1))
    chex.assert_shape([q['what'], out], [(2, 16, 16), (2, 16, 16, 1)])

  def test_unknown_networks(self):
    config = tiny.get_config()
    config.model.networks = 'theirs'
    with self.assertRaisesRegex(ValueError, r"model.networks.*'authors', 'ours'.*'theirs'"):
      make_networks(config)

  def test_mixture_head_has_no_bias(self):
    model = make_networks(cifar10.get_config())
    _, variables = init_shapes(model.decoder, (1, 32, 32, 3))
    last = max(k for k in variables['params'] if k.startswith('Conv_'))
    self.assertEqual(set(variables['params'][last]), {'kernel'})


# --- Blocks against NumPy ---------------------------------------------------------


def numpy_conv(x, w, stride, padding):
  """PyTorch's Conv2d (cross-correlation) without bias: x [B, H, W, I], w [k, k, I, O]."""
  k = w.shape[0]
  xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out_h = (xp.shape[1] - k) // stride + 1
  out_w = (xp.shape[2] - k) // stride + 1
  out = 0.0
  for u in range(k):
    for v in range(k):
      window = xp[:, u : u + stride * out_h : stride, v : v + stride * out_w : stride]
      out = out + np.einsum('bhwi,io->bhwo', window, w[u, v])
  return out


def numpy_conv_transpose(x, w, stride, padding):
  """PyTorch's ConvTranspose2d without bias: input i feeds output s * i - p + u via tap u."""
  k = w.shape[0]
  batch, h, wid, _ = x.shape
  full = np.zeros((batch, stride * (h - 1) + k, stride * (wid - 1) + k, w.shape[-1]))
  for i in range(h):
    for j in range(wid):
      full[:, stride * i : stride * i + k, stride * j : stride * j + k] += np.einsum(
        'bi,uvio->buvo', x[:, i, j], w
      )
  out_h, out_w = stride * (h - 1) + k - 2 * padding, stride * (wid - 1) + k - 2 * padding
  return full[:, padding : padding + out_h, padding : padding + out_w]


def numpy_batch_norm(x, scale, shift, mean, var):
  return (x - mean) / np.sqrt(var + 1e-5) * scale + shift


def random_like(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), tree)


class BlocksTest(parameterized.TestCase):
  def test_a_res_block(self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 6, 4)).astype(np.float32)
    block = layers.AuthorsResBlock()
    variables = jax.eval_shape(lambda: block.init(jax.random.key(0), x, train=False))
    params = random_like(variables['params'], 1)
    stats = jax.tree.map(
      lambda a: rng.uniform(0.5, 2.0, a.shape).astype(np.float32), variables['batch_stats']
    )
    # Exactly two bias-free convolutions, a 3x3 then a 1x1, each with a batch norm.
    first, second = params['TorchConvBN_0'], params['TorchConvBN_1']
    self.assertEqual(set(first['Conv_0']), {'kernel'})
    self.assertEqual(first['Conv_0']['kernel'].shape, (3, 3, 4, 4))
    self.assertEqual(second['Conv_0']['kernel'].shape, (1, 1, 4, 4))

    def reference(batch_norm):
      x_relu = np.maximum(x, 0)
      y = numpy_conv(x_relu, first['Conv_0']['kernel'], 1, 1)
      y = np.maximum(batch_norm(y, first['BatchNorm_0'], 'TorchConvBN_0'), 0)
      y = numpy_conv(y, second['Conv_0']['kernel'], 1, 0)
      return x_relu + batch_norm(y, second['BatchNorm_0'], 'TorchConvBN_1')

    def running(y, bn_params, name):
      s = stats[name]['BatchNorm_0']
      return numpy_batch_norm(y, bn_params['scale'], bn_params['bias'], s['mean'], s['var'])

    batch_means = {}

    def batch(y, bn_params, name):
      mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
      batch_means[name] = mean
      return numpy_batch_norm(y, bn_params['scale'], bn_params['bias'], mean, var)

    variables = {'params': params, 'batch_stats': stats}
    got = block.apply(variables, x, train=False)
    np.testing.assert_allclose(got, reference(running), rtol=1e-4, atol=1e-4)

    got, updates = block.apply(variables, x, train=True, mutable=['batch_stats'])
    np.testing.assert_allclose(got, reference(batch), rtol=1e-4, atol=1e-4)
    # PyTorch's momentum 0.1: the running mean moves a tenth of the way.
    for name, mean in batch_means.items():
      old = stats[name]['BatchNorm_0']['mean']
      np.testing.assert_allclose(
        updates['batch_stats'][name]['BatchNorm_0']['mean'],
        0.9 * old + 0.1 * mean,
        rtol=1e-5,
        atol=1e-5,
      )

  @parameterized.parameters(
    # (kernel, stride, padding, input side): the authors' encoder and decoder convs.
    (3, 2, 1, 7),
    (3, 2, 1, 28),
    (4, 2, 1, 8),
    (1, 1, 0, 3),
  )
  def test_conv_matches_pytorch_padding(self, kernel, stride, padding, side):
    x = np.random.default_rng(0).normal(size=(2, side, side, 3)).astype(np.float32)
    layer = layers.TorchConvBN(5, kernel, stride, padding, use_bias=False, relu=False)
    variables = jax.eval_shape(lambda: layer.init(jax.random.key(0), x, train=False))
    params = random_like(variables['params'], 1)
    got = layer.apply(
      {'params': params, 'batch_stats': random_like(variables['batch_stats'], 2)},
      x,
      train=True,
      mutable=['batch_stats'],
    )[0]
    y = numpy_conv(x, params['Conv_0']['kernel'], stride, padding)
    want = numpy_batch_norm(
      y,
      params['BatchNorm_0']['scale'],
      params['BatchNorm_0']['bias'],
      y.mean((0, 1, 2)),
      y.var((0, 1, 2)),
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  @parameterized.parameters((4, 2, 1), (2, 2, 0))
  def test_transposed_conv_matches_pytorch_padding(self, kernel, stride, padding):
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 3)).astype(np.float32)
    layer = layers.TorchConvBN(5, kernel, stride, padding, transpose=True, relu=False)
    variables = jax.eval_shape(lambda: layer.init(jax.random.key(0), x, train=False))
    params = random_like(variables['params'], 1)
    stats = {'BatchNorm_0': {'mean': np.zeros(5, np.float32), 'var': np.ones(5, np.float32) - 1e-5}}
    bn_params = {'scale': np.ones(5, np.float32), 'bias': np.zeros(5, np.float32)}
    params = {**params, 'BatchNorm_0': bn_params}
    got = layer.apply({'params': params, 'batch_stats': stats}, x, train=False)
    # flax keeps the kernel unflipped, so its taps are PyTorch's reversed.
    torch_kernel = params['ConvTranspose_0']['kernel'][::-1, ::-1]
    want = (
      numpy_conv_transpose(x, torch_kernel, stride, padding) + params['ConvTranspose_0']['bias']
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  def test_transposed_conv_padding_must_scale_by_stride(self):
    layer = layers.TorchConvBN(5, 4, 2, 0, transpose=True)
    with self.assertRaisesRegex(ValueError, 'padding 1.0'):
      layer.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)), train=False)


def numpy_bilinear(x, side):
  """PyTorch's interpolate(mode='bilinear', align_corners=False), for [B, H, W, C] -> side."""

  def weights(n_in):
    src = np.maximum((np.arange(side) + 0.5) * n_in / side - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(int), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = src - low
    matrix = np.zeros((side, n_in))
    np.add.at(matrix, (np.arange(side), low), 1 - frac)
    np.add.at(matrix, (np.arange(side), high), frac)
    return matrix

  return np.einsum('oh,bhwc,pw->bopc', weights(x.shape[1]), x, weights(x.shape[2]))


class ResizeTest(parameterized.TestCase):
  # CIFAR-10's 4 -> 8, CelebA's 8 -> 8, and shrinking (integer and not).
  @parameterized.parameters((4, 8), (8, 8), (8, 4), (6, 4), (3, 5))
  def test_matches_pytorch_bilinear(self, side_in, side_out):
    x = np.random.default_rng(0).normal(size=(2, side_in, side_in, 3)).astype(np.float32)
    got = encoder_lib.resize_to_grid(jnp.asarray(x), side_out)
    np.testing.assert_allclose(got, numpy_bilinear(x, side_out), rtol=1e-5, atol=1e-5)


if __name__ == '__main__':
  absltest.main()
