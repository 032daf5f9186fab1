"""The composed model: the KL, gradient paths, training lowering the loss, and
the importance-weighted bound."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from scipy import stats

from configs import tiny
from npdraw_jax.infra import input_pipeline, sharding
from npdraw_jax.model import bound, canvas, npdraw, parsing, partbank, prior_likelihood
from npdraw_jax.stages import train_vae


def tiny_model(num_steps=16):
  config = tiny.get_config()
  config.model.T = num_steps
  config.parse.order = 'greedy'  # Any T.
  return config, npdraw.make_model(config)


def noisy(tree, key, scale=0.3):
  """Random parameters with visible structure (a fresh init is nearly uniform)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
    [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  )


def init_prior(model, key):
  steps = model.prior.num_steps
  history = jnp.zeros((1, steps, 16, 16, 1))
  init = jax.jit(model.prior.init)
  return init(key, history, history, jnp.arange(steps))['params']


def random_bank(key, num_parts=16):
  return jax.random.uniform(key, (num_parts, 4, 4, 1))


class KLTest(absltest.TestCase):
  def test_analytic_kl_matches_monte_carlo(self):
    _, model = tiny_model(num_steps=4)
    prior_params = noisy(init_prior(model, jax.random.key(0)), jax.random.key(1))
    bank = random_bank(jax.random.key(2))
    keys = jax.random.split(jax.random.key(3), 3)
    q = {
      'pres': jax.random.normal(keys[0], (1, 4)),
      'where': 2 * jax.random.normal(keys[1], (1, 4, 16)),
      'what': 2 * jax.random.normal(keys[2], (1, 4, 16)),
    }
    num_samples = 20_000

    @jax.jit
    def both_estimates(key):
      (pres, where, what), log_q = bound.hard_sample(key, q, num_samples)
      pres, where, what = (x[:, 0] for x in (pres, where, what))
      canvases, maps = canvas.render_steps(model.grid, bank, pres, where, what)
      p = model.prior.apply(
        {'params': prior_params}, *canvas.states_before(canvases, maps), jnp.arange(4)
      )
      log_p = prior_likelihood.prior_sequence_log_prob(p, pres, where, what)
      q_rows = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_samples, *x.shape[1:])), q)
      return log_q[:, 0] - log_p, npdraw.prior_kl(q_rows, p, pres.astype(jnp.float32))

    monte_carlo, analytic = map(np.asarray, both_estimates(jax.random.key(4)))
    stderr = monte_carlo.std() / np.sqrt(num_samples)
    self.assertLess(abs(monte_carlo.mean() - analytic.mean()), 4 * stderr)
    self.assertGreater(analytic.mean(), 0.5)  # A case where the KL is far from 0.


class GradientPathTest(absltest.TestCase):
  def test_reconstruction_reaches_encoder_logits_through_what_and_where(self):
    _, model = tiny_model()
    variables = jax.jit(lambda k: npdraw.init_variables(model, k))(jax.random.key(0))
    bank = random_bank(jax.random.key(1))
    images = (jax.random.uniform(jax.random.key(2), (2, 16, 16, 1)) < 0.3).astype(jnp.float32)
    q, _ = npdraw.encode(model, variables, images, train=False)

    def recon(q):
      noise = npdraw.draw_stage2_noise(jax.random.key(3), q)
      latents = npdraw.relaxed_latents(noise, q, 0.7, False, False)
      canvases, _ = canvas.render_relaxed_steps(
        model.grid, bank, latents.pres, latents.where, latents.what
      )
      out, _ = npdraw.decode(model, variables, canvases[:, -1], train=False)
      return jnp.sum(npdraw.distributions.nll(model.likelihood, out, images, 1))

    grads = jax.jit(jax.grad(recon))(q)
    self.assertGreater(float(jnp.abs(grads['what']).max()), 1e-6)
    self.assertGreater(float(jnp.abs(grads['where']).max()), 1e-6)
    # pres is a hard draw: it learns from the KL and the parse only.
    self.assertEqual(float(jnp.abs(grads['pres']).max()), 0.0)


class TrainStepTest(absltest.TestCase):
  def test_a_few_steps_lower_the_loss_on_a_fixed_batch(self):
    config = tiny.get_config()
    # The authors' encoder predicts every step from one vector of this width:
    # at the tiny config's 8 it learns too slowly for a 15-step test.
    config.model.encoder_features = config.model.decoder_features = 64
    model = npdraw.make_model(config)
    train = input_pipeline.load_split(config.data, 'train')
    canvas_images = train.canvas_images[:2000].astype(np.float32) / 255
    bank = partbank.build(
      canvas_images,
      num_parts=16,
      patch_size=4,
      extract_stride=2,
      empty_threshold=0.1,
      max_patches=2000,
      max_iters=10,
      tol=1e-4,
      chunk_size=512,
      seed=0,
    ).parts
    batch = input_pipeline.train_batch(train, config.data, 32, seed=0, step=0)
    parse = parsing.parse_batch(model.grid, bank, batch['canvas_image'], 'raster', 16, 0.1)
    batch = {'image': batch['image'], 'pres': parse.pres, 'where': parse.where, 'what': parse.what}
    prior_params = noisy(init_prior(model, jax.random.key(5)), jax.random.key(6), 0.05)
    state = jax.jit(train_vae.make_init_fn(config, model, prior_params))()
    mesh = sharding.make_mesh()
    step = train_vae.make_train_step(model, config, mesh, steps_per_epoch=100)
    weights = npdraw.LossWeights.from_config(config.vae)

    @jax.jit
    def fixed_loss(state):
      variables = {'params': state.params, 'batch_stats': state.batch_stats}
      loss, _ = npdraw.stage2_loss(
        model, variables, bank, batch, jax.random.key(7), 1.0, 0.5, weights
      )
      return loss

    before = float(fixed_loss(state))
    for _ in range(15):
      state, metrics = step(state, bank, batch)
    self.assertTrue(np.isfinite(float(metrics['loss'])))
    self.assertLess(float(fixed_loss(state)), 0.8 * before)


