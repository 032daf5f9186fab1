"""platform_kernels: each operation's 'cpu' and 'plain' forms against each other, against
flax's and lax's layers and published threefry answers; whole networks built in each form."""

import functools
import math
from unittest import mock

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from configs import tiny
from npdraw_jax import errors
from npdraw_jax.model import platform_kernels
from npdraw_jax.model.nets import decoder as decoder_lib
from npdraw_jax.model.nets import encoder as encoder_lib
from npdraw_jax.model.nets import layers
from npdraw_jax.model.nets import prior as prior_lib

FORMS = platform_kernels.FORMS
NHWC = ('NHWC', 'HWIO', 'NHWC')


def value_and_grads(fn, *args, argnums=None):
  """fn's value and its gradients in every argument (or argnums) of <fn(args), fixed cotangent>."""
  out = jax.eval_shape(fn, *args)
  cotangent = jax.tree.map(lambda s: jax.random.normal(jax.random.key(99), s.shape, s.dtype), out)
  objective = lambda *a: sum(
    jnp.vdot(y, c) for y, c in zip(jax.tree.leaves(fn(*a)), jax.tree.leaves(cotangent), strict=True)
  )
  argnums = tuple(range(len(args))) if argnums is None else argnums
  return jax.jit(jax.value_and_grad(objective, argnums))(*args)


class ResolveTest(absltest.TestCase):
  def test_auto_is_cpu_on_a_cpu_backend_and_plain_elsewhere(self):
    self.assertEqual(jax.default_backend(), 'cpu')
    self.assertEqual(platform_kernels.resolve('auto'), 'cpu')
    for backend in ('gpu', 'tpu'):
      with mock.patch.object(jax, 'default_backend', return_value=backend):
        self.assertEqual(platform_kernels.resolve('auto'), 'plain')

  def test_each_form_is_selectable_anywhere(self):
    for form in FORMS:
      self.assertEqual(platform_kernels.resolve(form), form)
      with mock.patch.object(jax, 'default_backend', return_value='gpu'):
        self.assertEqual(platform_kernels.resolve(form), form)

  def test_unknown_names_are_errors(self):
    with self.assertRaisesRegex(errors.ConfigError, 'model.kernels'):
      platform_kernels.resolve('gpu')
    with self.assertRaisesRegex(ValueError, 'form'):
      platform_kernels.conv_transpose(jnp.zeros((1, 2, 2, 1)), jnp.zeros((2, 2, 1, 1)), 2, 'auto')

  def test_the_default_config_and_make_prior_take_it(self):
    config = tiny.get_config()
    self.assertEqual(config.model.kernels, 'auto')
    self.assertEqual(prior_lib.make_prior(config, 16).kernels, 'cpu')
    config.model.kernels = 'plain'
    self.assertEqual(prior_lib.make_prior(config, 16).kernels, 'plain')


