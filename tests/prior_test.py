"""The prior: both families' causality and dropout, the authors' layer list, the sampler."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from configs import celeba, mnist, tiny
from npdraw_jax.model import canvas, prior_likelihood, sampling
from npdraw_jax.model.nets import prior as prior_lib
from npdraw_jax.stages import train_prior

GRID = canvas.Grid(canvas_size=12, patch_size=4, stride=4)  # L = 9.
T, K, C = 9, 5, 1
FAMILIES = {'authors': prior_lib.AuthorsPrior, 'ours': prior_lib.OursPrior}


def small_prior(networks='authors', **overrides):
  fields = dict(
    num_steps=T,
    num_parts=K,
    num_locations=GRID.num_locations,
    token_features=4,
    d_model=16,
    num_layers=2,
    num_heads=2,
    head_dim=8,
    mlp_dim=32,
    dropout=0.0,
  )
  return FAMILIES[networks](**{**fields, **overrides})


def init_params(model, seed=0):
  zeros = jnp.zeros((1, T, 12, 12, C))
  params = model.init(jax.random.key(seed), zeros, zeros[..., :1], jnp.arange(T))['params']
  # Random heads: a fresh init would make every step look alike.
  return jax.tree.map(
    lambda x: x + 0.3 * jax.random.normal(jax.random.key(seed + 1), x.shape), params
  )


def random_bank(seed=0):
  return jax.random.uniform(jax.random.key(seed), (K, 4, 4, C))


def random_states(seed, batch=2):
  rng = np.random.default_rng(seed)
  canvases = rng.uniform(size=(batch, T, 12, 12, C)).astype(np.float32)
  maps = (rng.uniform(size=(batch, T, 12, 12, 1)) < 0.5).astype(np.float32)
  return canvases, maps


def count_params(params):
  return sum(x.size for x in jax.tree.leaves(params))


# --- The authors' prior, recomputed in NumPy from its layer list (docs/model.md, section 11).


def _dense(params, x):
  return x @ np.asarray(params['kernel']) + np.asarray(params['bias'])


def _layer_norm(params, x, epsilon=1e-5):
  mean = x.mean(-1, keepdims=True)
  variance = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(variance + epsilon) * params['scale'] + params['bias']


def _gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _conv3x3_stride2_pad1(params, x):
  """[N, H, W, Cin] -> [N, H/2, W/2, Cout], PyTorch's Conv2d(3, stride=2, padding=1)."""
  kernel = np.asarray(params['kernel'])  # [3, 3, Cin, Cout]
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  height, width = x.shape[1] // 2, x.shape[2] // 2
  out = np.zeros((x.shape[0], height, width, kernel.shape[-1]))
  for i in range(height):
    for j in range(width):
      patch = padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]
      out[:, i, j] = np.einsum('nuvc,uvco->no', patch, kernel)
  return out + params['bias']


