"""The stage-2 objective's settings: teacher forcing, where's gradient, the KL
through the history, the prior's dropout, and beta = 0 without a prior."""

import dataclasses
import functools
import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import references
from configs import tiny
from npdraw_jax.infra import sharding
from npdraw_jax.model import canvas, npdraw
from npdraw_jax.stages import train_vae

BATCH = 4


@functools.cache
def fixture():
  """Tiny model (T = K = L = 16), structured random parameters, bank and batch with a parse."""
  config = tiny.get_config()
  model = npdraw.make_model(config)

  @jax.jit
  def noisy_init(key):
    init_key, noise_key = jax.random.split(key)
    variables = npdraw.init_variables(model, init_key)
    # A fresh init is nearly uniform; noise gives the prior a history it reads.
    flat, unflatten = jax.flatten_util.ravel_pytree(variables['params'])
    noisy = unflatten(flat + 0.3 * jax.random.normal(noise_key, flat.shape))
    return {'params': noisy, 'batch_stats': variables['batch_stats']}

  variables = noisy_init(jax.random.key(0))
  rng = np.random.default_rng(0)
  num_steps, num_parts = config.model.T, config.model.K
  bank = rng.uniform(size=(num_parts, 4, 4, 1)).astype(np.float32)
  batch = {
    'image': (rng.uniform(size=(BATCH, 16, 16, 1)) < 0.3).astype(np.float32),
    'pres': rng.uniform(size=(BATCH, num_steps)) < 0.6,
    'where': rng.integers(model.grid.num_locations, size=(BATCH, num_steps), dtype=np.int32),
    'what': rng.integers(num_parts, size=(BATCH, num_steps), dtype=np.int32),
  }
  return config, model, variables, bank, batch


def random_q(seed, pres_logits=None):
  """q's logits [B, T, ...]; pres_logits, when given, fix them."""
  _, model, _, bank, batch = fixture()
  keys = jax.random.split(jax.random.key(seed), 3)
  shape = batch['pres'].shape
  return {
    'pres': jax.random.normal(keys[0], shape) if pres_logits is None else pres_logits,
    'where': jax.random.normal(keys[1], (*shape, model.grid.num_locations)),
    'what': jax.random.normal(keys[2], (*shape, bank.shape[0])),
  }


def weights_with(**changes) -> npdraw.LossWeights:
  """The tiny config's (reference) settings with some changed."""
  return dataclasses.replace(npdraw.LossWeights.from_config(tiny.get_config().vae), **changes)


def terms_fn(weights, rho=0.0, tau=1.0, model=None):
  """jit(q, key) -> the stage-2 terms under `weights` (of the fixture's model unless given)."""
  _, fixture_model, variables, bank, batch = fixture()
  model = model or fixture_model

  @jax.jit
  def terms(q, key):
    noise = npdraw.draw_stage2_noise(key, q)
    return npdraw.stage2_terms(model, variables, bank, batch, q, noise, tau, rho, weights)[0]

  return terms


def loss_and_grads(weights, params, key, rho):
  """stage2_loss on the fixture's batch and its gradient w.r.t. params (tau = 1)."""
  _, model, variables, bank, batch = fixture()

  def loss_fn(params):
    variables_now = {'params': params, 'batch_stats': variables['batch_stats']}
    return npdraw.stage2_loss(model, variables_now, bank, batch, key, 1.0, rho, weights)

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