class ConvolutionsTest(parameterized.TestCase):
  @parameterized.product(
    (
      dict(kernel=4, stride=2),
      dict(kernel=3, stride=2),
      dict(kernel=5, stride=2),
      dict(kernel=2, stride=2),  # kernel == stride: every phase is 1x1, one matmul.
      dict(kernel=3, stride=3),
      dict(kernel=4, stride=3),
      dict(kernel=3, stride=1),
      dict(kernel=1, stride=1),
    ),
    form=FORMS,
  )
  def test_conv_transpose_equals_lax(self, kernel, stride, form):
    x = jax.random.normal(jax.random.key(0), (4, 5, 6, 3))
    weights = jax.random.normal(jax.random.key(1), (kernel, kernel, 3, 4))
    want = value_and_grads(
      lambda x, w: jax.lax.conv_transpose(x, w, (stride, stride), 'SAME', dimension_numbers=NHWC),
      x,
      weights,
    )
    got = value_and_grads(
      lambda x, w: platform_kernels.conv_transpose(x, w, stride, form), x, weights
    )
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)

  @parameterized.parameters(2, 3)
  def test_phase_convolutions_equal_lax_when_kernel_equals_stride(self, stride):
    # The 'cpu' form takes one matmul for these; the per-phase path is the benchmarks' baseline.
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    kernel = jax.random.normal(jax.random.key(1), (stride, stride, 3, 4))
    want = jax.lax.conv_transpose(x, kernel, (stride, stride), 'SAME', dimension_numbers=NHWC)
    got = platform_kernels.phase_convolutions(x, kernel, stride)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def test_cpu_conv_transpose_refuses_a_kernel_smaller_than_the_stride(self):
    with self.assertRaisesRegex(ValueError, 'empty'):
      platform_kernels.conv_transpose(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 1, 1, 1)), 2, 'cpu')

  @parameterized.product(
    (
      dict(kernel=1, padding='SAME', batch=4),
      dict(kernel=1, padding='VALID', batch=6),
      dict(kernel=1, padding=0, batch=3),
      dict(kernel=3, padding=1, batch=4),  # Not 1x1: lax's own convolution in either form.
    ),
    form=FORMS,
  )
  def test_nn_conv_equals_flax_default(self, kernel, padding, batch, form):
    x = jax.random.normal(jax.random.key(0), (batch, 5, 6, 3))
    make = functools.partial(nn.Conv, 4, (kernel, kernel), padding=padding)
    plain, ours = make(), make(conv_general_dilated=platform_kernels.conv_general_dilated(form))
    params = plain.init(jax.random.key(1), x)
    want = value_and_grads(plain.apply, params, x)
    got = value_and_grads(ours.apply, params, x)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)

  @parameterized.product(second_bias=(True, False), form=FORMS)
  def test_pointwise_pair_equals_two_flax_convs(self, second_bias, form):
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))

    class TwoConvs(nn.Module):
      @nn.compact
      def __call__(self, x):
        hidden = nn.Conv(7, (1, 1))
        return nn.Conv(4, (1, 1), use_bias=second_bias)(hidden(x))

    class Pair(nn.Module):
      @nn.compact
      def __call__(self, x):
        first = layers.PointwiseParams(3, 7, name='Conv_0')()
        second = layers.PointwiseParams(7, 4, second_bias, name='Conv_1')()
        return platform_kernels.pointwise_pair(x, first, second, jnp.float32, form)

    params = TwoConvs().init(jax.random.key(1), x)
    # Same tree and initial values as the two layers make, so checkpoints carry over.
    chex.assert_trees_all_equal(Pair().init(jax.random.key(1), x), params)
    # Non-zero biases, so that b0 W1 + b1 is exercised.
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(3), p.shape), params)
    want = value_and_grads(TwoConvs().apply, params, x)
    got = value_and_grads(Pair().apply, params, x)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


class ThreefryTest(parameterized.TestCase):
  # Known answers of threefry-2x32 with 20 rounds, from the Random123 suite's
  # kat_vectors (Salmon et al. 2011): key, counter, output.
  @parameterized.parameters(
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
  )
  def test_known_answers(self, key, counter, want):
    as_words = lambda pair: tuple(jnp.asarray([word], jnp.uint32) for word in pair)
    got = jax.jit(platform_kernels.threefry2x32)(as_words(key), as_words(counter))
    self.assertEqual([int(word[0]) for word in got], list(want))

  @parameterized.parameters(((1,), 0), ((7, 3), 1), ((4, 37, 2048), 2), ((2, 3, 5, 7), 3))
  def test_random_bits_equal_jax_random_bits(self, shape, seed):
    key = jax.random.fold_in(jax.random.key(seed), 11)
    got = jax.jit(platform_kernels.random_bits, static_argnums=1)(key, shape)
    np.testing.assert_array_equal(got, jax.random.bits(key, shape))

  def test_uniform_equals_jax_random_uniform(self):
    key = jax.random.key(5)
    got = jax.jit(platform_kernels.uniform, static_argnums=1)(key, (64, 33))
    np.testing.assert_array_equal(got, jax.random.uniform(key, (64, 33)))

  def test_other_key_implementations_are_refused(self):
    key = jax.random.key(0, impl='rbg')
    self.assertFalse(platform_kernels.fused_bits_supported(key, (3,)))
    with self.assertRaisesRegex(ValueError, 'threefry'):
      platform_kernels.random_bits(key, (3,))