class ImportanceWeightedBoundTest(absltest.TestCase):
  """Properties of bound.iwae_bounds on a tiny model with random parameters."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    _, cls.model = tiny_model(num_steps=4)
    variables = jax.jit(lambda k: npdraw.init_variables(cls.model, k))(jax.random.key(0))
    variables['params'] = noisy(variables['params'], jax.random.key(1), 0.1)
    cls.variables = variables
    cls.bank = random_bank(jax.random.key(2))
    image = jax.random.uniform(jax.random.key(3), (1, 16, 16, 1)) < 0.3
    # Copies of one image draw independent samples: i.i.d. draws of each bound.
    cls.copies = jnp.broadcast_to(image, (256, 16, 16, 1)).astype(jnp.float32)
    cls.counts = (1, 4, 16, 64)
    cls.out = cls.bounds(cls.counts, chunk=16)

  @classmethod
  def bounds(cls, counts, chunk):
    run = jax.jit(
      lambda key: bound.iwae_bounds(
        cls.model, cls.variables, cls.bank, cls.copies, key, counts, chunk
      )
    )
    return jax.tree.map(np.asarray, run(jax.random.key(4)))

  def test_one_sample_bound_averages_to_the_elbo(self):
    out = self.out
    one = out['nll_iwae_1']
    stderr = np.hypot(one.std() / np.sqrt(one.size), out['elbo'].std() / np.sqrt(one.size))
    self.assertLess(abs(one.mean() - out['elbo'].mean()), 4 * stderr)
    # The 64-sample bound is tighter than the ELBO by far more than the noise.
    self.assertLess(out['nll_iwae_64'].mean(), out['elbo'].mean() - 8 * stderr)

  def test_bound_tightens_with_more_samples(self):
    out = self.out
    means = [out[f'nll_iwae_{s}'].mean() for s in self.counts]
    self.assertEqual(means, sorted(means, reverse=True))
    # logmeanexp of S samples >= their mean: per image, each bound is below
    # the average of its samples' -log w, which for S = 64 is the ELBO.
    np.testing.assert_array_less(out['nll_iwae_64'], out['elbo'] + 1e-4)

  def test_exact_when_q_is_the_true_posterior(self):
    # One step, and a decoder whose output ignores the canvas: then the true
    # posterior is the prior, and an encoder that outputs the prior's logits
    # makes every importance weight equal to log p(x).
    _, model = tiny_model(num_steps=1)
    variables = jax.jit(lambda k: npdraw.init_variables(model, k))(jax.random.key(5))
    params = jax.tree.map(np.array, variables['params'])
    params['prior'] = noisy(params['prior'], jax.random.key(6))
    empty = jnp.zeros((1, 1, 16, 16, 1))
    p = model.prior.apply({'params': params['prior']}, empty, empty, jnp.arange(1))
    for name in ('pres', 'where', 'what'):  # The authors' encoder has one head per output.
      head = params['encoder'][name]
      head['kernel'][:] = 0
      head['bias'][:] = np.ravel(p[name][0])
    out_layer = params['decoder']['Conv_0']
    out_layer['kernel'][:] = 0
    out_layer['bias'][:] = 0.7
    variables = {'params': params, 'batch_stats': variables['batch_stats']}
    images = (jax.random.uniform(jax.random.key(7), (3, 16, 16, 1)) < 0.4).astype(jnp.float32)
    out = bound.iwae_bounds(model, variables, self.bank, images, jax.random.key(8), (1, 8), 4)
    expected = -stats.bernoulli.logpmf(np.asarray(images), 1 / (1 + np.exp(-0.7))).sum((1, 2, 3))
    for name in ('nll_iwae_1', 'nll_iwae_8', 'elbo'):
      np.testing.assert_allclose(out[name], expected, rtol=1e-5, err_msg=name)

  def test_largest_count_must_be_a_multiple_of_the_chunk(self):
    with self.assertRaisesRegex(ValueError, 'multiple of eval.chunk_size'):
      self.bounds((1, 10), chunk=4)


if __name__ == '__main__':
  absltest.main()