def authors_reference_logits(params, canvases, maps, num_heads, head_dim):
  """NumPy forward of AuthorsPrior (no dropout) on all T states."""
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  batch, steps = canvases.shape[:2]
  x = np.concatenate([canvases, maps], -1).reshape(batch * steps, *canvases.shape[2:4], -1)
  token = params['token_cnn']
  x = np.maximum(_conv3x3_stride2_pad1(token['Conv_0'], x), 0)
  x = np.einsum('nhwc,co->nhwo', x, params['token_cnn']['Conv_1']['kernel'][0, 0])
  x = x + token['Conv_1']['bias']
  x = _dense(token['Dense_0'], x.reshape(batch, steps, -1))
  cls = np.broadcast_to(params['class_token'], (batch, 1, x.shape[-1]))
  x = np.concatenate([cls, x], 1) + params['position_embedding'][: steps + 1]
  causal = np.tril(np.ones((steps + 1, steps + 1), bool))
  for layer in range(len([k for k in params if k.startswith('blocks_')])):
    block = params[f'blocks_{layer}']
    attention = block['CausalSelfAttention_0']
    y = _layer_norm(block['LayerNorm_0'], x)
    q, k, v = (
      np.einsum('bsd,dhe->bhse', y, attention[name]['kernel']) for name in ('query', 'key', 'value')
    )
    scores = np.einsum('bhqe,bhke->bhqk', q, k) / math.sqrt(head_dim)
    scores = np.where(causal, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    y = np.einsum('bhqk,bhke->bqhe', weights, v).reshape(batch, steps + 1, num_heads * head_dim)
    out = attention['out']
    x = x + y @ out['kernel'].reshape(num_heads * head_dim, -1) + out['bias']
    y = _gelu(_dense(block['Dense_0'], _layer_norm(block['LayerNorm_1'], x)))
    x = x + _dense(block['Dense_1'], y)
  x = x[:, 1:]
  head = lambda name: _dense(
    params[name]['Dense_1'], np.maximum(_dense(params[name]['Dense_0'], x), 0)
  )
  return {'pres': head('pres_head')[..., 0], 'where': head('where_head'), 'what': head('what_head')}


def authors_prior_size(steps, parts, locations, canvas_size, channels):
  """Parameters of the authors' prior by its layer list (weights and biases)."""
  token_features, width, num_layers, num_heads, head_dim, mlp = 16, 64, 8, 16, 64, 2048
  dense = lambda fan_in, fan_out, bias=True: fan_in * fan_out + bias * fan_out
  token = (
    dense(3 * 3 * (channels + 1), token_features)
    + dense(token_features, token_features)
    + dense(token_features * (canvas_size // 2) ** 2, width)
  )
  embeddings = width + (steps**2 + 1) * width  # Class token, position table.
  inner = num_heads * head_dim
  block = (
    2 * 2 * width  # Two LayerNorms.
    + 3 * dense(width, inner, bias=False)
    + dense(inner, width)
    + dense(width, mlp)
    + dense(mlp, width)
  )
  heads = sum(dense(width, width) + dense(width, size) for size in (parts, locations, 1))
  return token + embeddings + num_layers * block + heads


class AuthorsPriorTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ('mnist', mnist.get_config, 36, 50, 36, 28, 1, 4.5),
    ('celeba', celeba.get_config, 64, 200, 64, 32, 3, 4.8),
  )
  def test_reference_parameter_count(
    self, get_config, steps, parts, locations, side, channels, millions
  ):
    config = get_config()
    self.assertEqual(config.model.networks, 'authors')
    grid = canvas.grid_from_config(config)
    self.assertEqual(
      (config.model.T, config.model.K, grid.num_locations, config.data.canvas_size),
      (steps, parts, locations, side),
    )
    model = prior_lib.make_prior(config, grid.num_locations)
    history = jnp.zeros((1, steps, side, side, channels))
    shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), history, history[..., :1], jnp.arange(steps))
    )
    want = authors_prior_size(steps, parts, locations, side, channels)
    self.assertEqual(count_params(shapes['params']), want)
    self.assertAlmostEqual(want / 1e6, millions, delta=0.05)  # The spec's size check.

  # Heads of 8 in width 16 run as written; of 16, folded in the 'cpu' form
  # (platform_kernels.folds_heads).
  @parameterized.product(head_dim=(8, 16), kernels=('cpu', 'plain'))
  def test_logits_equal_a_numpy_forward_of_the_layer_list(self, head_dim, kernels):
    model = small_prior('authors', head_dim=head_dim, kernels=kernels)
    params = init_params(model)
    canvases, maps = random_states(0)
    got = model.apply({'params': params}, canvases, maps, jnp.arange(T))
    want = authors_reference_logits(params, canvases, maps, num_heads=2, head_dim=head_dim)
    for name in ('pres', 'where', 'what'):
      self.assertEqual(got[name].dtype, jnp.float32)
      np.testing.assert_allclose(got[name], want[name], atol=2e-4, rtol=1e-4)