class DropoutKeepMaskTest(parameterized.TestCase):
  @parameterized.product(
    shape=((1,), (8, 37, 64), (2, 10, 2048)), keep_prob=(0.9, 0.5), key_impl=('threefry2x32', 'rbg')
  )
  def test_both_forms_draw_bernoullis_mask_bit_for_bit(self, shape, keep_prob, key_impl):
    key = jax.random.key(7, impl=key_impl)
    want = jax.random.bernoulli(key, keep_prob, shape)
    for form in FORMS:
      draw = jax.jit(platform_kernels.dropout_keep_mask, static_argnums=(1, 2, 3))
      np.testing.assert_array_equal(draw(key, keep_prob, shape, form), want)

  def test_original_threefry_counters_take_bernoullis_draw(self):
    with jax.threefry_partitionable(False):
      key = jax.random.key(0)
      self.assertFalse(platform_kernels.fused_bits_supported(key, (3,)))
      want = jax.random.bernoulli(key, 0.9, (50, 3))
      got = platform_kernels.dropout_keep_mask(key, 0.9, (50, 3), 'cpu')
    np.testing.assert_array_equal(got, want)


class LastOfCummaxTest(parameterized.TestCase):
  @parameterized.product(steps=(1, 2, 3, 7, 36, 37, 64), form=FORMS)
  def test_bit_equal_to_cummax_with_ties(self, steps, form):
    rng = np.random.default_rng(steps)
    # Rounded and clipped at 0, so most pixels tie, as undrawn canvas pixels do.
    x = np.maximum(rng.normal(size=(3, steps, 4, 5)), 0).round(1).astype(np.float32)
    want = value_and_grads(lambda x: jax.lax.cummax(x, axis=1)[:, -1], x)
    got = value_and_grads(lambda x: platform_kernels.last_of_cummax(x, 1, form), x)
    chex.assert_trees_all_equal(got, want)
    np.testing.assert_array_equal(platform_kernels.last_of_cummax(x, 1, form), x.max(axis=1))


class AttentionAndGeluTest(parameterized.TestCase):
  def test_heads_fold_in_the_cpu_form_only_when_wider_than_half_the_input(self):
    self.assertTrue(platform_kernels.folds_heads(16, 16, 'cpu'))
    self.assertFalse(platform_kernels.folds_heads(16, 8, 'cpu'))
    self.assertFalse(platform_kernels.folds_heads(16, 16, 'plain'))

  @parameterized.parameters(8, 16)
  def test_causal_attention_equal_in_both_forms(self, head_dim):
    x = jax.random.normal(jax.random.key(0), (2, 9, 16))
    positions = jnp.arange(9)

    def attention(form):
      layer = prior_lib.CausalSelfAttention(2, head_dim, 9, decode=False, kernels=form)
      return layer, layer.init(jax.random.key(1), x, positions)

    (cpu, params), (plain, plain_params) = attention('cpu'), attention('plain')
    chex.assert_trees_all_equal(params, plain_params)
    want = value_and_grads(lambda p, x: plain.apply(p, x, positions), params, x)
    got = value_and_grads(lambda p, x: cpu.apply(p, x, positions), params, x)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)

  @parameterized.parameters(*FORMS)
  def test_exact_gelu_equals_jax_and_erf(self, form):
    x = jnp.linspace(-6.0, 6.0, 1001)
    got = value_and_grads(lambda x: platform_kernels.exact_gelu(x, form), x)
    want = value_and_grads(lambda x: jax.nn.gelu(x, approximate=False), x)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    from_erf = 0.5 * np.float64(x) * (1 + np.vectorize(math.erf)(np.float64(x) / 2**0.5))
    np.testing.assert_allclose(platform_kernels.exact_gelu(x, form), from_erf, atol=1e-6)