class TeacherForcingRateTest(parameterized.TestCase):
  @parameterized.parameters(0.005, 0.01)
  def test_cumulative_is_the_product_of_per_epoch_factors(self, decay):
    epochs = np.array([0, 1, 2, 10, 40, 55, 300])
    got = jax.jit(lambda e: npdraw.teacher_forcing_rate(e, 'cumulative', decay))(epochs)
    # At the start of epoch e, rho is multiplied by exp(-decay * e).
    want = [math.prod(math.exp(-decay * i) for i in range(e + 1)) for e in epochs]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-30)

  def test_closed_forms(self):
    rate = npdraw.teacher_forcing_rate
    self.assertAlmostEqual(float(rate(40, 'cumulative', 0.005)), np.exp(-4.1), places=6)
    self.assertAlmostEqual(float(rate(40, 'cumulative', 0.005)), 0.0166, places=4)
    self.assertAlmostEqual(float(rate(40, 'exponential', 0.005)), 0.8187, places=4)
    epochs = np.arange(0, 700, 7)
    np.testing.assert_allclose(rate(epochs, 'exponential', 0.01), np.exp(-0.01 * epochs), rtol=1e-5)
    np.testing.assert_allclose(rate(661, 'cumulative', 0.005), 0.0, atol=1e-30)

  def test_unknown_schedule(self):
    with self.assertRaisesRegex(ValueError, 'vae.teacher_forcing'):
      npdraw.teacher_forcing_rate(3, 'linear', 0.005)

  def test_unknown_where_gradient(self):
    config = tiny.get_config()
    config.vae.where_gradient = 'soft'
    with self.assertRaisesRegex(ValueError, 'vae.where_gradient'):
      train_vae.make_train_step(fixture()[1], config, sharding.make_mesh(), steps_per_epoch=10)


class ScheduleEpochTest(parameterized.TestCase):
  """The train step's tau and rho follow the epoch of the training split, or
  of vae.schedule_epoch_examples examples when set."""

  @parameterized.parameters((0, 68), (320, 20))  # 205 // 3; 205 // (320 // 32).
  def test_schedules_at_a_step(self, schedule_epoch_examples, epoch):
    config, model, variables, bank, batch = fixture()
    config = config.copy_and_resolve_references()
    config.vae.batch_size = 32
    config.vae.schedule_epoch_examples = schedule_epoch_examples
    state = jax.jit(train_vae.make_init_fn(config, model, variables['params']['prior']))()
    state = state.replace(step=jnp.asarray(205, state.step.dtype))
    step = train_vae.make_train_step(model, config, sharding.make_mesh(), steps_per_epoch=3)
    _, metrics = step(state, bank, batch)
    v = config.vae
    decay = v.teacher_forcing_decay
    # rho is multiplied by exp(-decay * e) at the start of each epoch e.
    rho = math.prod(math.exp(-decay * e) for e in range(epoch + 1))
    tau = max(v.tau_min, v.tau0 * math.exp(-v.tau_rate * epoch))
    self.assertAlmostEqual(float(metrics['rho']), rho, delta=1e-6 * rho)
    self.assertAlmostEqual(float(metrics['tau']), tau, places=6)