class MakePriorTest(parameterized.TestCase):
  @parameterized.parameters('authors', 'ours')
  def test_family_and_widths_follow_the_config(self, networks):
    config = tiny.get_config()
    config.model.networks = networks
    config.prior.head_dim = 0
    model = prior_lib.make_prior(config, 16)
    self.assertIsInstance(model, FAMILIES[networks])
    self.assertEqual(model.head_dim, config.prior.d_model // config.prior.num_heads)
    self.assertEqual(model.mlp_dim, config.prior.mlp_dim)

  def test_unknown_family_is_an_error(self):
    config = tiny.get_config()
    config.model.networks = 'theirs'
    with self.assertRaisesRegex(ValueError, 'model.networks'):
      prior_lib.make_prior(config, 16)


class CausalityTest(parameterized.TestCase):
  @parameterized.product(networks=('authors', 'ours'), t=(0, 4, 7))
  def test_later_tokens_do_not_change_earlier_outputs(self, networks, t):
    model = small_prior(networks)
    params = init_params(model)
    canvases, maps = random_states(t)
    rng = np.random.default_rng(100 + t)
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

  @parameterized.parameters('authors', 'ours')
  def test_output_shapes(self, networks):
    model = small_prior(networks)
    zeros = jnp.zeros((3, T, 12, 12, C))
    logits = model.apply({'params': init_params(model)}, zeros, zeros, jnp.arange(T))
    chex.assert_shape(logits['pres'], (3, T))
    chex.assert_shape(logits['where'], (3, T, GRID.num_locations))
    chex.assert_shape(logits['what'], (3, T, K))


class DropoutTest(parameterized.TestCase):
  @parameterized.parameters('authors', 'ours')
  def test_active_in_training_only(self, networks):
    model = small_prior(networks, dropout=0.5)
    params = init_params(model)
    canvases, maps = random_states(1)
    steps = jnp.arange(T)
    apply = lambda m, **kwargs: m.apply({'params': params}, canvases, maps, steps, **kwargs)
    # Evaluation: the same logits as the same weights without dropout.
    without = apply(small_prior(networks, dropout=0.0))
    evaluated = apply(model)
    trained = [apply(model, train=True, rngs={'dropout': jax.random.key(i)}) for i in (0, 1)]
    for name in ('pres', 'where', 'what'):
      np.testing.assert_allclose(evaluated[name], without[name], atol=1e-6)
      self.assertGreater(np.abs(trained[0][name] - without[name]).max(), 1e-3)
      self.assertGreater(np.abs(trained[0][name] - trained[1][name]).max(), 1e-3)


class ComputeDtypeTest(parameterized.TestCase):
  @parameterized.parameters('authors', 'ours')
  def test_bfloat16_keeps_float32_parameters_and_logits(self, networks):
    model = small_prior(networks)
    params = init_params(model)
    low = small_prior(networks, dtype=jnp.bfloat16)
    zeros = jnp.zeros((1, T, 12, 12, C))
    low_params = low.init(jax.random.key(0), zeros, zeros[..., :1], jnp.arange(T))['params']
    self.assertTrue(all(x.dtype == jnp.float32 for x in jax.tree.leaves(low_params)))
    canvases, maps = random_states(2)
    want = model.apply({'params': params}, canvases, maps, jnp.arange(T))
    got = low.apply({'params': params}, canvases, maps, jnp.arange(T))
    for name in ('pres', 'where', 'what'):
      self.assertEqual(got[name].dtype, jnp.float32)
      scale = np.abs(want[name]).max()
      np.testing.assert_allclose(got[name], want[name], atol=0.1 * scale)


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
    got = prior_likelihood.prior_step_log_prob(logits, pres, where, what)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    step1 = (
      math.log(sigmoid(1.5))
      + math.log(math.exp(2) / (1 + math.e + math.exp(2)))
      + math.log(math.exp(2) / (math.exp(2) + 1))
    )
    step2 = math.log(1 - sigmoid(-0.5))
    np.testing.assert_allclose(got, [[step1, step2]], rtol=1e-6)
    np.testing.assert_allclose(
      prior_likelihood.prior_sequence_log_prob(logits, pres, where, what),
      [step1 + step2],
      rtol=1e-6,
    )


class SamplerTest(parameterized.TestCase):
  # The cache runs the authors' heads of 16 as written, the full pass folded.
  @parameterized.parameters(('authors', 8), ('authors', 16), ('ours', 8))
  def test_cached_logits_equal_the_teacher_forced_pass(self, networks, head_dim):
    model = small_prior(networks, head_dim=head_dim)
    params, bank = init_params(model), random_bank()
    # A high temperature: random weights' pres logits are large.
    sampler = sampling.make_sampler(model, GRID, batch_size=6)
    samples = sampler(params, bank, jax.random.key(3), 3.0)
    chex.assert_shape(samples.canvases, (6, T, 12, 12, C))
    sequences = {'pres': samples.pres, 'where': samples.where, 'what': samples.what}
    full = train_prior.teacher_forced_logits(model, params, GRID, bank, sequences)
    for name in ('pres', 'where', 'what'):
      np.testing.assert_allclose(samples.logits[name], full[name], atol=2e-5, rtol=1e-5)
    # The returned canvases are the rendering of the sampled steps.
    rendered, _ = canvas.render_steps(GRID, bank, samples.pres, samples.where, samples.what)
    np.testing.assert_allclose(samples.canvases, rendered, atol=1e-6)
    self.assertTrue(samples.pres.any() and not samples.pres.all())

  @parameterized.product(networks=('authors', 'ours'), history=('every_step', 'drawn'))
  def test_naive_sampler_draws_the_same_samples(self, networks, history):
    model = small_prior(networks, history=history)
    params, bank = init_params(model, seed=1), random_bank(1)
    key = jax.random.key(3)
    cached = sampling.make_sampler(model, GRID, 6)(params, bank, key, 3.0)
    naive = sampling.make_naive_sampler(model, GRID, 6)(params, bank, key, 3.0)
    for a, b in zip(cached[:4], naive[:4], strict=True):
      np.testing.assert_allclose(a, b, atol=1e-6)
    for name in ('pres', 'where', 'what'):
      np.testing.assert_allclose(cached.logits[name], naive.logits[name], atol=2e-5, rtol=1e-5)
    self.assertTrue(cached.pres.any() and not cached.pres.all())

  def test_every_step_sampler_reads_the_authors_mark_for_undrawn_steps(self):
    # The history each step's logits come from, rebuilt by loops: drawn steps
    # add their box, undrawn ones the mark of an empty location (here p = 4:
    # ones on the 2 x 2 corner).
    model = small_prior('authors', history='every_step')
    params, bank = init_params(model, seed=1), random_bank(1)
    samples = sampling.make_sampler(model, GRID, 6)(params, bank, jax.random.key(5), 3.0)
    pres, where = np.asarray(samples.pres), np.asarray(samples.where)
    self.assertTrue(pres.any() and not pres.all())
    maps = np.zeros((6, T, 12, 12, 1), np.float32)
    for b in range(6):
      location_map = np.zeros((12, 12, 1), np.float32)
      for t in range(T):
        maps[b, t] = location_map
        if pres[b, t]:
          r, c = GRID.corners()[where[b, t]]
          location_map[r : r + 4, c : c + 4] = 1.0
        else:
          location_map[:2, :2] = 1.0
    canvases, _ = canvas.render_steps(GRID, bank, samples.pres, samples.where, samples.what)
    before = canvas.states_before(canvases, canvases[..., :1])[0]
    logits = model.apply({'params': params}, before, jnp.asarray(maps), jnp.arange(T))
    for name in ('pres', 'where', 'what'):
      np.testing.assert_allclose(samples.logits[name], logits[name], atol=2e-5, rtol=1e-5)

  @parameterized.parameters('authors', 'ours')
  def test_top_1_picks_the_most_likely_location_and_part(self, networks):
    model = small_prior(networks)
    params, bank = init_params(model, seed=6), random_bank(6)
    samples = sampling.make_sampler(model, GRID, 4, top_k=1)(params, bank, jax.random.key(7))
    np.testing.assert_array_equal(samples.where, np.argmax(samples.logits['where'], -1))
    np.testing.assert_array_equal(samples.what, np.argmax(samples.logits['what'], -1))

  @parameterized.parameters('authors', 'ours')
  def test_low_temperature_follows_the_pres_logit(self, networks):
    model = small_prior(networks)
    params, bank = init_params(model, seed=8), random_bank(8)
    samples = sampling.make_sampler(model, GRID, 8)(params, bank, jax.random.key(9), 1e-4)
    np.testing.assert_array_equal(samples.pres, samples.logits['pres'] > 0)


if __name__ == '__main__':
  absltest.main()