# --- Whole networks: one set of parameters, the same outputs and gradients in both forms.


def network_outputs(module, variables, inputs, steps, rngs):
  """Training-mode outputs and new batch statistics, and the gradients in params and inputs."""
  mutable = ['batch_stats'] if 'batch_stats' in variables else False

  def forward(params, inputs):
    variables_in = {**variables, 'params': params}
    return module.apply(variables_in, *inputs, *steps, train=True, rngs=rngs, mutable=mutable)

  return value_and_grads(forward, variables['params'], inputs)


class NetworksTest(parameterized.TestCase):
  def assert_same_in_both_forms(self, make, inputs, steps=(), rngs=None):
    """make(form) built in each form, called on float `inputs` (and the prior's `steps`)."""
    modules = {form: make(form) for form in FORMS}
    variables = {
      form: module.init(jax.random.key(0), *inputs, *steps, train=False)
      for form, module in modules.items()
    }
    # The same tree and initial values: checkpoints load in either form.
    chex.assert_trees_all_equal(variables['cpu'], variables['plain'])
    # Random parameters, so that no zero bias or unit scale hides a difference.
    params = jax.tree.map(
      lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape), variables['cpu']['params']
    )
    variables = {**variables['cpu'], 'params': params}
    got = network_outputs(modules['cpu'], variables, inputs, steps, rngs)
    want = network_outputs(modules['plain'], variables, inputs, steps, rngs)
    # Float32 round-off of other summation orders, through several layers and batch norms.
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)

  @parameterized.parameters('mlp', 'fcn')
  def test_authors_encoder(self, head):
    image = jax.random.uniform(jax.random.key(3), (4, 16, 16, 3))
    make = lambda form: encoder_lib.AuthorsEncoder(4, 9, 5, 8, head, kernels=form)
    self.assert_same_in_both_forms(make, (image,))

  @parameterized.parameters(1, 2)
  def test_authors_decoder(self, upsample):
    canvas = jax.random.uniform(jax.random.key(3), (4, 8, 8, 3))
    make = lambda form: decoder_lib.AuthorsDecoder(8, 6, upsample=upsample, kernels=form)
    self.assert_same_in_both_forms(make, (canvas,))

  @parameterized.parameters(1, 2)
  def test_our_decoder(self, upsample):
    canvas = jax.random.uniform(jax.random.key(3), (4, 8, 8, 1))
    make = lambda form: decoder_lib.Decoder(8, 1, upsample=upsample, kernels=form)
    self.assert_same_in_both_forms(make, (canvas,))

  @parameterized.product(
    (
      dict(networks='authors', head_dim=8),
      dict(networks='authors', head_dim=16),
      dict(networks='ours', head_dim=8),
    ),
  )
  def test_prior_with_dropout(self, networks, head_dim):
    steps = 5
    canvases = jax.random.uniform(jax.random.key(3), (2, steps, 8, 8, 1))
    maps = (canvases > 0.5).astype(jnp.float32)
    family = prior_lib.AuthorsPrior if networks == 'authors' else prior_lib.OursPrior

    def make(form):
      return family(
        num_steps=steps,
        num_parts=5,
        num_locations=9,
        token_features=4,
        d_model=16,
        num_layers=1,
        num_heads=2,
        head_dim=head_dim,
        mlp_dim=32,
        dropout=0.3,
        kernels=form,
      )

    # Equal outputs with dropout on hold only if both forms drop the same elements.
    rngs = {'dropout': jax.random.key(4)}
    self.assert_same_in_both_forms(make, (canvases, maps), (jnp.arange(steps),), rngs)


if __name__ == '__main__':
  absltest.main()