class TeacherForcingTest(parameterized.TestCase):
  @parameterized.parameters(
    ('none', False, 'nothing', 'every_step'),
    ('straight_through', True, 'nothing', 'drawn'),
    ('none', False, 'parse_part', 'drawn'),
    ('straight_through', False, 'parse_part', 'every_step'),
  )
  def test_forced_decoder_input_is_the_render_of_parse_where_and_what(
    self, where_gradient, force_pres, undrawn, history
  ):
    _, model, variables, bank, batch = fixture()
    model = dataclasses.replace(model, prior=model.prior.clone(history=history))
    # q's pres is certain, and differs from the parse's on about half the steps.
    q_pres = np.random.default_rng(1).uniform(size=batch['pres'].shape) < 0.5
    q = random_q(2, pres_logits=jnp.where(q_pres, 1e3, -1e3))
    weights = weights_with(
      where_gradient=where_gradient,
      teacher_forcing_pres=force_pres,
      prior_dropout=False,
      forcing_undrawn=undrawn,
    )
    terms = terms_fn(weights, rho=1.0, model=model)(q, jax.random.key(3))
    pres = batch['pres'] if force_pres else q_pres
    self.assertTrue(np.any(q_pres & ~batch['pres']))  # Steps only q draws would show.
    # The authors' parse has no part, at location 0, where it draws nothing.
    nothing = undrawn == 'nothing'
    pasted = pres & batch['pres'] if nothing else pres
    where = np.where(batch['pres'], batch['where'], 0) if nothing else batch['where']
    for b in range(BATCH):
      want, _ = references.render(
        bank, pasted[b], where[b], batch['what'][b], 16, model.grid.stride
      )
      np.testing.assert_allclose(terms.canvas[b], want, atol=1e-6, err_msg=f'example {b}')
    np.testing.assert_array_equal(terms.latents.pres, pres)
    # The prior reads the same forced drawing, step by step: the canvases of
    # what is pasted, the boxes of the steps drawn (or of every step).
    canvases, _ = canvas.render_steps(model.grid, bank, pasted, where, batch['what'])
    _, maps = canvas.render_steps(model.grid, bank, pres, where, batch['what'], history)
    steps = jnp.arange(pres.shape[1])
    prior_input = canvas.states_before(canvases, maps)
    want = model.prior.apply({'params': variables['params']['prior']}, *prior_input, steps)
    for name in want:
      np.testing.assert_allclose(terms.prior_logits[name], want[name], atol=1e-4, err_msg=name)

  def test_unforced_decoder_input_is_q_sample(self):
    _, model, _, bank, batch = fixture()
    # q is certain of every latent, drawn independently of the parse.
    rng = np.random.default_rng(4)
    shape = batch['pres'].shape
    q_pres = rng.uniform(size=shape) < 0.5
    q_where = rng.integers(model.grid.num_locations, size=shape)
    q_what = rng.integers(bank.shape[0], size=shape)
    q = {
      'pres': jnp.where(q_pres, 1e3, -1e3),
      'where': 1e4 * jax.nn.one_hot(q_where, model.grid.num_locations),
      'what': 1e4 * jax.nn.one_hot(q_what, bank.shape[0]),
    }
    terms = terms_fn(weights_with(), rho=0.0)(q, jax.random.key(5))
    for b in range(BATCH):
      want, _ = references.render(bank, q_pres[b], q_where[b], q_what[b], 16, model.grid.stride)
      np.testing.assert_allclose(terms.canvas[b], want, atol=1e-6, err_msg=f'example {b}')


class GradientPathTest(parameterized.TestCase):
  @parameterized.parameters('none', 'straight_through')
  def test_reconstruction_gradient_of_where(self, where_gradient):
    terms = terms_fn(weights_with(where_gradient=where_gradient, beta=0.0))
    grads = jax.jit(jax.grad(lambda q, k: jnp.sum(terms(q, k).recon)))(
      random_q(6), jax.random.key(7)
    )
    self.assertGreater(float(jnp.abs(grads['what']).max()), 1e-6)
    where_grad = float(jnp.abs(grads['where']).max())
    if where_gradient == 'none':
      self.assertEqual(where_grad, 0.0)
    else:
      self.assertGreater(where_grad, 1e-6)

  @parameterized.parameters(('straight_through', False), ('none', True), ('straight_through', True))
  def test_kl_gradient_through_the_history(self, where_gradient, through_history):
    weights = weights_with(
      where_gradient=where_gradient, kl_through_history=through_history, prior_dropout=False
    )
    terms = terms_fn(weights)
    q, key = random_q(8), jax.random.key(9)

    def total_kl(q):
      drawn = terms(q, key)
      return jnp.sum(drawn.kl), drawn

    grads, fixed = jax.jit(jax.grad(total_kl, has_aux=True))(q)
    # The reference: the analytic KL's gradient with the prior's logits and
    # the drawn pres held fixed, i.e. without the history path.
    direct = jax.grad(
      lambda q: jnp.sum(npdraw.prior_kl(q, fixed.prior_logits, fixed.latents.pres))
    )(q)
    history_path = {k: float(jnp.abs(grads[k] - direct[k]).max()) for k in q}
    tolerance = 1e-5 * float(jnp.abs(direct['what']).max())
    self.assertLess(history_path['pres'], tolerance)  # pres is a hard draw.
    self.assertEqual(history_path['what'] > tolerance, through_history, history_path)
    where_reaches = through_history and where_gradient == 'straight_through'
    self.assertEqual(history_path['where'] > tolerance, where_reaches, history_path)

  def test_reference_loss_leaves_the_frozen_prior_alone(self):
    variables = fixture()[2]
    weights = weights_with(beta=0.5, kl_through_history=True, where_gradient='straight_through')
    (loss, (metrics, _)), grads = loss_and_grads(
      weights, variables['params'], jax.random.key(10), rho=0.0
    )
    largest = lambda tree: max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))
    self.assertEqual(largest(grads['prior']), 0.0)
    self.assertGreater(largest(grads['encoder']), 0.0)
    want = metrics['recon'] + 0.5 * metrics['kl'] + weights.lambda_sup * metrics['sup']
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics['nelbo'], metrics['recon'] + metrics['kl'], rtol=1e-5)


class PriorDropoutTest(parameterized.TestCase):
  @parameterized.parameters(True, False)
  def test_kl_depends_on_the_key_only_through_dropout(self, dropout):
    # Fully forced (pres too): the drawn latents are the parse whatever the
    # key, so only the prior's dropout can make the KL depend on it.
    weights = weights_with(prior_dropout=dropout, teacher_forcing_pres=True)
    terms = terms_fn(weights, rho=1.0)
    q = random_q(11)
    kl_a, kl_b = (np.asarray(terms(q, jax.random.key(s)).kl) for s in (12, 13))
    self.assertTrue(np.all(np.isfinite(kl_a)))
    if dropout:
      self.assertGreater(np.abs(kl_a - kl_b).max(), 1e-4)
    else:
      np.testing.assert_array_equal(kl_a, kl_b)


class BetaZeroTest(absltest.TestCase):
  def test_loss_does_not_touch_the_prior(self):
    _, model, variables, bank, batch = fixture()
    params = dict(variables['params'])
    params['prior'] = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params['prior'])
    weights = weights_with(beta=0.0, kl_through_history=True, prior_dropout=True)
    (loss, (metrics, _)), grads = loss_and_grads(weights, params, jax.random.key(14), rho=0.5)
    self.assertTrue(np.isfinite(float(loss)))
    for name in ('encoder', 'decoder'):
      for leaf in jax.tree.leaves(grads[name]):
        self.assertTrue(np.all(np.isfinite(leaf)), name)
    self.assertNotIn('kl', metrics)
    self.assertNotIn('nelbo', metrics)
    np.testing.assert_allclose(
      loss, metrics['recon'] + weights.lambda_sup * metrics['sup'], rtol=1e-6
    )

  def test_train_step_runs_without_a_prior(self):
    _, model, variables, bank, batch = fixture()
    config = tiny.get_config()
    config.vae.beta = 0.0
    nan_prior = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), variables['params']['prior'])
    state = jax.jit(train_vae.make_init_fn(config, model, nan_prior))()
    step = train_vae.make_train_step(model, config, sharding.make_mesh(), steps_per_epoch=10)
    _, metrics = step(state, bank, batch)
    self.assertNotIn('kl', metrics)
    for name in ('loss', 'recon', 'sup', 'grad_norm'):
      self.assertTrue(np.isfinite(float(metrics[name])), name)

  def test_terms_have_no_kl(self):
    terms = terms_fn(weights_with(beta=0.0))(random_q(15), jax.random.key(16))
    self.assertIsNone(terms.kl)
    self.assertIsNone(terms.prior_logits)


if __name__ == '__main__':
  absltest.main()
